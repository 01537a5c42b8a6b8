//! Targets: where a changed relation's events come from, read from the
//! catalog rather than from the trigger's arguments so that they follow
//! renames and a primary key added later: the watched table (for a
//! partition, the partitioned table the topic watches) by its current name,
//! and the relation's primary-key columns. Cached per (topic, relation) and
//! forgotten at any relcache or namespace invalidation. See
//! docs/architecture.md.

use super::routes::Route;
use super::STATE;
use pgrx::prelude::*;
use std::rc::Rc;

/// Where a changed relation's events come from: the watched table (for a
/// partition, its partitioned table) by its current name, and the
/// relation's current primary key. Cached per (topic, relation) until a
/// relcache or namespace invalidation.
pub(super) struct Target {
    pub(super) watched: pg_sys::Oid,
    pub(super) name: Rc<str>,
    /// The primary key's columns, in index order (empty: no primary key).
    pub(super) key: Vec<i32>,
}

thread_local! {
    /// Relcache and namespace invalidations this backend has seen: targets
    /// cached before the last one may name a table or key that changed.
    static INVALIDATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    INVALIDATIONS.with(|n| n.set(n.get() + 1));
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn on_namespace(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    INVALIDATIONS.with(|n| n.set(n.get() + 1));
}

/// The target of a change of `rel` for `topic`, cached until an invalidation.
pub(super) fn of(topic: i32, route: &Route, rel: pg_sys::Relation) -> Rc<Target> {
    let relid = unsafe { (*rel).rd_id };
    let epoch = INVALIDATIONS.with(std::cell::Cell::get);
    let cached = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.targets_epoch != epoch {
            s.targets.clear();
            s.targets_epoch = epoch;
        }
        s.targets.get(&(topic, relid)).cloned()
    });
    if let Some(t) = cached {
        return t;
    }
    // A partition reports the partitioned table the topic watches.
    let watched = if route.tables.contains_key(&relid) {
        relid
    } else {
        unsafe { partition_ancestors(relid) }.into_iter().find(|a| route.tables.contains_key(a)).unwrap_or(relid)
    };
    let t =
        Rc::new(Target { watched, name: unsafe { qualified_name(watched) }.into(), key: unsafe { primary_key(rel) } });
    // Not if the lookups above took in an invalidation: it may be about them.
    if INVALIDATIONS.with(std::cell::Cell::get) == epoch {
        STATE.with(|s| s.borrow_mut().targets.insert((topic, relid), t.clone()));
    }
    t
}

unsafe extern "C-unwind" {
    // catalog/partition.h, which pgrx does not bind.
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
}

/// The partitioned tables above `relid`, nearest first.
unsafe fn partition_ancestors(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    unsafe {
        let list = pg_sys::ffi::pg_guard_ffi_boundary(|| get_partition_ancestors(relid));
        let oids = oid_list(list);
        pg_sys::list_free(list);
        oids
    }
}

unsafe fn oid_list(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    if list.is_null() {
        return Vec::new();
    }
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect() }
}

/// `schema.table`, unquoted, as the catalog has it.
unsafe fn qualified_name(relid: pg_sys::Oid) -> String {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            "?".into()
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    unsafe {
        let schema = text(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid)));
        format!("{schema}.{}", text(pg_sys::get_rel_name(relid)))
    }
}

/// The relation's primary-key columns, in index order (empty without one).
unsafe fn primary_key(rel: pg_sys::Relation) -> Vec<i32> {
    unsafe {
        let indexes = pg_sys::RelationGetIndexList(rel);
        let mut key = Vec::new();
        for index in oid_list(indexes) {
            let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::INDEXRELID as i32, index.into());
            if tuple.is_null() {
                continue;
            }
            let form = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_index);
            if form.indisprimary {
                key = form.indkey.values.as_slice(form.indnkeyatts as usize).iter().map(|&a| i32::from(a)).collect();
            }
            pg_sys::ReleaseSysCache(tuple);
            if !key.is_empty() {
                break;
            }
        }
        pg_sys::list_free(indexes);
        key
    }
}
