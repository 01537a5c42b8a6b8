//! What the trigger reads from the changed tuple itself: the Kafka key
//! (the primary key's text form) and, for a table in Aidbox's layout, the
//! FHIR resource as Aidbox would send it. Any other row becomes JSON in
//! `crate::rowjson`, as `row_to_json` prints it. See docs/architecture.md.

use pgrx::pg_sys;

/// Types whose text form is a JSON number or boolean as it is.
fn json_bare(type_oid: pg_sys::Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::NUMERICOID,
        pg_sys::FLOAT4OID,
        pg_sys::FLOAT8OID,
        pg_sys::OIDOID,
    ]
    .contains(&type_oid)
}

/// The Kafka key: the primary key's text form; a JSON array for several
/// columns (`key`: their attribute numbers).
pub(super) unsafe fn row_key(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, key: &[i32]) -> Option<String> {
    let value = |attnum: i32| unsafe { crate::rowjson::column_text(tuple, desc, attnum) };
    match key {
        [] => None,
        [one] => value(*one).0,
        many => {
            let parts: Vec<String> = many
                .iter()
                .map(|c| match value(*c) {
                    (None, _) => "null".to_string(),
                    (Some(t), oid) if json_bare(oid) => t,
                    (Some(t), oid) if oid == pg_sys::BOOLOID => (t == "t").to_string(),
                    (Some(t), _) => serde_json::to_string(&t).expect("string"),
                })
                .collect();
            Some(format!("[{}]", parts.join(", ")))
        }
    }
}

/// A column's text form, by name (None if NULL or absent).
unsafe fn column_text(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, name: &std::ffi::CStr) -> Option<String> {
    let attnum = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
    if attnum <= 0 {
        return None;
    }
    unsafe { crate::rowjson::column_text(tuple, desc, attnum) }.0
}

/// A timestamp column as ISO 8601 UTC with microseconds, like Aidbox's
/// meta.lastUpdated.
unsafe fn column_instant(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, name: &std::ffi::CStr) -> Option<String> {
    let attnum = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
    if attnum <= 0 {
        return None;
    }
    let type_oid = unsafe { pg_sys::SPI_gettypeid(desc, attnum) };
    if type_oid != pg_sys::TIMESTAMPTZOID && type_oid != pg_sys::TIMESTAMPOID {
        return None;
    }
    let mut is_null = false;
    let datum = unsafe { pg_sys::SPI_getbinval(tuple, desc, attnum, &mut is_null) };
    let us = datum.value() as i64;
    // 'infinity' and '-infinity' have no instant.
    (!is_null && us != i64::MAX && us != i64::MIN).then(|| crate::status::format_ts_digits(us, 6))
}

/// A row of a table in Aidbox's layout as the FHIR resource Aidbox would
/// send: `resource` with `resourceType`, `id` and `meta.versionId` (txid) /
/// `meta.lastUpdated` (ts) merged into its own `meta`. Every other value is
/// kept byte for byte as jsonb prints it (numbers are not re-encoded).
pub(super) unsafe fn fhir_resource(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, resource_type: &str) -> String {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    type Raw = Box<RawValue>;
    let raw = |v: &str| RawValue::from_string(serde_json::to_string(v).expect("a string serializes")).expect("JSON");
    let body = unsafe { column_text(tuple, desc, c"resource") }.unwrap_or_else(|| "{}".into());
    let id = unsafe { column_text(tuple, desc, c"id") };
    let Ok(mut resource) = serde_json::from_str::<BTreeMap<String, Raw>>(&body) else {
        // Not an object we can read (too deeply nested, say): send it as stored.
        return body;
    };
    resource.insert("resourceType".into(), raw(resource_type));
    if let Some(id) = &id {
        resource.insert("id".into(), raw(id));
    }
    let mut meta: BTreeMap<String, Raw> = match resource.remove("meta") {
        Some(m) => match serde_json::from_str(m.get()) {
            Ok(m) => m,
            Err(_) => {
                resource.insert("meta".into(), m); // not an object: leave it
                return serde_json::to_string(&resource).expect("raw values serialize");
            }
        },
        None => BTreeMap::new(),
    };
    if let Some(txid) = unsafe { column_text(tuple, desc, c"txid") } {
        meta.insert("versionId".into(), raw(&txid));
    }
    if let Some(ts) = unsafe { column_instant(tuple, desc, c"ts") } {
        meta.insert("lastUpdated".into(), raw(&ts));
    }
    if !meta.is_empty() {
        let meta = serde_json::to_string(&meta).expect("raw values serialize");
        resource.insert("meta".into(), RawValue::from_string(meta).expect("JSON"));
    }
    serde_json::to_string(&resource).expect("raw values serialize")
}
