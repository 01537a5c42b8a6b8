//! Rows as JSON text, byte for byte as `row_to_json(row)` prints them, for
//! the capture trigger. `row_to_json` looks up every column's type category
//! and output function again for every row (about two thirds of the
//! trigger's time on a 100-row INSERT); here a plan per table (each column's
//! JSON name and how its value is printed) is kept per backend and checked
//! against the row's descriptor (names, types, dropped columns) each time.
//!
//! Printed here: booleans, integers, float/numeric (bare when a valid JSON
//! number, else a string, as `row_to_json` does), text types, json, jsonb
//! and every other built-in scalar type through its output function (run
//! each time: bytea_output, IntervalStyle and the like apply). A row with a
//! column whose JSON form needs more (dates and timestamps, arrays,
//! composites, and types that are not built in, which may have a cast to
//! json) is printed by `row_to_json` itself, as is every row in a database
//! whose encoding is not UTF8 (the trigger's strings are Rust strings).
//! A plan is dropped when its relation's cache entry is invalidated.

use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// How one column's value is printed.
enum How {
    Bool,
    Int2,
    Int4,
    Int8,
    /// float4, float8, numeric: the output as it is when it is a valid JSON
    /// number, else as a string (NaN, Infinity).
    Number(Output),
    /// text, varchar, bpchar: the stored bytes, as a string.
    Text,
    /// json: the stored text as it is.
    Json,
    /// jsonb: the output as it is.
    Raw(Output),
    /// Any other built-in scalar type: the output, as a string.
    Escaped(Output),
}

struct Column {
    /// `"name":`, escaped.
    label: Vec<u8>,
    /// None for a dropped column.
    how: Option<How>,
}

/// A table's plan, for the columns it was made for.
struct Plan {
    /// (name, type, dropped) of each column.
    shape: Vec<(Vec<u8>, pg_sys::Oid, bool)>,
    /// None when its rows go through `row_to_json`.
    columns: Option<Vec<Column>>,
    /// Where its output functions keep what they cache (range_out, say).
    context: pg_sys::MemoryContext,
}

impl Drop for Plan {
    fn drop(&mut self) {
        self.columns = None;
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

thread_local! {
    static PLANS: RefCell<HashMap<pg_sys::Oid, Rc<Plan>>> = RefCell::new(HashMap::new());
    /// Output functions of built-in types (which never change), for keys.
    static OUTPUTS: RefCell<HashMap<pg_sys::Oid, Rc<Output>>> = RefCell::new(HashMap::new());
}

/// Column `i` (from 0) of the descriptor. PostgreSQL 18 put compact
/// attributes before them, reached through TupleDescAttr (a C inline, pgrx's
/// cshim).
unsafe fn attribute<'a>(desc: pg_sys::TupleDesc, i: usize) -> &'a pg_sys::FormData_pg_attribute {
    #[cfg(feature = "pg18")]
    return unsafe { &*pg_sys::TupleDescAttr(desc, i as i32) };
    #[cfg(not(feature = "pg18"))]
    return unsafe { &(*desc).attrs.as_slice((*desc).natts as usize)[i] };
}

/// The descriptor's columns, in order.
unsafe fn attributes<'a>(desc: pg_sys::TupleDesc) -> impl Iterator<Item = &'a pg_sys::FormData_pg_attribute> {
    (0..unsafe { (*desc).natts } as usize).map(move |i| unsafe { attribute(desc, i) })
}

/// The descriptor's columns as (name, type, dropped); the names borrow from
/// `desc`, which must outlive `'a`.
unsafe fn shape<'a>(desc: pg_sys::TupleDesc) -> impl Iterator<Item = (&'a [u8], pg_sys::Oid, bool)> {
    unsafe { attributes(desc) }.map(|a| {
        let name = unsafe { std::ffi::CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes();
        (name, a.atttypid, a.attisdropped)
    })
}

/// A type's output function, looked up once. Called through a pointer: some
/// (range_out, array_out) cache their own lookups in it.
struct Output(Box<std::cell::UnsafeCell<pg_sys::FmgrInfo>>);

impl Output {
    fn of(type_oid: pg_sys::Oid, context: pg_sys::MemoryContext) -> Output {
        let (mut func, mut varlena) = (pg_sys::Oid::INVALID, false);
        let info = Box::new(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed() }));
        unsafe {
            pg_sys::getTypeOutputInfo(type_oid, &mut func, &mut varlena);
            pg_sys::fmgr_info_cxt(func, info.get(), context);
        }
        Output(info)
    }

