//! One way to raise a user-facing error: SQLSTATE, lowercase message naming the
//! object, optional detail and hint.

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

pub struct UserError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub hint: Option<String>,
    pub detail: Option<String>,
}

impl UserError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Self {
        UserError { code, message: message.into(), hint: None, detail: None }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Raise as a Postgres ERROR (does not return).
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code, self.message, "pg_outbox");
        if let Some(h) = self.hint {
            report = report.set_hint(h);
        }
        if let Some(d) = self.detail {
            report = report.set_detail(d);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
