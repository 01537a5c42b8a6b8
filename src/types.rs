//! Types shared across modules: what a destination is and what its messages
//! carry, as `outbox.destination` spells them (the writer side and the worker),
//! and an outbox event as the worker reads it (claimed by `store`, or taken
//! off the best-effort queue) and hands it to `kafka` and `pipe`. Kept apart
//! so that these modules depend on this one rather than on each other.
//! See docs/architecture.md.

use std::rc::Rc;

/// A destination's kind (`outbox.destination.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stored in the outbox with the change, deleted once Kafka has it.
    AtLeastOnce,
    /// Kept in memory until COMMIT, then queued in shared memory; may be lost.
    BestEffort,
}

impl Kind {
    /// None for a name `create_destination` would refuse.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "kafka-at-least-once" => Some(Kind::AtLeastOnce),
            "kafka-best-effort" => Some(Kind::BestEffort),
            _ => None,
        }
    }
}

/// How the second entry of the Bundle carries the row
/// (`outbox.destination.content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    FullResource,
    IdOnly,
    Empty,
}

impl Content {
    /// None for a name `create_destination` would refuse.
    pub fn parse(s: &str) -> Option<Content> {
        match s {
            "full-resource" => Some(Content::FullResource),
            "id-only" => Some(Content::IdOnly),
            "empty" => Some(Content::Empty),
            _ => None,
        }
    }
}

/// One outbox event as the worker reads it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    /// The id of the outbox row holding this event with others of its
    /// statement (see `outbox.event`), or 0 for a row of its own.
    pub group: i64,
    /// Schema-qualified source table, e.g. `public.orders`. (This, the
    /// interaction and the timestamp are shared between events, see `share`.)
    pub table: Rc<str>,
    /// `create`, `update`, `delete` or `truncate`.
    pub interaction: Rc<str>,
    pub key: Option<String>,
    /// The row as JSON text (full-resource only).
    pub row: Option<String>,
    /// Transaction timestamp of the change, ISO 8601 UTC.
    pub timestamp: Rc<str>,
    /// Where the latency the status reports starts (Postgres µs): the commit
    /// when known, else the transaction start.
    pub born_us: i64,
    /// The writer's `outbox.traceparent`: the Kafka header `traceparent`.
    pub traceparent: Option<Rc<str>>,
}

/// `s` as a shared string: `last` again if it holds the same text (the
/// events of a claim or of the best-effort queue mostly share their table,
/// interaction and timestamp), else a new one, kept in `last`.
pub fn share(last: &mut Option<Rc<str>>, s: &str) -> Rc<str> {
    match last {
        Some(l) if **l == *s => l.clone(),
        _ => last.insert(Rc::from(s)).clone(),
    }
}
