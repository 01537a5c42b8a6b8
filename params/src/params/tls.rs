//! sslKeystoreKey, sslKeystoreCertificateChain, sslTruststoreCertificates,
//! sslKeyPassword: TLS material given inline as PEM (never as files: the
//! Postgres server need not have them on disk), as Java's PEM keystore and
//! truststore take it.

use super::reader::Reader;
use super::spec::Needs;
use super::{perr, set, ParamError};

/// Configure TLS when `tls` (the protocol is SSL or SASL_SSL).
pub(super) fn configure(r: &Reader<'_>, tls: bool, props: &mut Vec<(String, String)>) -> Result<(), ParamError> {
    let dest = r.dest;
    let key = r.text("sslKeystoreKey")?;
    let chain = r.text("sslKeystoreCertificateChain")?;
    let trust = r.text("sslTruststoreCertificates")?;
    let password = r.text("sslKeyPassword")?;
    if !tls {
        return r.refuse_without(Needs::Tls);
    }
    match trust {
        Some(t) => set(props, "ssl.ca.pem", certificates(dest, "sslTruststoreCertificates", &t)?),
        // Java trusts the JVM's CAs; here the system's.
        None => set(props, "ssl.ca.location", "probe"),
    }
    let certs_in_key = match &key {
        Some(k) => {
            let (block, certs) = private_key(dest, k, password.is_some())?;
            set(props, "ssl.key.pem", block);
            certs
        }
        None => None,
    };
    match (&key, client_chain(dest, chain, certs_in_key)?) {
        (Some(_), Some(c)) => set(props, "ssl.certificate.pem", c),
        (Some(_), None) => {
            return Err(perr(
                format!("sslKeystoreKey of destination \"{dest}\" has no certificate chain"),
                "Append the client certificate to sslKeystoreKey, or give it as sslKeystoreCertificateChain.",
            ))
        }
        (None, Some(_)) => {
            return Err(perr(
                format!("sslKeystoreCertificateChain of destination \"{dest}\" has no sslKeystoreKey"),
                "Client certificates need their private key in sslKeystoreKey.",
            ))
        }
        (None, None) => {}
    }
    if let Some(p) = password {
        if key.is_none() {
            return Err(perr(
                format!("sslKeyPassword of destination \"{dest}\" has no sslKeystoreKey"),
                "Remove sslKeyPassword, or add the key.",
            ));
        }
        set(props, "ssl.key.password", p);
    }
    Ok(())
}

/// sslKeystoreKey: its one PKCS#8 private key block, and the certificates
/// that may follow it (joined), if any.
fn private_key(dest: &str, value: &str, has_password: bool) -> Result<(String, Option<String>), ParamError> {
    let blocks = pem_blocks(value);
    let keys: Vec<&(String, String)> = blocks.iter().filter(|(l, _)| l.ends_with("PRIVATE KEY")).collect();
    let [(label, block)] = keys.as_slice() else {
        return Err(perr(
            format!("sslKeystoreKey of destination \"{dest}\" must hold exactly one PEM private key"),
            "Paste the key as -----BEGIN PRIVATE KEY----- (PKCS#8), optionally followed by its certificate chain.",
        ));
    };
    if label != "PRIVATE KEY" && label != "ENCRYPTED PRIVATE KEY" {
        return Err(perr(
            format!("sslKeystoreKey of destination \"{dest}\" is a {label}, not PKCS#8"),
            "Java takes PKCS#8 keys: convert with openssl pkcs8 -topk8 -in key.pem (add -nocrypt for no password).",
        ));
    }
    if label == "ENCRYPTED PRIVATE KEY" && !has_password {
        return Err(perr(
            format!("sslKeystoreKey of destination \"{dest}\" is encrypted but sslKeyPassword is missing"),
            "Add \"sslKeyPassword\".",
        ));
    }
    if blocks.iter().any(|(l, _)| l != "CERTIFICATE" && !l.ends_with("PRIVATE KEY")) {
        return Err(perr(
            format!("sslKeystoreKey of destination \"{dest}\" holds PEM blocks other than a key and certificates"),
            "Paste the private key, optionally followed by its certificate chain.",
        ));
    }
    let certs: Vec<&str> = blocks.iter().filter(|(l, _)| l == "CERTIFICATE").map(|(_, b)| b.as_str()).collect();
    Ok((block.clone(), (!certs.is_empty()).then(|| certs.join("\n"))))
}

/// The client certificate chain: from sslKeystoreCertificateChain or after
/// the key in sslKeystoreKey, not both.
fn client_chain(dest: &str, chain: Option<String>, in_key: Option<String>) -> Result<Option<String>, ParamError> {
    match (chain, in_key) {
        (Some(_), Some(_)) => Err(perr(
            format!("destination \"{dest}\" gives a certificate chain both in sslKeystoreKey and in sslKeystoreCertificateChain"),
            "Give it once.",
        )),
        (Some(c), None) => Ok(Some(certificates(dest, "sslKeystoreCertificateChain", &c)?)),
        (None, c) => Ok(c),
    }
}

/// The PEM blocks of a value: (label, whole block text).
fn pem_blocks(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else { break };
        let label = after[..label_end].to_string();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else { break };
        let block_end = start + 11 + end + end_marker.len();
        out.push((label, rest[start..block_end].to_string()));
        rest = &rest[block_end..];
    }
    out
}

/// A value that must hold only PEM certificates, as one PEM text.
fn certificates(dest: &str, name: &str, value: &str) -> Result<String, ParamError> {
    let blocks = pem_blocks(value);
    if blocks.is_empty() || blocks.iter().any(|(l, _)| l != "CERTIFICATE") {
        return Err(perr(
            format!("parameter \"{name}\" of destination \"{dest}\" must hold PEM certificates"),
            "Paste one or more -----BEGIN CERTIFICATE----- blocks.",
        ));
    }
    Ok(blocks.into_iter().map(|(_, b)| b).collect::<Vec<_>>().join("\n"))
}
