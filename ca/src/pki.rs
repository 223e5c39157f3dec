//! Small X.509 and PEM helpers shared by the CA and the client: reading
//! certificates and keys in the forms operators' tools write them, reading a
//! SPIFFE ID out of a certificate, and converting times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use legate_config::SpiffeId;
use rcgen::{KeyPair, SerialNumber};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

/// Encodes DER as PEM with the given label, 64 characters a line.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Concatenated PEM certificates.
pub(crate) fn certs_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect()
}

/// Every certificate in a PEM text; other sections are skipped.
pub(crate) fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        match item {
            Ok((SectionKind::Certificate, der)) => out.push(CertificateDer::from(der)),
            Ok(_) => {}
            Err(e) => return Err(pem_problem(&e)),
        }
    }
    if out.is_empty() {
        return Err(if pem.first() == Some(&0x30) {
            "no PEM CERTIFICATE block found; this looks like DER: convert it with `openssl x509 -inform DER -in FILE -out FILE.pem`".into()
        } else {
            "no PEM CERTIFICATE block found (a `-----BEGIN CERTIFICATE-----` line and its END line)"
                .into()
        });
    }
    Ok(out)
}

/// A PEM reading error in words: the parser's own text shows a section's
/// label as a list of byte values.
pub(crate) fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: a block has no `-----END {}-----` line (is the file cut off?)",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => format!(
            "not valid PEM: a BEGIN line is malformed: {}",
            String::from_utf8_lossy(line)
        ),
        E::Base64Decode(why) => {
            format!("not valid PEM: the text between BEGIN and END is not base64 ({why})")
        }
        other => format!("not valid PEM: {other}"),
    }
}

const OID_EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
const OID_P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
const OID_P384: &[u64] = &[1, 3, 132, 0, 34];
const OID_RSA: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];

/// Reads a private key in the forms openssl and cert-manager write: PKCS#8
/// (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
/// ring only loads PKCS#8, so the other two are wrapped into it first.
///
/// A file with more than one key is refused: the parser would take the
/// first and ignore the rest, so which key signs would depend on the order
/// in which the keys were pasted together.
pub(crate) fn parse_key(pem: &[u8]) -> Result<KeyPair, String> {
    let keys = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .filter(|item| {
            matches!(
                item,
                Ok((
                    SectionKind::PrivateKey
                        | SectionKind::EcPrivateKey
                        | SectionKind::RsaPrivateKey,
                    _
                ))
            )
        })
        .count();
    if keys > 1 {
        return Err(format!(
            "holds {keys} private keys where one is expected, and legate will not guess which one to sign with; keep only the key that belongs to the certificate in this file"
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no usable PEM private key ({e}); expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY"))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => sec1_to_pkcs8(k.secret_sec1_der())?,
        PrivateKeyDer::Pkcs1(k) => wrap_pkcs8(
            &der_seq(&[der_oid(OID_RSA), vec![0x05, 0x00]]),
            k.secret_pkcs1_der(),
        ),
        _ => return Err("unsupported private key format".into()),
    };
    KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).map_err(|e| {
        format!("the private key cannot be used for signing ({e}); legate signs with {SUPPORTED_CA_KEYS}")
    })
}

/// The PKCS#8 DER of a key pair, for writing it out.
pub(crate) fn key_pem(key: &KeyPair) -> String {
    pem_encode("PRIVATE KEY", key.serialized_der())
}

fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, String> {
    // ECPrivateKey ::= SEQUENCE { version, privateKey, [0] parameters, [1] publicKey }
    let bad = || "the EC private key is not valid SEC1 DER".to_string();
    let (tag, mut body, _) = read_tlv(sec1).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let mut curve = None;
    while !body.is_empty() {
        let (tag, inner, rest) = read_tlv(body).ok_or_else(bad)?;
        if tag == 0xa0 {
            let (t, oid, _) = read_tlv(inner).ok_or_else(bad)?;
            if t == 0x06 {
                curve = Some(oid);
            }
        }
        body = rest;
    }
    let curve = curve.ok_or(
        "the EC private key does not name its curve; convert it with `openssl pkcs8 -topk8 -nocrypt`",
    )?;
    if curve != &der_oid(OID_P256)[2..] && curve != &der_oid(OID_P384)[2..] {
        return Err("only P-256 and P-384 EC keys are supported".into());
    }
    let alg = der_seq(&[der_oid(OID_EC_PUBLIC_KEY), der_tlv(0x06, curve)]);
    Ok(wrap_pkcs8(&alg, sec1))
}

/// Splits one DER TLV off the front: (tag, contents, rest). Single-byte tags
/// and definite lengths only, which is all DER key files use.
fn read_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
        (len, &b[n..])
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

fn wrap_pkcs8(alg: &[u8], inner: &[u8]) -> Vec<u8> {
    der_seq(&[vec![0x02, 0x01, 0x00], alg.to_vec(), der_tlv(0x04, inner)])
}

fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

fn der_seq(items: &[Vec<u8>]) -> Vec<u8> {
    der_tlv(0x30, &items.concat())
}

fn der_oid(arcs: &[u64]) -> Vec<u8> {
    // Our OIDs are literals above, all valid; an invalid one would encode empty.
    let oid = Oid::from(arcs)
        .map(|o| o.as_bytes().to_vec())
        .unwrap_or_default();
    der_tlv(0x06, &oid)
}

/// Why a CA certificate's key cannot be used, if it cannot: ring, and so
/// both signing here and verification in every peer, handles only ECDSA
/// P-256 and P-384 and RSA of 2048 to 8192 bits. Other key types are left
/// to the signature checks that follow.
pub(crate) fn unsupported_ca_key(cert: &X509Certificate<'_>) -> Option<String> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    };
    use x509_parser::public_key::PublicKey;
    let spki = cert.public_key();
    let what = if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match named_curve(spki) {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => return None,
            Some(c) => match c.to_id_string().as_str() {
                "1.3.132.0.35" => "an ECDSA P-521 key".to_string(),
                "1.3.132.0.10" => "an ECDSA secp256k1 key".to_string(),
                other => format!("an EC key on curve {other}"),
            },
            None => "an EC key without a named curve".to_string(),
        }
    } else if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(k)) if (2048..=8192).contains(&k.key_size()) => return None,
            Ok(PublicKey::RSA(k)) => format!("a {}-bit RSA key", k.key_size()),
            _ => "an RSA key that does not parse".to_string(),
        }
    } else {
        return None;
    };
    Some(format!(
        "its key is {what}, which legate cannot sign or verify with; use {SUPPORTED_CA_KEYS}"
    ))
}

