//! Transactional producing (`transactionalId` set): each batch goes out in
//! a Kafka transaction, and its events leave the outbox only once the
//! commit succeeded. The transaction calls block, so each runs in bounded
//! steps (`TXN_STEP`) resumed on later passes until maxBlockMs.

use super::destination::{Destination, Link, Mode};
use super::flight::Flights;
use crate::kafka;
use crate::params::Params;
use rdkafka::producer::Producer;
use std::time::{Duration, Instant};

/// How long one transaction call (init, commit, abort) may block a pass.
pub(super) const TXN_STEP: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(super) struct Txn {
    /// init_transactions is done for this producer.
    pub ready: bool,
    /// A transaction is open.
    pub open: bool,
    /// Events delivered in it (event, group), acknowledged at commit.
    pub held: Vec<(i64, i64)>,
    /// When the pending init/commit/abort must give up (maxBlockMs).
    deadline: Option<Instant>,
}

impl Txn {
    /// A new producer starts with no transaction state.
    pub fn reset(&mut self) {
        self.ready = false;
        self.open = false;
        self.deadline = None;
    }

    fn deadline(&mut self, params: &Params) -> Instant {
        *self.deadline.get_or_insert(Instant::now() + Duration::from_millis(params.max_block_ms as u64))
    }

    /// When the next step of a call is due, if one is pending.
    pub fn step_due(&self, params: &Params, link: &Link, flights: &Flights) -> Option<Instant> {
        let due = params.transactional && link.producer.is_some() && (!self.ready || (self.open && flights.is_empty()));
        due.then(|| Instant::now() + TXN_STEP)
    }
}

impl Destination {
    /// Before a batch: a transaction must be open if the destination is
    /// transactional. False: not this pass (resumed soon, or backing off).
    pub(super) fn open_transaction(&mut self) -> bool {
        if !self.params.transactional || self.begin_transaction() {
            return true;
        }
        let now = Instant::now();
        if self.health.may_try(now) {
            self.health.retry_at = Some(now + TXN_STEP);
        }
        false
    }

    /// Run one step of init_transactions (resumed on later passes) and
    /// begin a transaction. False: not this pass.
    fn begin_transaction(&mut self) -> bool {
        let Some(p) = self.link.producer.clone() else { return false };
        let Mode::AtLeastOnce(o) = &mut self.mode else { return false };
        if !o.txn.ready {
            let deadline = o.txn.deadline(&self.params);
            match p.init_transactions(TXN_STEP) {
                Ok(()) => {
                    o.txn.ready = true;
                    o.txn.deadline = None;
                }
                Err(e) if kafka::is_retriable(&e) && Instant::now() < deadline => {
                    if !kafka::is_timeout(&e) {
                        self.health.error(&format!("init_transactions: {e} (retried until maxBlockMs)"));
                    }
                    return false;
                }
                Err(e) => {
                    let e = if kafka::is_retriable(&e) {
                        format!(
                            "init_transactions did not complete within maxBlockMs ({} ms): {e}",
                            self.params.max_block_ms
                        )
                    } else {
                        format!("init_transactions failed: {e}")
                    };
                    self.give_up(&e);
                    return false;
                }
            }
        }
        if let Err(e) = p.begin_transaction() {
            self.give_up(&format!("begin_transaction failed: {e}"));
            return false;
        }
        if let Some(o) = self.outbox() {
            o.txn.open = true;
        }
        true
    }

    /// A transaction call failed for good: a new producer, after a back-off.
    fn give_up(&mut self, error: &str) {
        self.health.error(error);
        self.drop_producer();
        self.health.back_off();
    }

    /// Once every event of the open transaction has its report, commit it
    /// (or abort it when some failed), one bounded step per pass. Events are
    /// acknowledged only when the commit succeeded.
    pub(super) fn finish_transaction(&mut self) {
        let Some(p) = self.link.producer.clone() else { return };
        let Mode::AtLeastOnce(o) = &mut self.mode else { return };
        if !o.txn.open || !self.flights.is_empty() {
            return;
        }
        let abort = o.outcomes.has_failed() || o.batch_failed;
        let deadline = o.txn.deadline(&self.params);
        let result = if abort { p.abort_transaction(TXN_STEP) } else { p.commit_transaction(TXN_STEP) };
        let what = if abort { "abort_transaction" } else { "commit_transaction" };
        match result {
            Ok(()) => {
                o.txn.open = false;
                o.txn.deadline = None;
                for (id, group) in std::mem::take(&mut o.txn.held) {
                    o.reported(group);
                    if abort {
                        o.fail(id, group, "the transaction was aborted".to_string());
                    } else {
                        o.delivered(id, group);
                    }
                }
            }
            Err(e) if kafka::is_retriable(&e) && Instant::now() < deadline => {
                if !kafka::is_timeout(&e) {
                    self.health.error(&format!("{what}: {e} (retried until maxBlockMs)"));
                }
            }
            Err(e) if !abort && kafka::txn_requires_abort(&e) => {
                // Resolved by aborting: the next steps do that.
                self.health.error(&format!("{what} failed: {e}"));
                o.batch_failed = true;
                o.txn.deadline = None;
            }
            Err(e) => {
                let error = format!("{what} failed: {e}");
                self.health.error(&error);
                self.fail_in_flight(&error);
                self.drop_producer();
            }
        }
    }
}
