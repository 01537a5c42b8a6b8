//! Reading the configuration: destinations created, dropped or changed
//! since the last read. A changed destination retires its old incarnation,
//! which finishes what it has in flight while the new one starts.

use super::backfill::Backfill;
use super::destination::{Destination, Mode};
use super::{in_transaction, Worker};
use crate::config;
use crate::params::Params;
use crate::status;
use crate::store;
use crate::types::Kind;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often the configuration is re-read even without a change signal.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How long a reconfigured destination's old producer may finish its work.
const RETIRE_GRACE: Duration = Duration::from_secs(3);

impl Worker {
    /// Read the configuration if a change was signalled or it is due.
    pub(super) fn maybe_reload(&mut self) {
        let generation = status::config_generation();
        let due = self.last_reload.is_none_or(|t| t.elapsed() >= RELOAD_EVERY);
        if generation == self.seen_generation && !due {
            return;
        }
        let read_us = status::now_us();
        let loaded = in_transaction("reading the configuration", || {
            let Some(extension) = store::extension_oid()? else {
                return Ok(None);
            };
            store::read_layout()?;
            store::destinations().map(|rows| Some((extension, rows)))
        });
        self.last_reload = Some(Instant::now());
        match loaded {
            Some(Ok(Some((extension, rows)))) => {
                self.seen_generation = generation;
                self.serve(extension, rows, read_us);
            }
            Some(Ok(None)) => {
                self.seen_generation = generation;
                if self.extension_present {
                    pgrx::log!("pg_outbox worker: extension dropped, idle until it is created again");
                }
                self.extension_present = false;
                self.extension = None;
                self.apply_configuration(Vec::new(), read_us);
            }
            Some(Err(e)) => pgrx::warning!("pg_outbox worker: reading the configuration failed: {e}"),
            None => {}
        }
    }

    /// Serve the installation `extension` with these destinations.
    fn serve(&mut self, extension: pgrx::pg_sys::Oid, rows: Vec<store::DestinationRow>, read_us: i64) {
        if self.extension != Some(extension) {
            // Created (again): nothing of a former incarnation carries over,
            // event ids start anew.
            self.apply_configuration(Vec::new(), read_us);
            self.extension = Some(extension);
            pgrx::log!("pg_outbox worker: serving {} destination(s)", rows.len());
        }
        self.extension_present = true;
        let before = self.destinations.len();
        self.apply_configuration(rows, read_us);
        if self.destinations.len() < before || !self.swept {
            // A writer that read a destination just before it was dropped
            // may have left events for it: remove them.
            self.swept = in_transaction("removing events of dropped destinations", store::delete_orphans)
                .is_some_and(|r| r.is_ok());
        }
    }

    /// `read_us`: when the read of `rows` began (see `status::retain_only`).
    fn apply_configuration(&mut self, rows: Vec<store::DestinationRow>, read_us: i64) {
        let wanted: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        self.destinations.retain(|_, d| wanted.contains(d.id.as_str()));
        // Their slots go too (see retain_only for the exception).
        status::retain_only(&wanted, read_us);
        let changed: Vec<String> = rows
            .iter()
            .filter(|row| {
                self.destinations.get(&row.id).is_some_and(|d| {
                    d.parameters_text != row.parameters
                        || d.topic_url != row.topic_url
                        || d.content != row.content
                        || d.mode.kind() != row.kind
                })
            })
            .map(|row| row.id.clone())
            .collect();
        // FHIR tables renamed, or a topic's tables changed: only how
        // messages are built changes, the producer stays; so it does
        // through a pause.
        for row in &rows {
            if let Some(d) = self.destinations.get_mut(&row.id) {
                d.resource_types = row.resource_types.clone();
                d.paused = row.paused;
                d.retain = row.retain;
                if d.backfill.map(|b| b.id) != row.backfill {
                    d.backfill = row.backfill.map(Backfill::new);
                }
            }
        }
        self.retire(&changed);
        for row in rows {
            if !self.destinations.contains_key(&row.id) {
                self.add(row);
            }
        }
    }

    /// Serve a destination new to the worker (or rebuilt), unless its
    /// parameters are refused or no status slot is free.
    fn add(&mut self, row: store::DestinationRow) {
        let value: serde_json::Value = serde_json::from_str(&row.parameters).unwrap_or(serde_json::Value::Null);
        let params = match Params::parse(&row.id, row.kind == Kind::BestEffort, &value) {
            Ok(p) => p,
            Err(e) => {
                pgrx::warning!("pg_outbox: destination \"{}\" skipped: {}", row.id, e.message);
                return;
            }
        };
        let Some(slot) = status::claim_slot(&row.id) else {
            pgrx::warning!(
                "pg_outbox: destination \"{}\" skipped: all {} status slots (outbox.max_destinations) are in use",
                row.id,
                config::MAX_DESTINATIONS.get()
            );
            return;
        };
        self.destinations.insert(row.id.clone(), Destination::new(row, params, slot));
    }

    /// Destinations whose configuration changed keep their producer for a
    /// while under another key (`retiring_until`): it finishes what it has in
    /// flight (reports are matched by producer epoch), its outcomes are
    /// recorded as usual, an open Kafka transaction is aborted; the rebuilt
    /// destination starts at once but claims at-least-once events only once
    /// the old one is gone, so nothing is sent twice needlessly. Nothing here
    /// blocks the worker.
    fn retire(&mut self, ids: &[String]) {
        let until = Instant::now() + RETIRE_GRACE;
        for id in ids {
            let Some(mut d) = self.destinations.remove(id) else { continue };
            if d.idle() {
                continue; // nothing to finish: dropped now
            }
            d.retiring_until = Some(until);
            d.backfill = None; // the rebuilt destination goes on with it
            if let Some(o) = d.outbox() {
                // An open transaction is aborted once its reports are in.
                o.batch_failed = true;
            }
            let key = format!("{id}\u{0}retiring-{}", d.link.epoch);
            self.destinations.insert(key, d);
        }
    }

    /// Drop retiring destinations that are done or out of time. What an
    /// at-least-once one leaves is still in the outbox (the new producer sends
    /// it); what a best-effort one leaves counts as lost.
    pub(super) fn finish_retiring(&mut self) {
        let now = Instant::now();
        self.destinations.retain(|_, d| {
            let done = d.retiring_until.is_some_and(|until| until <= now || d.idle());
            if done && matches!(d.mode, Mode::BestEffort(_)) && d.in_process() > 0 {
                status::add_lost_slot(d.slot, d.in_process());
                status::record_error(d.slot, "events in flight when the destination was reconfigured were lost");
            }
            !done
        });
    }

    /// An at-least-once destination whose previous configuration still has
    /// events in flight waits for them before it claims.
    pub(super) fn has_retiring(&self, id: &str) -> bool {
        self.destinations.values().any(|d| d.retiring_until.is_some() && d.id == id)
    }
}
