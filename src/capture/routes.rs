//! Routes: what each topic's trigger must do, read from the configuration
//! tables (destinations by kind and content, and the topic's tables with
//! their FHIRPath criteria). Cached per backend and reloaded when the
//! configuration generation in shared memory moves, or when this backend
//! changed the configuration itself. See docs/architecture.md.

use super::criteria::FhirpathTest;
use super::{as_owner, ensure_callbacks, STATE};
use crate::error::UserError;
use crate::status;
use crate::types::{Content, Kind};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::collections::HashMap;
use std::rc::Rc;

/// What a topic's trigger must do.
#[derive(Default)]
pub(super) struct Route {
    /// At-least-once destinations: ids, and whether each carries the row.
    pub(super) at_least_once: Vec<String>,
    pub(super) at_least_once_rows: Vec<bool>,
    /// Some destination carries the row (full-resource): only then is it turned into JSON.
    pub(super) needs_row: bool,
    pub(super) best_effort: Vec<(String, Content)>,
    /// The topic's tables, by oid.
    pub(super) tables: HashMap<pg_sys::Oid, Watched>,
}

/// A watched table: how its rows become resources, and the FHIRPath test
/// of each row interaction.
#[derive(Default)]
pub(super) struct Watched {
    /// Aidbox's layout (id, resource jsonb, ...): the resource type.
    pub(super) resource_type: Option<String>,
    /// Create, update, delete (ROW_INTERACTIONS): the FHIRPath test of the
    /// entries that cover it.
    pub(super) fhirpath: [FhirpathTest; 3],
}

/// The row interactions, in the order of `Watched::fhirpath`.
pub(super) const ROW_INTERACTIONS: [&str; 3] = ["create", "update", "delete"];

/// Every topic that has destinations, with its destinations and tables.
/// Runs as the extension owner with the writer's search_path: operators are
/// schema-qualified so none of the writer's can run.
fn load_routes() -> HashMap<i32, Rc<Route>> {
    let mut routes: HashMap<i32, Route> = HashMap::new();
    Spi::connect(|client| {
        load_destinations(client, &mut routes)?;
        load_entries(client, &mut routes)
    })
    .unwrap_or_else(|e| {
        UserError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "pg_outbox could not read its topics")
            .detail(e.to_string())
            .raise()
    });
    routes.into_iter().map(|(topic, route)| (topic, Rc::new(route))).collect()
}

/// Each destination into its topic's route, by kind.
fn load_destinations(client: &SpiClient<'_>, routes: &mut HashMap<i32, Route>) -> SpiResult<()> {
    let rows = client.select(
        "SELECT t.id, d.id, d.kind, d.content \
           FROM outbox.destination d JOIN outbox.topic t ON t.url OPERATOR(pg_catalog.=) d.topic_url",
        None,
        &[],
    )?;
    for row in rows {
        let topic: i32 = row.get(1)?.unwrap_or_default();
        let id: String = row.get(2)?.unwrap_or_default();
        let kind: String = row.get(3)?.unwrap_or_default();
        let content: String = row.get(4)?.unwrap_or_default();
        let route = routes.entry(topic).or_default();
        // Names create_destination would refuse (a row edited by hand):
        // keep the whole event in the outbox, where it waits (the worker
        // does not serve such a destination) rather than being lost.
        let content = Content::parse(&content).unwrap_or(Content::FullResource);
        route.needs_row |= content == Content::FullResource;
        if Kind::parse(&kind) == Some(Kind::BestEffort) {
            route.best_effort.push((id, content));
        } else {
            route.at_least_once.push(id);
            route.at_least_once_rows.push(content == Content::FullResource);
        }
    }
    Ok(())
}

/// Every entry of a topic with destinations, with its table: the table's
/// resource type and, per interaction, the entries' FHIRPath criteria.
fn load_entries(client: &SpiClient<'_>, routes: &mut HashMap<i32, Route>) -> SpiResult<()> {
    let entries = client.select(
        "SELECT e.topic_id, CAST(e.table_oid AS pg_catalog.oid), tt.resource_type, e.interactions, e.fhirpath \
           FROM outbox.topic_entry e JOIN outbox.topic_table tt \
             ON tt.topic_id OPERATOR(pg_catalog.=) e.topic_id AND tt.table_oid OPERATOR(pg_catalog.=) e.table_oid",
        None,
        &[],
    )?;
    for row in entries {
        let topic: i32 = row.get(1)?.unwrap_or_default();
        let Some(route) = routes.get_mut(&topic) else { continue };
        let table: pg_sys::Oid = row.get(2)?.unwrap_or(pg_sys::Oid::INVALID);
        let watched = route.tables.entry(table).or_default();
        watched.resource_type = row.get(3)?;
        let interactions: Vec<String> = row.get(4)?.unwrap_or_default();
        let criteria = row.get::<String>(5)?.map(|src| Rc::new(crate::fhirpath::compile(&src)));
        for i in interactions.iter().filter_map(|i| ROW_INTERACTIONS.iter().position(|r| r == i)) {
            let test = &mut watched.fhirpath[i];
            match &criteria {
                Some(c) => test.any.push(c.clone()),
                None => test.unconditional = true,
            }
        }
    }
    Ok(())
}

/// The extension owner, who reads the configuration and writes the outbox.
fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_outbox'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        UserError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_outbox is not installed in this database",
        )
        .raise()
    })
}

/// Make sure the cached routes (and the extension owner) are current.
pub(super) fn refresh() {
    let generation = status::config_generation();
    let cached = STATE.with(|s| {
        let s = s.borrow();
        s.routes.is_some() && s.generation == generation && !s.dirty
    });
    if cached {
        return;
    }
    let owner = extension_owner();
    let routes = as_owner(owner, load_routes);
    // Under REPEATABLE READ and SERIALIZABLE the query saw the transaction's
    // snapshot, which may predate the generation read above: trust it for this
    // transaction only. Without shared memory (not preloaded) never trust it.
    let this_transaction_only =
        unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 || !crate::preloaded();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        s.routes = Some(routes);
        s.generation = generation;
        s.dirty = false;
        s.reload_after_transaction = this_transaction_only;
        s.owner = owner;
        s.insert_plans = Default::default();
        s.targets.clear();
    });
}
