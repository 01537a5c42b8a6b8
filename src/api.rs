//! The Rust half of the SQL API: checks the PL/pgSQL functions call.

use crate::error::UserError;
use crate::params::{self, ParamError, Params};
use crate::types::Kind;
use pgrx::prelude::*;
use pgrx::JsonB;

fn raise_param_error(e: ParamError) -> ! {
    let code = if e.unsupported {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    } else {
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
    };
    UserError::new(code, e.message).hint(e.hint).raise()
}

fn parse(destination_id: &str, kind: &str, parameters: Option<JsonB>) -> (Params, serde_json::Value) {
    let value = parameters.map(|j| j.0).unwrap_or(serde_json::Value::Null);
    let object = params::normalize(destination_id, &value).unwrap_or_else(|e| raise_param_error(e));
    let object = serde_json::Value::Object(object);
    let p = Params::parse(destination_id, Kind::parse(kind) == Some(Kind::BestEffort), &object)
        .unwrap_or_else(|e| raise_param_error(e));
    (p, object)
}

/// Validate a destination's parameters (object or Aidbox's parameter array);
/// returns them as stored (an object).
#[pg_extern(volatile, parallel_unsafe)]
fn _check_parameters(destination_id: &str, kind: &str, parameters: Option<JsonB>) -> JsonB {
    let (params, object) = parse(destination_id, kind, parameters);
    if let Err(e) = crate::kafka::check_client_config(&params) {
        UserError::invalid(format!("librdkafka refused the configuration of destination \"{destination_id}\": {e}"))
            .hint("Check the parameter values against docs/parameters.md.")
            .raise()
    }
    if let Some(crate::oauth::TokenSource::MskIam { profile, .. }) = &params.token {
        // The worker signs with the same environment and files: say so now.
        if let Err(e) = crate::oauth::aws_credentials(profile.as_deref()) {
            pgrx::notice!("destination \"{destination_id}\" will not connect yet: {e}");
        }
    }
    JsonB(object)
}

/// Aidbox's parameter array as an object.
#[pg_extern(immutable, parallel_safe)]
fn _normalize_parameters(destination_id: &str, parameters: JsonB) -> JsonB {
    let object = params::normalize(destination_id, &parameters.0).unwrap_or_else(|e| raise_param_error(e));
    JsonB(serde_json::Value::Object(object))
}

/// The librdkafka properties a destination's producer gets, secrets redacted.
#[pg_extern(stable, parallel_safe)]
fn _effective_config(destination_id: &str, kind: &str, parameters: JsonB) -> JsonB {
    if !unsafe { pg_sys::superuser() } {
        UserError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to read the configuration of destination \"{destination_id}\""),
        )
        .hint("Only superusers may read destination configurations.")
        .raise()
    }
    JsonB(parse(destination_id, kind, Some(parameters)).0.effective())
}

/// CREATE EXTENSION calls this last: the worker must be able to serve us.
#[pg_extern(volatile, parallel_unsafe)]
fn _require_preload_and_database() {
    if !crate::preloaded() {
        UserError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_outbox must be loaded via shared_preload_libraries",
        )
        .hint("Add pg_outbox to shared_preload_libraries in postgresql.conf and restart Postgres.")
        .raise()
    }
    let here = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    };
    let served = crate::config::database();
    if here != served {
        UserError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("pg_outbox can only be created in database \"{served}\", not \"{here}\""),
        )
        .detail("The pg_outbox worker serves the database named by outbox.database.")
        .hint(format!("Connect to \"{served}\", or set outbox.database = '{here}' and restart Postgres."))
        .raise()
    }
}

/// Make a trigger the API created go away with the extension. Releases up
/// to 0.2.0 call it from their SQL (which this library serves between the
/// restart and `ALTER EXTENSION pg_outbox UPDATE`); later ones tie their
/// triggers with `ALTER TRIGGER ... DEPENDS ON EXTENSION`, which pg_dump
/// writes out: no SQL function for it any more.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn _trigger_depends_on_extension(trigger_oid: pg_sys::Oid) {
    unsafe {
        let ext = pg_sys::get_extension_oid(c"pg_outbox".as_ptr(), false);
        let depender =
            pg_sys::ObjectAddress { classId: pg_sys::TriggerRelationId, objectId: trigger_oid, objectSubId: 0 };
        let referenced = pg_sys::ObjectAddress { classId: pg_sys::ExtensionRelationId, objectId: ext, objectSubId: 0 };
        pg_sys::recordDependencyOn(&depender, &referenced, pg_sys::DependencyType::DEPENDENCY_AUTO);
    }
}

/// Check a FHIRPath criteria when a topic is created: syntax, functions,
/// variables. `what` names the trigger entry for the message.
#[pg_extern(immutable, parallel_safe)]
fn _check_fhirpath(expression: &str, what: &str) {
    if let Err(e) = crate::fhirpath::compile(expression) {
        let code = if e.contains("needs a FHIR server") {
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
        } else {
            PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION
        };
        UserError::new(code, format!("invalid fhirPathCriteria for {what}: {e}"))
            .detail(format!("The criteria: {expression}"))
            .hint("A FHIRPath boolean expression over the resource, with %current and %previous, e.g. \"status = 'completed'\".")
            .raise()
    }
}
