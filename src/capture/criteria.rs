//! FHIRPath criteria at capture time: the test a change of one table and
//! interaction must pass (any of its entries' criteria, or none at all),
//! evaluated with %current and %previous. A criteria that cannot be
//! evaluated lets the change through with a WARNING: an event too many
//! rather than a lost one or a failed write. Compiling and evaluating is
//! `crate::fhirpath`. See docs/architecture.md.

use pgrx::pg_sys;
use std::rc::Rc;

/// A compiled FHIRPath criteria, or why it did not compile (checked when
/// the topic was created, so only after an evaluator change): such a
/// criteria lets every change through with a WARNING, as one that fails at
/// run time does.
pub(super) type Fhirpath = Result<crate::fhirpath::Criteria, String>;

/// The FHIRPath test of one table and interaction: a change passes when an
/// entry for it has no FHIRPath criteria, or when one of theirs holds.
#[derive(Default)]
pub(super) struct FhirpathTest {
    pub(super) unconditional: bool,
    pub(super) any: Vec<Rc<Fhirpath>>,
}

impl FhirpathTest {
    /// The criteria to evaluate, if any.
    pub(super) fn needed(&self) -> Option<&[Rc<Fhirpath>]> {
        (!self.unconditional && !self.any.is_empty()).then_some(&self.any)
    }
}

/// Whether a change passes the FHIRPath test; one that cannot be evaluated
/// passes, with a WARNING (an event too many rather than a lost one or a
/// failed write).
pub(super) fn holds(
    criteria: &[Rc<Fhirpath>],
    op: u32,
    this: &str,
    other: Option<&str>,
    topic: i32,
    table: &str,
) -> bool {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<bool, String> {
        let this: serde_json::Value =
            serde_json::from_str(this).map_err(|e| format!("the resource is not readable JSON: {e}"))?;
        let other: Option<serde_json::Value> = match other {
            Some(o) => {
                Some(serde_json::from_str(o).map_err(|e| format!("the previous resource is not readable JSON: {e}"))?)
            }
            None => None,
        };
        // %current: the row after the change (none on delete); %previous: before it (none on create).
        let (current, previous) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => (Some(&this), None),
            pg_sys::TRIGGER_EVENT_DELETE => (None, Some(&this)),
            _ => (Some(&this), other.as_ref()),
        };
        for c in criteria {
            if c.as_ref().as_ref().map_err(String::clone)?.matches(current, previous)? {
                return Ok(true);
            }
        }
        Ok(false)
    }))
    .unwrap_or_else(|_| Err("the FHIRPath evaluator panicked".to_string()));
    outcome.unwrap_or_else(|e| {
        pgrx::warning!(
            "pg_outbox: the fhirPathCriteria of topic {topic} on {table} could not be evaluated ({e}); the change is sent as if it matched"
        );
        true
    })
}
