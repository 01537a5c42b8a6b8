//! docs/parameters.md's parameter table says what the spec table says: the
//! same parameters in the same order, and for each what the doc states of
//! its values, librdkafka property, default, protocol and secrecy.

use pg_outbox_params::params::spec::{Kind, Needs, Spec, PASSTHROUGH, SPECS};
use std::collections::BTreeMap;

/// The parameter table's rows, as column name -> cell.
fn rows() -> Vec<BTreeMap<String, String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/parameters.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let cells = |line: &str| -> Vec<String> {
        line.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect()
    };
    let mut lines = text.lines().skip_while(|l| !l.starts_with("| parameter |"));
    let header = cells(lines.next().expect("a table whose first column is \"parameter\""));
    lines.skip(1).take_while(|l| l.starts_with('|')).map(|l| header.iter().cloned().zip(cells(l)).collect()).collect()
}

/// The `backticked` names of a cell, in order.
fn quoted(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The cell's first word, without backticks and trailing punctuation.
fn first_word(cell: &str) -> &str {
    cell.split_whitespace().next().unwrap_or("").trim_matches('`').trim_end_matches([',', ':', ';'])
}

fn check_values(s: &Spec, cell: &str) {
    match s.kind {
        Kind::Text | Kind::Required { .. } => assert!(cell.starts_with("string"), "{}: values {cell:?}", s.name),
        Kind::Integer { min, max, .. } => {
            assert_eq!(cell, format!("integer {min}–{max}"), "{}: values", s.name)
        }
        Kind::OneOf { values, .. } => {
            assert_eq!(cell, format!("`{}`, any case", values.join(" ")), "{}: values", s.name)
        }
    }
}

fn check_property(s: &Spec, cell: &str) {
    let named = quoted(cell);
    match s.property {
        Some(p) => assert_eq!(named.first(), Some(&p), "{}: librdkafka property {cell:?}", s.name),
        None => assert!(
            cell.starts_with("none") || named.is_empty(),
            "{}: maps to no property, the doc says {cell:?}",
            s.name
        ),
    }
    // Every property the cell names is one a parameter decides.
    for n in named {
        assert!(SPECS.iter().any(|o| o.properties().any(|p| p == n)), "{}: no parameter decides {n}", s.name);
    }
}

fn check_default(s: &Spec, cell: &str) {
    let word = first_word(cell);
    match s.kind {
        Kind::Required { .. } => assert_eq!(word, "required", "{}: default {cell:?}", s.name),
        Kind::Integer { default, .. } => assert_eq!(word, default.to_string(), "{}: default {cell:?}", s.name),
        Kind::OneOf { default, .. } => assert_eq!(word, default, "{}: default {cell:?}", s.name),
        Kind::Text => assert!(
            word != "required" && !word.starts_with(|c: char| c.is_ascii_digit()),
            "{}: optional, without a value when not given; the doc says {cell:?}",
            s.name
        ),
    }
}

fn check_differences(s: &Spec, cell: &str) {
    let says = |phrase: &str| cell.contains(phrase);
    assert_eq!(says("Secret"), s.secret, "{}: \"Secret\" in {cell:?}", s.name);
    assert_eq!(says("Needs a `SASL_*` protocol"), s.needs == Needs::Sasl, "{}: {cell:?}", s.name);
    assert_eq!(says("Needs `SSL` or `SASL_SSL`"), s.needs == Needs::Tls, "{}: {cell:?}", s.name);
}

#[test]
fn the_parameter_table_of_the_docs_matches_the_specs() {
    let rows = rows();
    let column = |row: &BTreeMap<String, String>, name: &str| -> String {
        row.get(name).unwrap_or_else(|| panic!("no column \"{name}\" in {row:?}")).clone()
    };
    let names: Vec<String> = rows.iter().map(|r| quoted(&column(r, "parameter"))[0].to_string()).collect();
    let mut expected: Vec<String> = SPECS.iter().map(|s| s.name.to_string()).collect();
    expected.push(format!("{PASSTHROUGH}<property>"));
    assert_eq!(names, expected, "docs/parameters.md lists other parameters than SPECS");
    for (s, row) in SPECS.iter().zip(&rows) {
        let required = matches!(s.kind, Kind::Required { .. });
        assert_eq!(column(row, "parameter").ends_with('*'), required, "{}: * marks a required parameter", s.name);
        check_values(s, &column(row, "values"));
        check_property(s, &column(row, "librdkafka property"));
        check_default(s, &column(row, "our default"));
        check_differences(s, &column(row, "differences"));
    }
}
