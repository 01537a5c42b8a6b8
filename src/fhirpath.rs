//! FHIRPath criteria (Aidbox's `fhirPathCriteria`), evaluated with the
//! `rh-fhirpath` crate against the changed resource, with `%current` and
//! `%previous` bound (an empty collection where there is none: `%previous` on
//! create, `%current` on delete). No Postgres calls here.

use rh_fhirpath::evaluator::FunctionRegistry;
use rh_fhirpath::{EvaluationContext, FhirPathEvaluator, FhirPathExpression, FhirPathParser, FhirPathValue};
use serde_json::Value;

/// Functions that need a FHIR server or a terminology service: refused when a
/// topic is created rather than evaluated to nothing.
const NEEDS_SERVER: &[&str] = &[
    "resolve",
    "memberOf",
    "conformsTo",
    "subsumes",
    "subsumedBy",
    "htmlChecks",
    "expand",
    "lookup",
    "validateVS",
    "validateCS",
    "translate",
];

/// Functions the evaluator handles itself rather than through its registry.
const EVALUATOR_FUNCTIONS: &[&str] = &[
    "where",
    "select",
    "repeat",
    "ofType",
    "is",
    "as",
    "trace",
    "aggregate",
    "iif",
    "sort",
    "exists",
    "all",
    "first",
    "last",
    "tail",
    "skip",
];

/// Environment variables a criteria may use.
const VARIABLES: &[&str] = &["current", "previous", "context", "resource", "rootResource", "ucum"];

/// A checked, compiled criteria.
pub struct Criteria {
    expr: FhirPathExpression,
}

impl std::fmt::Debug for Criteria {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Criteria")
    }
}

thread_local! {
    static EVALUATOR: FhirPathEvaluator = FhirPathEvaluator::new();
}

/// Function names and `%variables` used anywhere in the expression (read off
/// its serialized syntax tree).
fn names(tree: &Value, functions: &mut Vec<String>, variables: &mut Vec<String>) {
    match tree {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("Function", Value::Object(f)) => {
                        if let Some(Value::String(n)) = f.get("name") {
                            functions.push(n.clone());
                        }
                    }
                    ("ExternalConstant", Value::String(n)) => variables.push(n.clone()),
                    _ => {}
                }
                names(v, functions, variables);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| names(v, functions, variables)),
        _ => {}
    }
}

/// Parse and check a criteria: syntax, functions this evaluator knows and
/// that need no server, variables it binds.
pub fn compile(source: &str) -> Result<Criteria, String> {
    let expr = FhirPathParser::new().parse(source).map_err(|e| format!("invalid FHIRPath: {e}"))?;
    let tree = serde_json::to_value(&expr).map_err(|e| format!("invalid FHIRPath: {e}"))?;
    let (mut functions, mut variables) = (Vec::new(), Vec::new());
    names(&tree, &mut functions, &mut variables);
    let registry = FunctionRegistry::new();
    for f in &functions {
        if NEEDS_SERVER.contains(&f.as_str()) {
            return Err(format!(
                "{f}() needs a FHIR server (to fetch resources or ask a terminology service), which pg_outbox is not"
            ));
        }
        if !EVALUATOR_FUNCTIONS.contains(&f.as_str()) && registry.get_function(f).is_none() {
            return Err(format!("unknown FHIRPath function {f}()"));
        }
    }
    if let Some(v) = variables.iter().find(|v| !VARIABLES.contains(&v.as_str())) {
        return Err(format!("unknown FHIRPath variable %{v} (use %current and %previous)"));
    }
    Ok(Criteria { expr })
}

fn bind(v: Option<&Value>) -> FhirPathValue {
    v.map(FhirPathValue::from_json).unwrap_or(FhirPathValue::Empty)
}

impl Criteria {
    /// True when the criteria holds: a single `true`. Empty, `false`, or
    /// anything else does not match.
    pub fn matches(&self, current: Option<&Value>, previous: Option<&Value>) -> Result<bool, String> {
        let root = current.cloned().unwrap_or(Value::Null);
        let mut ctx = EvaluationContext::new(root);
        ctx.add_constant("current".into(), bind(current));
        ctx.add_constant("previous".into(), bind(previous));
        let out = EVALUATOR.with(|e| e.evaluate(&self.expr, &ctx)).map_err(|e| e.to_string())?;
        let one_true = |v: &FhirPathValue| {
            matches!(v, FhirPathValue::Boolean(true) | FhirPathValue::TypedBoolean { value: true, .. })
        };
        Ok(match &out {
            FhirPathValue::Collection(items) => items.len() == 1 && one_true(&items[0]),
            other => one_true(other),
        })
    }
}
