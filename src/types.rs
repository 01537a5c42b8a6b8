//! Types shared by the writer side and the worker: what a destination is
//! and what its messages carry, as `outbox.destination` spells them.

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