    /// The value's text, for `f`.
    unsafe fn call(&self, value: pg_sys::Datum, f: impl FnOnce(&[u8])) {
        unsafe {
            let text = pg_sys::OutputFunctionCall(self.0.get(), value);
            f(std::ffi::CStr::from_ptr(text).to_bytes());
            pg_sys::pfree(text.cast());
        }
    }
}

/// How `row_to_json` prints a column of this type, when an output function
/// is all it takes (see json_categorize_type in Postgres's json.c).
fn how(type_oid: pg_sys::Oid, context: pg_sys::MemoryContext) -> Option<How> {
    let base = unsafe { pg_sys::getBaseType(type_oid) };
    let output = || Output::of(base, context);
    Some(match base {
        pg_sys::BOOLOID => How::Bool,
        pg_sys::INT2OID => How::Int2,
        pg_sys::INT4OID => How::Int4,
        pg_sys::INT8OID => How::Int8,
        pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::NUMERICOID => How::Number(output()),
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => How::Text,
        pg_sys::JSONOID => How::Json,
        pg_sys::JSONBOID => How::Raw(output()),
        pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => return None,
        _ if u32::from(base) >= pg_sys::FirstNormalObjectId => return None,
        _ if unsafe { pg_sys::get_element_type(base) } != pg_sys::Oid::INVALID => return None,
        _ if unsafe { pg_sys::type_is_rowtype(base) } => return None,
        pg_sys::ANYARRAYOID | pg_sys::ANYCOMPATIBLEARRAYOID | pg_sys::RECORDARRAYOID => return None,
        _ => How::Escaped(output()),
    })
}

fn columns(desc: pg_sys::TupleDesc, context: pg_sys::MemoryContext) -> Option<Vec<Column>> {
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        return None;
    }
    let mut columns = Vec::new();
    for (name, type_oid, dropped) in unsafe { shape(desc) } {
        let mut label = Vec::with_capacity(name.len() + 3);
        escape(&mut label, name);
        label.push(b':');
        let how = if dropped { None } else { Some(how(type_oid, context)?) };
        columns.push(Column { label, how });
    }
    Some(columns)
}

/// The cached plan for this relation, made again when its columns changed.
fn plan_for(relid: pg_sys::Oid, desc: pg_sys::TupleDesc) -> Rc<Plan> {
    let cached = PLANS.with(|p| p.borrow().get(&relid).cloned());
    if let Some(plan) = cached {
        let same = unsafe { (*desc).natts } as usize == plan.shape.len()
            && unsafe { shape(desc) }
                .zip(&plan.shape)
                .all(|((n, t, d), (cn, ct, cd))| n == cn.as_slice() && t == *ct && d == *cd);
        if same {
            return plan;
        }
    }
    let shape = unsafe { shape(desc) }.map(|(n, t, d)| (n.to_vec(), t, d)).collect();
    let context = unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"pg_outbox row JSON plan".as_ptr(),
            0,
            1024,
            8192,
        )
    };
    // Made before the entry is taken: the lookups may raise an ERROR.
    let mut plan = Plan { shape, columns: None, context };
    plan.columns = columns(desc, context);
    let plan = Rc::new(plan);
    PLANS.with(|p| p.borrow_mut().insert(relid, plan.clone()));
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0)) });
    plan
}

/// A relation's cache entry was invalidated (altered, dropped; InvalidOid:
/// all of them): its plan goes too. The shape check stays as the guard.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    PLANS.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if relid == pg_sys::Oid::INVALID {
                p.clear();
            } else {
                p.remove(&relid);
            }
        }
    });
}

/// `"s"` with `s` escaped as Postgres's escape_json does.
pub fn escape(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    escape_contents(out, s);
    out.push(b'"');
}

/// `s` escaped as Postgres's escape_json does, without the quotes (the
/// same bytes as serde_json writes: `\b \t \n \f \r \" \\`, other control
/// characters as lowercase `\u00xx`, nothing else escaped). Escaping goes
/// character by character, so parts of a string may be escaped one by one.
pub fn escape_contents(out: &mut Vec<u8>, s: &[u8]) {
    let plain = |b: &u8| *b >= 0x20 && *b != b'"' && *b != b'\\';
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        // Skip 16 plain bytes at a time (no early exit: the compiler vectorizes it).
        if let Some(chunk) = s.get(i..i + 16) {
            if chunk.iter().fold(true, |all, b| all & plain(b)) {
                i += 16;
                continue;
            }
        }
        let b = s[i];
        i += 1;
        if plain(&b) {
            continue;
        }
        out.extend_from_slice(&s[start..i - 1]);
        start = i;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
        }
    }
    out.extend_from_slice(&s[start..]);
}

