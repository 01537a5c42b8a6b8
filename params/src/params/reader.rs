//! Reading one parameter's value as its spec says: type, range, allowed
//! values, default. Messages name the parameter and the JSON type, and quote
//! only integers and enum values, never a text value (it may be a secret).

use super::spec::{self, Kind, Needs, SPECS};
use super::{perr, ParamError};
use serde_json::{Map, Value};

/// The JSON type of a value, for messages that must not show it.
pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A destination's parameters (as an object), read by name.
pub(super) struct Reader<'a> {
    pub obj: &'a Map<String, Value>,
    pub dest: &'a str,
}

impl Reader<'_> {
    /// Given, and not null (null is how a patch removes a parameter).
    fn given(&self, name: &str) -> bool {
        self.obj.get(name).is_some_and(|v| !v.is_null())
    }

    /// A text parameter (valueString).
    pub fn text(&self, name: &str) -> Result<Option<String>, ParamError> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be a string, not {}",
                    self.dest,
                    type_name(other)
                ),
                format!("Write it as a JSON string (valueString), e.g. \"{name}\": \"...\"."),
            )),
        }
    }

    /// A required text parameter.
    pub fn required(&self, name: &str) -> Result<String, ParamError> {
        let Kind::Required { hint } = spec::get(name).kind else { unreachable!("\"{name}\" is not required") };
        self.text(name)?.ok_or_else(|| perr(format!("destination \"{}\" needs parameter \"{name}\"", self.dest), hint))
    }

    /// An integer parameter within its range, or its default.
    pub fn integer(&self, name: &str) -> Result<i64, ParamError> {
        let Kind::Integer { min, max, default } = spec::get(name).kind else {
            unreachable!("\"{name}\" is not an integer")
        };
        let raw = match self.obj.get(name) {
            None | Some(Value::Null) => return Ok(default),
            Some(v) => v,
        };
        let v = match raw {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            Some(v) => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be between {min} and {max}, not {v}",
                    self.dest
                ),
                format!("E.g. \"{name}\": {}.", min.max(1)),
            )),
            None => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be an integer, not {}",
                    self.dest,
                    type_name(raw)
                ),
                format!("Write it as a JSON integer (valueInteger), e.g. \"{name}\": {}.", min.max(1)),
            )),
        }
    }

    /// One of a parameter's values (case-insensitive), as the spec spells it,
    /// or its default.
    pub fn one_of(&self, name: &str) -> Result<&'static str, ParamError> {
        let Kind::OneOf { values, default } = spec::get(name).kind else { unreachable!("\"{name}\" is not an enum") };
        let Some(v) = self.text(name)? else { return Ok(default) };
        values.iter().find(|a| a.eq_ignore_ascii_case(v.trim())).copied().ok_or_else(|| {
            perr(
                format!("invalid {name} \"{v}\" for destination \"{}\"", self.dest),
                format!("Use one of {}.", values.join(", ")),
            )
        })
    }

    /// Refuse the first given parameter that needs a protocol this
    /// destination does not use.
    pub fn refuse_without(&self, needs: Needs) -> Result<(), ParamError> {
        let (protocols, hint) = match needs {
            Needs::Any => return Ok(()),
            Needs::Sasl => (
                "SASL_SSL or SASL_PLAINTEXT",
                "Set \"securityProtocol\": \"SASL_SSL\" (Java would ignore the SASL settings; pg_outbox refuses to).",
            ),
            Needs::Tls => ("SSL or SASL_SSL", "Set \"securityProtocol\": \"SSL\" (or SASL_SSL)."),
        };
        let Some(s) = SPECS.iter().find(|s| s.needs == needs && self.given(s.name)) else { return Ok(()) };
        Err(perr(
            format!("parameter \"{}\" of destination \"{}\" needs securityProtocol {protocols}", s.name, self.dest),
            hint,
        ))
    }
}
