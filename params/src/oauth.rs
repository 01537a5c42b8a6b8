//! SASL/OAUTHBEARER tokens the worker makes itself: AWS MSK IAM (a SigV4
//! presigned `kafka-cluster:Connect` URL, as AWS's signer libraries build it)
//! and Kafka's unsecured JWTs (`OAuthBearerLoginModule` with
//! `unsecuredLogin*` options). No Postgres calls: librdkafka asks for a token
//! from the worker's poll.
//!
//! Error messages never contain keys, secrets or tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long an MSK IAM token is valid (X-Amz-Expires), as AWS's signers use.
pub const MSK_TOKEN_SECONDS: u64 = 900;
/// The User-Agent appended to MSK IAM tokens (MSK logs it).
pub const MSK_USER_AGENT: &str = concat!("pg_outbox/", env!("CARGO_PKG_VERSION"));

/// Where a destination's OAUTHBEARER token comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    MskIam { region: String, profile: Option<String> },
    Unsecured(Unsecured),
}

/// Kafka's unsecured JWT options (OAuthBearerUnsecuredLoginCallbackHandler).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Unsecured {
    pub principal_claim: String,
    pub scope_claim: String,
    pub lifetime_seconds: u64,
    /// Claims in the order given: (name, JSON value).
    pub claims: Vec<(String, serde_json::Value)>,
}

/// A token for librdkafka: value, principal, expiry (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub principal: String,
    pub expires_ms: i64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenSource {
    pub fn token(&self) -> Result<Token, String> {
        match self {
            TokenSource::MskIam { region, profile } => {
                let creds = aws_credentials(profile.as_deref())?;
                Ok(msk_iam_token(region, &creds, now_secs(), MSK_USER_AGENT))
            }
            TokenSource::Unsecured(u) => u.token(now_secs()),
        }
    }

    /// What the effective configuration shows for this source (no secrets).
    pub fn describe(&self) -> String {
        match self {
            TokenSource::MskIam { region, profile: None } => format!("aws-msk-iam region={region}"),
            TokenSource::MskIam { region, profile: Some(p) } => format!("aws-msk-iam region={region} profile={p}"),
            TokenSource::Unsecured(u) => format!("unsecured-jwt principalClaimName={}", u.principal_claim),
        }
    }
}

impl Unsecured {
    pub fn token(&self, now: u64) -> Result<Token, String> {
        let mut claims = serde_json::Map::new();
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + self.lifetime_seconds).into());
        for (name, value) in &self.claims {
            claims.insert(name.clone(), value.clone());
        }
        let principal = match claims.get(&self.principal_claim) {
            Some(serde_json::Value::String(p)) if !p.is_empty() => p.clone(),
            _ => {
                return Err(format!(
                    "the unsecured JWT has no string claim \"{}\" to name its principal",
                    self.principal_claim
                ))
            }
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::Value::Object(claims).to_string());
        Ok(Token {
            value: format!("{header}.{body}."),
            principal,
            expires_ms: ((now + self.lifetime_seconds) * 1000) as i64,
        })
    }
}

/// AWS credentials for signing.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The standard AWS chain as far as it needs no network: with a profile named
/// in the JAAS options, that profile; else the environment variables, else
/// the profile `AWS_PROFILE` (or `default`) from the shared files.
pub fn aws_credentials(profile: Option<&str>) -> Result<Credentials, String> {
    if profile.is_none() {
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: env("AWS_SESSION_TOKEN"),
            });
        }
    }
    let name = profile.map(str::to_string).or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".into());
    let home = env("HOME").unwrap_or_default();
    let files = [
        (env("AWS_SHARED_CREDENTIALS_FILE").unwrap_or(format!("{home}/.aws/credentials")), name.clone()),
        (env("AWS_CONFIG_FILE").unwrap_or(format!("{home}/.aws/config")), format!("profile {name}")),
    ];
    for (path, section) in &files {
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        let keys = ini_section(&text, section)
            .or_else(|| (name == "default").then(|| ini_section(&text, "default")).flatten());
        if let Some(keys) = keys {
            let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
                return Ok(Credentials {
                    access_key_id: id,
                    secret_access_key: secret,
                    session_token: get("aws_session_token"),
                });
            }
        }
    }
    let mut why = format!("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the server's environment, or keys for profile \"{name}\" in {}", files[0].0);
    if env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() || env("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some() {
        why.push_str(" (web identity and container credentials need a call to AWS STS, which pg_outbox does not make)");
    }
    Err(why)
}

