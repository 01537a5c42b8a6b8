//! saslMechanism, saslJaasConfig, saslClientCallbackHandlerClass: which
//! mechanism, and from the JAAS entry either librdkafka's credentials
//! (PLAIN, SCRAM) or the source of the tokens the worker makes (OAUTHBEARER:
//! AWS MSK IAM, Kafka's unsecured JWTs).
//!
//! Messages name JAAS options through `jaas::shown`, never their values.

use super::reader::Reader;
use super::spec::Needs;
use super::{perr, set, unsupported, ParamError};
use crate::jaas::{self, Jaas};
use crate::oauth::{self, TokenSource, Unsecured};
use serde_json::Value;

/// The MSK IAM callback handlers (Java class names) we implement.
const MSK_HANDLERS: &[&str] = &[
    "software.amazon.msk.auth.iam.IAMClientCallbackHandler",
    "software.amazon.msk.auth.iam.IAMOAuthBearerLoginCallbackHandler",
];
const MSK_LOGIN_MODULE: &str = "software.amazon.msk.auth.iam.IAMLoginModule";
const PLAIN_MODULE: &str = "org.apache.kafka.common.security.plain.PlainLoginModule";
const SCRAM_MODULE: &str = "org.apache.kafka.common.security.scram.ScramLoginModule";
const OAUTH_MODULE: &str = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule";

/// Configure SASL when `sasl` (the protocol is SASL_*); the token source when
/// the worker makes the tokens.
pub(super) fn configure(
    r: &Reader<'_>,
    sasl: bool,
    hosts: &[(String, u16)],
    props: &mut Vec<(String, String)>,
) -> Result<Option<TokenSource>, ParamError> {
    let dest = r.dest;
    // Read (and so type-check) all three before anything else is said.
    let mechanism = r.one_of("saslMechanism")?;
    let jaas_text = r.text("saslJaasConfig")?;
    let handler = r.text("saslClientCallbackHandlerClass")?;
    if !sasl {
        r.refuse_without(Needs::Sasl)?;
        return Ok(None);
    }
    if mechanism == "GSSAPI" {
        return Err(unsupported(
            format!("saslMechanism GSSAPI (Kerberos) of destination \"{dest}\" is not built into pg_outbox"),
            "Set saslMechanism to PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or AWS_MSK_IAM (Java's default is GSSAPI).",
        ));
    }
    let jaas = match &jaas_text {
        None => None,
        Some(text) => Some(jaas::parse(text).map_err(|e| {
            perr(
                format!("invalid saslJaasConfig for destination \"{dest}\": {e}"),
                "Kafka's JAAS syntax: LoginModuleClass required key=\"value\" ...; with a terminating semicolon.",
            )
        })?),
    };
    let msk_handler = msk_handler(dest, handler.as_deref())?;
    let login = Login { dest, mechanism, jaas: jaas.as_ref() };
    let msk = mechanism == "AWS_MSK_IAM"
        || (mechanism == "OAUTHBEARER" && (msk_handler || login.module() == Some(MSK_LOGIN_MODULE)));
    if msk {
        let source = msk_iam(&login, hosts)?;
        set(props, "sasl.mechanism", "OAUTHBEARER");
        return Ok(Some(source));
    }
    set(props, "sasl.mechanism", mechanism);
    match mechanism {
        "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
            credentials(&login, props)?;
            Ok(None)
        }
        _ => unsecured_jwt(&login).map(|u| Some(TokenSource::Unsecured(u))),
    }
}

/// Whether `handler` is an MSK IAM callback handler; any other is refused.
fn msk_handler(dest: &str, handler: Option<&str>) -> Result<bool, ParamError> {
    match handler {
        None => Ok(false),
        Some(h) if MSK_HANDLERS.contains(&h) => Ok(true),
        Some(h) => Err(unsupported(
            format!("saslClientCallbackHandlerClass \"{h}\" of destination \"{dest}\" is not supported"),
            format!("There is no Java here; the handlers pg_outbox implements: {}.", MSK_HANDLERS.join(", ")),
        )),
    }
}

/// The mechanism and the JAAS entry it goes with.
struct Login<'a> {
    dest: &'a str,
    mechanism: &'static str,
    jaas: Option<&'a Jaas>,
}

