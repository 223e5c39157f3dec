//! `legate ca inspect FILE`: what a certificate file holds, for people.
//!
//! For each certificate: identity (SPIFFE ID), other names, subject and
//! issuer, validity with the time left, CA powers, key, usages and
//! fingerprint; then whether each certificate is signed by the next, so a
//! chain file can be checked at a glance.

use std::fmt::Write;
use std::path::Path;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::X509Certificate;

use crate::{files, pki, CaError};

/// Describes every certificate in a PEM file.
pub fn inspect_file(path: &Path) -> Result<String, CaError> {
    let certs = pki::parse_certs(&files::read(path)?).map_err(|r| CaError::material(path, r))?;
    describe(&certs, SystemTime::now()).map_err(|r| CaError::material(path, r))
}

/// A certificate's subject and the end of its validity.
pub fn subject_and_expiry(der: &[u8]) -> Result<(String, SystemTime), String> {
    let cert = pki::parse_cert(der)?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = u64::try_from(secs)
        .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .map_err(|_| format!("notAfter {secs} is before 1970"))?;
    Ok((cert.subject().to_string(), not_after))
}

/// Describes a list of certificates, leaf first.
pub fn describe(certs: &[CertificateDer<'_>], now: SystemTime) -> Result<String, String> {
    let parsed: Vec<X509Certificate<'_>> = certs
        .iter()
        .enumerate()
        .map(|(i, c)| pki::parse_cert(c).map_err(|e| format!("certificate {i}: {e}")))
        .collect::<Result<_, _>>()?;
    let mut out = String::new();
    for (i, c) in parsed.iter().enumerate() {
        let role = if c.is_ca() {
            if c.subject() == c.issuer() {
                "root CA"
            } else {
                "intermediate CA"
            }
        } else {
            "leaf"
        };
        let _ = writeln!(out, "[{i}] {role}");
        let mut uris = Vec::new();
        let mut others = Vec::new();
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => others.push(format!("DNS:{d}")),
                    other => others.push(other.to_string()),
                }
            }
        }
        match (pki::spiffe_id(c), c.is_ca()) {
            (Ok(id), _) => {
                let _ = writeln!(out, "  identity:    {id}");
            }
            (Err(_), true) => {}
            (Err(e), false) => {
                let _ = writeln!(out, "  identity:    none ({e})");
            }
        }
        if uris.len() > 1 {
            let _ = writeln!(out, "  URI SANs:    {}", uris.join(", "));
        }
        if !others.is_empty() {
            let _ = writeln!(out, "  other SANs:  {}", others.join(", "));
        }
        let subject = c.subject().to_string();
        let _ = writeln!(
            out,
            "  subject:     {}",
            if subject.is_empty() {
                "(empty)"
            } else {
                &subject
            }
        );
        let _ = writeln!(out, "  issuer:      {}", c.issuer());
        let _ = writeln!(out, "  serial:      {}", pki::hex(c.raw_serial()));
        let nb = pki::system_time(c.validity().not_before);
        let na = pki::system_time(c.validity().not_after);
        let status = if now < nb {
            format!(
                "NOT YET VALID, starts in {}",
                pki::human(nb.duration_since(now).unwrap_or_default())
            )
        } else if now >= na {
            format!(
                "EXPIRED {} ago",
                pki::human(now.duration_since(na).unwrap_or_default())
            )
        } else {
            format!(
                "{} left",
                pki::human(na.duration_since(now).unwrap_or_default())
            )
        };
        let _ = writeln!(
            out,
            "  valid:       {} to {} ({status})",
            c.validity().not_before,
            c.validity().not_after
        );
        match c.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {
                let pl = bc
                    .value
                    .path_len_constraint
                    .map(|n| format!(", path length {n}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  CA:          yes{pl}");
            }
            _ => {
                let _ = writeln!(out, "  CA:          no");
            }
        }
        let _ = writeln!(out, "  key:         {}", key_type(c));
        let mut usages = Vec::new();
        for ext in c.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => usages.push(ku.to_string()),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    if eku.server_auth {
                        usages.push("serverAuth".into());
                    }
                    if eku.client_auth {
                        usages.push("clientAuth".into());
                    }
                }
                _ => {}
            }
        }
        if !usages.is_empty() {
            let _ = writeln!(out, "  usages:      {}", usages.join(", "));
        }
        let fp = ring::digest::digest(&ring::digest::SHA256, &certs[i]);
        let _ = writeln!(out, "  sha256:      {}", pki::hex(fp.as_ref()));
    }
    if parsed.len() > 1 {
        let _ = writeln!(out, "chain:");
        for (i, pair) in parsed.windows(2).enumerate() {
            let (child, parent) = (&pair[0], &pair[1]);
            let ok = child.issuer() == parent.subject()
                && child.verify_signature(Some(parent.public_key())).is_ok();
            let _ = writeln!(
                out,
                "  [{i}] is {}signed by [{}]",
                if ok { "" } else { "NOT " },
                i + 1
            );
        }
    }
    Ok(out)
}

fn key_type(c: &X509Certificate<'_>) -> String {
    let alg = &c.public_key().algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
            Some(o) if o == OID_EC_P256 => "ECDSA P-256".into(),
            Some(o) if o == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(o) => format!("EC ({o})"),
            None => "EC".into(),
        }
    } else if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        match c.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                format!("RSA {} bits", rsa.key_size())
            }
            _ => "RSA".into(),
        }
    } else {
        alg.algorithm.to_id_string()
    }
}