/// The `key = value` lines of one `[section]` of an AWS ini file.
fn ini_section(text: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut inside = false;
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if inside {
            if let (Some((k, v)), Some(keys)) = (line.split_once('='), found.as_mut()) {
                let keys: &mut Vec<(String, String)> = keys;
                keys.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    found
}

/// The AWS region of an MSK broker host name (`b-1.c.x.kafka.us-east-1.amazonaws.com`).
pub fn region_of_host(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    let at = labels.iter().position(|l| l.eq_ignore_ascii_case("amazonaws"))?;
    (at >= 2).then(|| labels[at - 1].to_ascii_lowercase())
}

/// SigV4's URI encoding: everything but unreserved characters.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// (YYYYMMDD, YYYYMMDDTHHMMSSZ) of a Unix time.
fn amz_dates(t: u64) -> (String, String) {
    let secs = t % 86_400;
    let (year, month, day) = civil_from_days((t / 86_400) as i64);
    let date = format!("{year:04}{month:02}{day:02}");
    let stamp = format!("{date}T{:02}{:02}{:02}Z", secs / 3600, secs / 60 % 60, secs % 60);
    (date, stamp)
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
/// (Also formats the timestamps in status and messages, `status::time`.)
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The MSK IAM token: the base64url (unpadded) of a SigV4-presigned
/// `GET https://kafka.<region>.amazonaws.com/?Action=kafka-cluster%3AConnect`
/// for service `kafka-cluster`, valid 900 s, with `User-Agent` appended after
/// signing.
pub fn msk_iam_token(region: &str, creds: &Credentials, now: u64, user_agent: &str) -> Token {
    let host = format!("kafka.{region}.amazonaws.com");
    let (date, stamp) = amz_dates(now);
    let scope = format!("{date}/{region}/kafka-cluster/aws4_request");
    let mut query = vec![
        ("Action", "kafka-cluster:Connect".to_string()),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_string()),
        ("X-Amz-Credential", format!("{}/{scope}", creds.access_key_id)),
        ("X-Amz-Date", stamp.clone()),
        ("X-Amz-Expires", MSK_TOKEN_SECONDS.to_string()),
        ("X-Amz-SignedHeaders", "host".to_string()),
    ];
    if let Some(t) = &creds.session_token {
        query.push(("X-Amz-Security-Token", t.clone()));
    }
    // The URL keeps this order; the canonical request sorts the pairs.
    let pairs: Vec<String> = query.iter().map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v))).collect();
    let url_query = pairs.join("&");
    let mut sorted = pairs;
    sorted.sort();
    let canonical_query = sorted.join("&");
    let canonical_request = format!("GET\n/\n{canonical_query}\nhost:{host}\n\nhost\n{}", hex(&Sha256::digest(b"")));
    let string_to_sign =
        format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let k_date = hmac(format!("AWS4{}", creds.secret_access_key).as_bytes(), &date);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, "kafka-cluster");
    let k_signing = hmac(&k_service, "aws4_request");
    let signature = hex(&hmac(&k_signing, &string_to_sign));
    let url = format!("https://{host}/?{url_query}&X-Amz-Signature={signature}&User-Agent={}", uri_encode(user_agent));
    Token {
        value: URL_SAFE_NO_PAD.encode(url.as_bytes()),
        principal: "kafka-cluster".into(),
        expires_ms: ((now + MSK_TOKEN_SECONDS) * 1000) as i64,
    }
}