impl<'a> Login<'a> {
    fn module(&self) -> Option<&'a str> {
        self.jaas.map(|j| j.module.as_str())
    }

    fn wrong_module(&self, expected: &str) -> ParamError {
        perr(
            format!(
                "saslJaasConfig of destination \"{}\" uses login module {} but saslMechanism {} needs {expected}",
                self.dest,
                self.module().unwrap_or("(none)"),
                self.mechanism
            ),
            format!("Use {expected} required ...; in saslJaasConfig."),
        )
    }

    /// The JAAS entry, which must name `expected` as its module; `example`
    /// shows its options in the hint when there is none.
    fn require(&self, expected: &str, example: &str) -> Result<&'a Jaas, ParamError> {
        match self.jaas {
            None => Err(perr(
                format!(
                    "destination \"{}\" uses saslMechanism {} but has no saslJaasConfig",
                    self.dest, self.mechanism
                ),
                format!("Add \"saslJaasConfig\": \"{expected} required {example};\"."),
            )),
            Some(j) if j.module != expected => Err(self.wrong_module(expected)),
            Some(j) => Ok(j),
        }
    }

    fn options(&self) -> impl Iterator<Item = &'a (String, String)> {
        self.jaas.into_iter().flat_map(|j| j.options.iter())
    }

    fn unknown_option(&self, module: &str, key: &str, hint: &str) -> ParamError {
        perr(
            format!(
                "unknown option {} for {module} in saslJaasConfig of destination \"{}\"",
                jaas::shown(key),
                self.dest
            ),
            hint,
        )
    }

    fn unsupported_option(&self, key: &str, hint: &str) -> ParamError {
        unsupported(
            format!("saslJaasConfig option {} of destination \"{}\" is not supported", jaas::shown(key), self.dest),
            hint,
        )
    }
}

/// AWS MSK IAM: the region from the brokers' names (or the environment),
/// the credentials' profile from the JAAS options.
fn msk_iam(login: &Login<'_>, hosts: &[(String, u16)]) -> Result<TokenSource, ParamError> {
    let module = login.module();
    if module.is_some() && module != Some(MSK_LOGIN_MODULE) && module != Some(OAUTH_MODULE) {
        return Err(login.wrong_module(MSK_LOGIN_MODULE));
    }
    let mut profile = None;
    for (k, v) in login.options() {
        match k.as_str() {
            "awsProfileName" => profile = Some(v.clone()),
            "awsDebugCreds" | "awsMaxRetries" | "awsMaxBackOffTimeMs" => {}
            "awsRoleArn" | "awsRoleSessionName" | "awsStsRegion" | "awsRoleAccessKeyId" | "awsRoleSecretAccessKey"
            | "awsRoleSessionToken" => return Err(login.unsupported_option(
                k,
                "Assuming a role needs a call to AWS STS, which pg_outbox does not make: give the server the role's credentials in its environment or a profile.",
            )),
            _ => return Err(login.unknown_option(
                MSK_LOGIN_MODULE,
                k,
                "IAMLoginModule takes awsProfileName (awsDebugCreds, awsMaxRetries and awsMaxBackOffTimeMs are accepted and ignored).",
            )),
        }
    }
    let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let region = hosts
        .iter()
        .find_map(|(h, _)| oauth::region_of_host(h))
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .ok_or_else(|| {
            perr(
                format!("no AWS region for the MSK IAM destination \"{}\"", login.dest),
                "Use the brokers' MSK host names (…kafka.<region>.amazonaws.com), or set AWS_REGION in the server's environment.",
            )
        })?;
    Ok(TokenSource::MskIam { region, profile })
}