/// A JSON number as Postgres's IsValidJsonNumber accepts it:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
pub fn is_json_number(s: &[u8]) -> bool {
    let mut i = usize::from(s.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while s.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == s.len()
}

/// A varlena's bytes (detoasted), for `f`.
unsafe fn varlena_bytes(value: pg_sys::Datum, f: impl FnOnce(&[u8])) {
    unsafe {
        let raw = value.cast_mut_ptr::<pg_sys::varlena>();
        let plain = pg_sys::pg_detoast_datum_packed(raw);
        f(pgrx::varlena::varlena_to_byte_slice(plain));
        if plain != raw {
            pg_sys::pfree(plain.cast());
        }
    }
}

/// Column `attnum`'s text (its type's output function), as SPI_getvalue
/// gives it, and its type; None if NULL.
///
/// # Safety
/// `tuple` is a valid heap tuple described by `desc`; `attnum` one of its columns.
pub unsafe fn column_text(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    attnum: i32,
) -> (Option<String>, pg_sys::Oid) {
    let type_oid = unsafe { attribute(desc, attnum as usize - 1) }.atttypid;
    if u32::from(type_oid) >= pg_sys::FirstNormalObjectId {
        let text = unsafe { pg_sys::SPI_getvalue(tuple, desc, attnum) };
        let text = (!text.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned());
        return (text, type_oid);
    }
    let mut null = false;
    let value = unsafe { pg_sys::heap_getattr(tuple, attnum, desc, &mut null) };
    if null {
        return (None, type_oid);
    }
    let output = match OUTPUTS.with(|o| o.borrow().get(&type_oid).cloned()) {
        Some(output) => output,
        None => {
            // Looked up before the entry is taken: the lookup may raise an ERROR.
            let output = Rc::new(Output::of(type_oid, unsafe { pg_sys::TopMemoryContext }));
            OUTPUTS.with(|o| o.borrow_mut().insert(type_oid, output.clone()));
            output
        }
    };
    let mut text = None;
    unsafe { output.call(value, |s| text = Some(String::from_utf8_lossy(s).into_owned())) };
    (text, type_oid)
}

/// The row of `relid` as `row_to_json` prints it.
///
/// # Safety
/// `tuple` is a valid heap tuple described by `desc`, a descriptor of `relid`.
pub unsafe fn row_json(relid: pg_sys::Oid, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> String {
    let plan = plan_for(relid, desc);
    let Some(columns) = &plan.columns else {
        return unsafe { row_to_json(tuple, desc) };
    };
    let n = columns.len();
    let mut values = vec![pg_sys::Datum::from(0); n];
    let mut nulls = vec![false; n];
    unsafe { pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr()) };
    let mut out = Vec::with_capacity(unsafe { (*tuple).t_len } as usize + 16 * n);
    out.push(b'{');
    let mut first = true;
    for ((column, &value), &null) in columns.iter().zip(&values).zip(&nulls) {
        let Some(how) = &column.how else { continue };
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.extend_from_slice(&column.label);
        if null {
            out.extend_from_slice(b"null");
            continue;
        }
        use std::io::Write;
        match how {
            How::Bool => out.extend_from_slice(if value.value() != 0 { b"true" } else { b"false" }),
            How::Int2 => write!(out, "{}", value.value() as i16).expect("a Vec takes it"),
            How::Int4 => write!(out, "{}", value.value() as i32).expect("a Vec takes it"),
            How::Int8 => write!(out, "{}", value.value() as i64).expect("a Vec takes it"),
            How::Number(output) => unsafe {
                output.call(value, |s| if is_json_number(s) { out.extend_from_slice(s) } else { escape(&mut out, s) })
            },
            How::Text => unsafe { varlena_bytes(value, |s| escape(&mut out, s)) },
            How::Json => unsafe { varlena_bytes(value, |s| out.extend_from_slice(s)) },
            How::Raw(output) => unsafe { output.call(value, |s| out.extend_from_slice(s)) },
            How::Escaped(output) => unsafe { output.call(value, |s| escape(&mut out, s)) },
        }
    }
    out.push(b'}');
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// For tests: whether rows of `relid` are printed here (Some(true)) or by
/// `row_to_json` (Some(false)); None when no plan is cached.
#[cfg(any(test, feature = "pg_test"))]
pub fn printed_here(relid: pg_sys::Oid) -> Option<bool> {
    PLANS.with(|p| p.borrow().get(&relid).map(|plan| plan.columns.is_some()))
}

/// Postgres's own `row_to_json`.
unsafe fn row_to_json(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> String {
    use pgrx::FromDatum;
    unsafe {
        let composite = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let json = pgrx::fcinfo::direct_function_call_as_datum(pg_sys::row_to_json, &[Some(composite)])
            .expect("row_to_json returns a value");
        String::from_datum(json, false).expect("json text")
    }
}
