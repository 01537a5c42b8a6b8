//! Delivery reports onto destinations: librdkafka's threads (or a
//! destination's producing thread) send them through the channel; the
//! main thread matches each to its destination by producer epoch.

use super::destination::{Destination, Mode};
use super::flight::Flight;
use super::Worker;
use crate::kafka::{self, Report};
use crate::pipe::Pipe;
use rdkafka::producer::Producer;
use std::time::Instant;

impl Worker {
    /// Serve the producers and sort their reports onto destinations.
    pub(super) fn take_reports(&mut self) {
        for p in self.destinations.values().filter_map(Destination::served_here) {
            kafka::serve(p);
        }
        let reports: Vec<Report> = self.rx.try_iter().collect();
        for report in reports {
            let epoch = match &report {
                Report::Delivered { epoch, .. } | Report::Failed { epoch, .. } | Report::ClientError { epoch, .. } => {
                    *epoch
                }
            };
            // Reports from a producer we already replaced are stale.
            if let Some(d) = self.destinations.values_mut().find(|d| d.link.epoch == epoch && d.link.producer.is_some())
            {
                d.on_report(report);
            }
        }
        for d in self.destinations.values_mut() {
            d.replace_if_done();
            d.finish_transaction();
        }
    }

    /// Events still unacknowledged past the delivery timeout (librdkafka does
    /// not expire messages while no broker is reachable): count them as failed
    /// and start over with a new producer, which drops the old one's queue.
    pub(super) fn expire_unacknowledged(&mut self) {
        let now = Instant::now();
        for d in self.destinations.values_mut() {
            if d.oldest_deadline().is_some_and(|due| due <= now) {
                let error =
                    format!("no acknowledgement within deliveryTimeoutMs ({} ms)", d.params.delivery_timeout_ms);
                d.fail_in_flight(&error);
                d.drop_producer();
            }
        }
    }

    /// At-least-once: delete what Kafka acknowledged, keep failed events with
    /// their error. Best-effort: count delivered and lost.
    pub(super) fn record_outcomes(&mut self) {
        self.destinations.values_mut().for_each(Destination::record_outcomes);
    }
}

impl Destination {
    fn on_report(&mut self, report: Report) {
        match report {
            Report::Delivered { event_id, .. } => self.on_delivered(event_id),
            Report::Failed { event_id, error, poison, stale, timed_out, refused, .. } => {
                if stale {
                    self.link.replace = Some("the producer was fenced or lost its idempotence state");
                } else if timed_out && matches!(self.mode, Mode::AtLeastOnce(_)) {
                    // A broker that forgot this idempotent producer (restarted
                    // without its state) answers UNKNOWN_PRODUCER_ID, which
                    // librdkafka retries until each message times out, again
                    // and again: a new producer gets a new id. (A best-effort
                    // destination just counts them lost.)
                    self.link.replace = Some("its messages timed out");
                }
                let Some(Flight { group, .. }) = self.flights.remove(event_id) else { return };
                match &mut self.mode {
                    Mode::AtLeastOnce(o) => o.on_failed(event_id, group, error, poison, refused),
                    Mode::BestEffort(m) => m.lose(error),
                }
            }
            Report::ClientError { error, fatal, .. } => {
                self.health.client_error(&error);
                if fatal {
                    self.link.replace = Some("the producer reported a fatal error");
                }
            }
        }
    }

    fn on_delivered(&mut self, event_id: i64) {
        let Some(Flight { group, born_us }) = self.flights.remove(event_id) else { return };
        self.latency.record(born_us);
        match &mut self.mode {
            Mode::AtLeastOnce(o) => o.on_delivered(event_id, group),
            Mode::BestEffort(m) => m.delivered += 1,
        }
    }

    /// A producer that is done (fatal or fenced, its messages time out, or
    /// its producing thread ended): what it has in flight failed, a new
    /// producer takes over.
    fn replace_if_done(&mut self) {
        let fatal = self.link.producer.as_ref().and_then(|p| p.client().fatal_error());
        let ended = self.link.pipe.as_ref().is_some_and(Pipe::ended);
        let replace = self.link.replace.take();
        if replace.is_none() && fatal.is_none() && !ended {
            return;
        }
        let reason = match (fatal, replace) {
            (Some((_, m)), _) => m,
            _ if ended => "the destination's producing thread ended".to_string(),
            (None, r) => r.unwrap_or_default().to_string(),
        };
        self.fail_in_flight(&reason);
        self.drop_producer();
    }
}