/// PLAIN and SCRAM: the JAAS username and password become librdkafka's.
fn credentials(login: &Login<'_>, props: &mut Vec<(String, String)>) -> Result<(), ParamError> {
    let expected = if login.mechanism == "PLAIN" { PLAIN_MODULE } else { SCRAM_MODULE };
    let j = login.require(expected, r#"username=\"...\" password=\"...\""#)?;
    for (k, v) in &j.options {
        match k.as_str() {
            "username" => set(props, "sasl.username", v.clone()),
            "password" => set(props, "sasl.password", v.clone()),
            "tokenauth" if v.eq_ignore_ascii_case("false") => {}
            "tokenauth" => {
                return Err(unsupported(
                    format!("SCRAM delegation tokens (tokenauth) of destination \"{}\" are not supported", login.dest),
                    "librdkafka has no delegation-token support: use a user's credentials.",
                ))
            }
            _ => return Err(login.unknown_option(expected, k, "It takes username and password.")),
        }
    }
    if j.option("username").is_none() || j.option("password").is_none() {
        return Err(perr(
            format!("saslJaasConfig of destination \"{}\" needs both username and password", login.dest),
            format!("{expected} required username=\"...\" password=\"...\";"),
        ));
    }
    Ok(())
}

/// OAUTHBEARER with Kafka's unsecured JWTs (OIDC needs libcurl, not built).
fn unsecured_jwt(login: &Login<'_>) -> Result<Unsecured, ParamError> {
    let j = login.require(OAUTH_MODULE, r#"unsecuredLoginStringClaim_sub=\"...\""#)?;
    let mut u = Unsecured {
        principal_claim: "sub".into(),
        scope_claim: "scope".into(),
        lifetime_seconds: 3600,
        claims: Vec::new(),
    };
    for (k, v) in &j.options {
        unsecured_option(login, &mut u, k, v)?;
    }
    // The token must name its principal: fail now, not at connect time.
    u.token(0).map_err(|e| {
        perr(
            format!("saslJaasConfig of destination \"{}\": {e}", login.dest),
            "E.g. unsecuredLoginStringClaim_sub=\"pg_outbox\".",
        )
    })?;
    Ok(u)
}

/// One `unsecuredLogin*` option into `u`.
fn unsecured_option(login: &Login<'_>, u: &mut Unsecured, k: &str, v: &str) -> Result<(), ParamError> {
    let claim = |prefix: &str| k.strip_prefix(prefix).filter(|c| !c.is_empty()).map(str::to_string);
    let invalid = |what: &str, example: &str| {
        perr(format!("{} in saslJaasConfig of destination \"{}\" must be {what}", jaas::shown(k), login.dest), example)
    };
    if let Some(c) = claim("unsecuredLoginStringClaim_") {
        u.claims.push((c, Value::String(v.to_string())));
    } else if let Some(c) = claim("unsecuredLoginNumberClaim_") {
        let n: serde_json::Number =
            v.trim().parse().map_err(|_| invalid("a number", "E.g. unsecuredLoginNumberClaim_level=\"3\"."))?;
        u.claims.push((c, Value::Number(n)));
    } else if let Some(c) = claim("unsecuredLoginListClaim_") {
        u.claims.push((c, list_claim(v)));
    } else if k == "unsecuredLoginPrincipalClaimName" {
        u.principal_claim = v.to_string();
    } else if k == "unsecuredLoginScopeClaimName" {
        u.scope_claim = v.to_string();
    } else if k == "unsecuredLoginLifetimeSeconds" {
        u.lifetime_seconds = v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| invalid("a positive integer", "E.g. unsecuredLoginLifetimeSeconds=\"3600\"."))?;
    } else if k.starts_with("unsecuredLoginExtension_") || ["clientId", "clientSecret", "scope"].contains(&k) {
        return Err(login.unsupported_option(
            k,
            "OAUTHBEARER here makes Kafka's unsecured JWTs (unsecuredLogin*Claim_*), or MSK IAM tokens; OIDC client credentials and SASL extensions are not built in.",
        ));
    } else {
        return Err(login.unknown_option(
            OAUTH_MODULE,
            k,
            "It takes unsecuredLoginStringClaim_<name>, unsecuredLoginNumberClaim_<name>, unsecuredLoginListClaim_<name>, unsecuredLoginPrincipalClaimName, unsecuredLoginScopeClaimName, unsecuredLoginLifetimeSeconds.",
        ));
    }
    Ok(())
}

/// A list claim's value: as Java reads it, the first character is the
/// delimiter, and empty items are dropped.
fn list_claim(v: &str) -> Value {
    let mut chars = v.chars();
    let items = match chars.next() {
        Some(d) => chars.as_str().split(d).filter(|s| !s.is_empty()).map(|s| Value::String(s.into())).collect(),
        None => Vec::new(),
    };
    Value::Array(items)
}