/// The named curve of an EC public key, `None` when its parameters name
/// none (explicit curve parameters, or a key of another type).
pub(crate) fn named_curve<'a>(
    spki: &'a x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Option<Oid<'a>> {
    spki.algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
}

/// The CA key types legate supports, for error messages.
pub(crate) const SUPPORTED_CA_KEYS: &str =
    "an ECDSA P-256 or P-384 key, or an RSA key of 2048 to 8192 bits";

/// Parses one DER certificate.
pub(crate) fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not a valid X.509 certificate: {e}")),
    }
}

/// The URI SANs of a certificate.
pub(crate) fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Result<Vec<&'a str>, String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    out.push(*u);
                }
            }
        } else if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
            if ext.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME {
                return Err(format!(
                    "the subjectAltName extension is malformed: {error}"
                ));
            }
        }
    }
    Ok(out)
}

/// The SPIFFE ID of an X509-SVID: its one URI SAN, which must be a SPIFFE ID.
pub(crate) fn spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let uris = uri_sans(cert)?;
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e| format!("the URI SAN {one:?} is not a SPIFFE ID: {e}")),
        [] => Err("the certificate has no URI SAN, so it carries no SPIFFE ID".into()),
        _ => Err(format!(
            "the certificate has {} URI SANs; an X509-SVID has exactly one",
            uris.len()
        )),
    }
}

pub(crate) fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

pub(crate) fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_secs(t))
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A random, positive 128-bit serial number (RFC 5280 allows up to 20 octets).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the top bit so the DER INTEGER is positive, and set the next one
    // so that the encoding length is always the same.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Lowercase hex with colons, as `openssl x509 -serial` and fingerprints read.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A short human form of a duration: `23h59m`, `9s`, `3d4h`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec1_and_pkcs8_keys_load_alike() {
        let key = KeyPair::generate().unwrap();
        let pkcs8 = key_pem(&key);
        let again = parse_key(pkcs8.as_bytes()).unwrap();
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        assert!(parse_key(b"not a key").is_err());
    }

    #[test]
    fn a_file_with_two_keys_is_refused_not_read_for_its_first() {
        let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let two = format!("{}{}", key_pem(&a), key_pem(&b));
        let e = parse_key(two.as_bytes()).expect_err("two keys accepted");
        assert!(e.contains("2 private keys"), "{e}");
        // Forms are counted alike: a PKCS#8 key next to a SEC1 one is two.
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        let mixed = format!("{}{sec1}", key_pem(&a));
        let e = parse_key(mixed.as_bytes()).expect_err("two keys accepted");
        assert!(e.contains("2 private keys"), "{e}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(86399)), "23h59m");
        assert_eq!(human(Duration::from_secs(9)), "9s");
    }
}

#[cfg(test)]
mod pem_tests {
    use super::*;

    #[test]
    fn pem_mistakes_are_told_in_words() {
        let cut = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        let e = parse_certs(cut).expect_err("cut off");
        assert!(e.contains("no `-----END CERTIFICATE-----` line"), "{e}");
        let der = [0x30, 0x82, 0x01, 0x0a, 0x02];
        let e = parse_certs(&der).expect_err("DER");
        assert!(e.contains("looks like DER"), "{e}");
        let e = parse_certs(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
            .expect_err("bad base64");
        assert!(e.contains("not base64"), "{e}");
        let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = crate::credentials::Bundle::from_pem(junk)
            .expect_err("junk")
            .to_string();
        assert!(e.contains("well-formed X.509"), "{e}");
    }

    #[test]
    fn a_bundle_refuses_a_certificate_that_says_it_is_no_ca() {
        let make = |is_ca| {
            let key = KeyPair::generate().expect("key");
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = is_ca;
            let cert = p.self_signed(&key).expect("cert");
            CertificateDer::from(cert.der().to_vec())
        };
        let leaf = make(rcgen::IsCa::ExplicitNoCa);
        let e = crate::credentials::Bundle::new(vec![leaf])
            .expect_err("a leaf is no root")
            .to_string();
        assert!(e.contains("not a CA certificate"), "{e}");
        let root = make(rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        crate::credentials::Bundle::new(vec![root]).expect("a root is");
    }
}
