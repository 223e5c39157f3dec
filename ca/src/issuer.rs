//! What a certificate signing request may ask for, and the certificates the
//! CA signs.
//!
//! The CA takes exactly one thing from a CSR: its public key, after checking
//! the CSR's signature (proof that the requester holds the private key).
//! Everything else in the certificate is decided here. A CSR that *asks*
//! for more than the authenticated identity (another SAN of any kind, CA
//! powers, unknown extensions) is refused rather than quietly trimmed, so a
//! misconfigured client learns about it. The CSR's subject name is ignored
//! and never copied: workload certificates have an empty subject and carry
//! their identity only in the URI SAN, as X509-SVIDs do.

use std::time::{Duration, SystemTime};

use legate_config::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::prelude::FromDer;

use crate::pki;
use crate::CaError;

/// Largest CSR accepted, in DER bytes. A P-256 CSR with one URI SAN is
/// about 300 bytes; this leaves room for long SPIFFE IDs.
pub const MAX_CSR_DER: usize = 8 * 1024;

/// Why a CSR is refused. The message says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not valid PEM or DER: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify; it must be signed by the key it carries")]
    BadSignature,
    #[error("the CSR's key is {0}; only ECDSA P-256 (or P-384) keys are accepted")]
    WeakKey(String),
    #[error("the CSR asks for {0}; workload certificates carry only the SPIFFE ID as a URI SAN, so remove it")]
    ExtraName(String),
    #[error("the CSR asks for CA powers ({0}); workload certificates are never CAs")]
    CaRequested(&'static str),
    #[error("the CSR asks for {0}, which this CA does not grant; remove it")]
    Unsupported(String),
    #[error("the CSR carries no URI SAN; add the SPIFFE ID {0} as its URI SAN")]
    MissingIdentity(SpiffeId),
    #[error("{0} is the CA's own identity, which only the CA itself holds (clients accept whoever presents it as the CA); request a workload identity instead")]
    ReservedIdentity(SpiffeId),
    #[error("the CSR asks for {requested} but the request is authenticated as {authenticated}; request the authenticated identity (tokens and certificates are bound to one identity)")]
    IdentityMismatch {
        requested: String,
        authenticated: SpiffeId,
    },
}

impl CsrError {
    /// A short machine-readable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            CsrError::Malformed(_) => "malformed_csr",
            CsrError::BadSignature => "bad_csr_signature",
            CsrError::WeakKey(_) => "weak_key",
            CsrError::ExtraName(_) => "extra_name",
            CsrError::CaRequested(_) => "ca_requested",
            CsrError::Unsupported(_) => "unsupported_extension",
            CsrError::MissingIdentity(_) => "missing_identity",
            CsrError::IdentityMismatch { .. } => "identity_mismatch",
            CsrError::ReservedIdentity(_) => "reserved_identity",
        }
    }
}

/// Reads a CSR given as PEM (`CERTIFICATE REQUEST`) and returns its DER.
pub fn csr_der_from_pem(pem: &str) -> Result<Vec<u8>, CsrError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateSigningRequestDer;
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Malformed(format!("no CERTIFICATE REQUEST block ({e})")))?;
    Ok(der.as_ref().to_vec())
}

/// Whether `id` is the identity the CA's API presents in its trust domain
/// ([`crate::ca_server_id`]). Clients check only that the CA presents this
/// ID, so a workload holding it could pose as the CA.
pub fn is_ca_identity(id: &SpiffeId) -> bool {
    id.trust_domain()
        .parse()
        .map(|td| *id == crate::ca_server_id(&td))
        .unwrap_or(false)
}

/// Checks a CSR against the identity the request authenticated as and
/// returns the public key to certify.
pub fn check_csr(der: &[u8], authorized: &SpiffeId) -> Result<SubjectPublicKeyInfo, CsrError> {
    // Before anything else: no credential, token or renewal certificate,
    // may obtain the CA's own identity through the API.
    if is_ca_identity(authorized) {
        return Err(CsrError::ReservedIdentity(authorized.clone()));
    }
    if der.len() > MAX_CSR_DER {
        return Err(CsrError::Malformed(format!(
            "{} bytes is larger than the {MAX_CSR_DER}-byte limit",
            der.len()
        )));
    }
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(CsrError::Malformed("trailing bytes after the CSR".into())),
        Err(e) => return Err(CsrError::Malformed(e.to_string())),
    };
    let info = &csr.certification_request_info;

    // The key type first: a cheap check that also keeps RSA signature
    // verification (and its cost) away from untrusted input.
    let spki = &info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        let what = if spki.algorithm.algorithm == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
        {
            "RSA".to_string()
        } else {
            format!("of type {}", spki.algorithm.algorithm)
        };
        return Err(CsrError::WeakKey(what));
    }
    match pki::named_curve(spki) {
        Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => {}
        Some(c) => return Err(CsrError::WeakKey(format!("EC on curve {c}"))),
        None => return Err(CsrError::WeakKey("EC without a named curve".into())),
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut uris = Vec::new();
    for attr in info.iter_attributes() {
        // Other attributes (challengePassword and the like) are ignored:
        // nothing from them reaches the certificate.
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            GeneralName::DNSName(d) => {
                                return Err(CsrError::ExtraName(format!("DNS name {d:?}")))
                            }
                            GeneralName::IPAddress(_) => {
                                return Err(CsrError::ExtraName("an IP address SAN".into()))
                            }
                            GeneralName::RFC822Name(e) => {
                                return Err(CsrError::ExtraName(format!("email address {e:?}")))
                            }
                            other => return Err(CsrError::ExtraName(format!("the SAN {other}"))),
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CsrError::CaRequested("basicConstraints CA:TRUE"))
                }
                ParsedExtension::BasicConstraints(_) => {}
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(CsrError::CaRequested("keyCertSign or cRLSign key usage"))
                }
                ParsedExtension::KeyUsage(_) => {}
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    if eku.any
                        || eku.code_signing
                        || eku.email_protection
                        || eku.time_stamping
                        || eku.ocsp_signing
                        || !eku.other.is_empty()
                    {
                        return Err(CsrError::Unsupported(
                            "extended key usages other than serverAuth and clientAuth".into(),
                        ));
                    }
                }
                ParsedExtension::NameConstraints(_) => {
                    return Err(CsrError::CaRequested("name constraints"))
                }
                ParsedExtension::SubjectKeyIdentifier(_) => {}
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::Malformed(format!(
                        "extension {} does not parse: {error}",
                        ext.oid
                    )))
                }
                _ => return Err(CsrError::Unsupported(format!("extension {}", ext.oid))),
            }
        }
    }
    match uris.as_slice() {
        [] => return Err(CsrError::MissingIdentity(authorized.clone())),
        [one] if one == authorized.as_str() => {}
        [one] => {
            return Err(CsrError::IdentityMismatch {
                requested: one.clone(),
                authenticated: authorized.clone(),
            })
        }
        [_, second, ..] => return Err(CsrError::ExtraName(format!("a second URI SAN {second:?}"))),
    }
    SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CsrError::WeakKey(e.to_string()))
}

/// Why `name` cannot be a DNS SAN, if it cannot. rcgen encodes any ASCII
/// string, so without this check "a b" or an IP address would end up as a
/// dNSName no client ever matches. A leading `*.` wildcard label is allowed.
pub fn dns_name_problem(name: &str) -> Option<String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        // legate clients verify the CA by its SPIFFE ID, so reaching it by
        // IP needs no SAN; there is no option for IP SANs.
        return Some(format!(
            "{name:?} is an IP address, not a DNS name; legate clients check only the CA's SPIFFE ID, so they can reach it by IP without it, and the CA certificate has no option for IP SANs"
        ));
    }
    let body = name.strip_prefix("*.").unwrap_or(name);
    legate_config::check_dns_name(body, false)
        .err()
        .map(|why| format!("{name:?} is not a DNS name: {why}"))
}

/// A certificate the CA signed.
#[derive(Debug, Clone)]
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number as colon-separated hex.
    pub serial: String,
}

/// An intermediate that signs workload certificates, with the chain above it.
pub struct SigningCa {
    generation: u32,
    issuer: Issuer<'static, KeyPair>,
    /// The signing intermediate first, then any above it (not the root).
    chain: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    not_after: SystemTime,
}

impl SigningCa {
    pub(crate) fn new(
        generation: u32,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
        root: CertificateDer<'static>,
    ) -> Result<Self, String> {
        let cert = chain
            .first()
            .ok_or("the intermediate file holds no certificate")?;
        let parsed = pki::parse_cert(cert)?;
        let not_after = pki::system_time(parsed.validity().not_after);
        let issuer = Issuer::from_ca_cert_der(cert, key)
            .map_err(|e| format!("cannot sign with this certificate: {e}"))?;
        Ok(SigningCa {
            generation,
            issuer,
            chain,
            root,
            not_after,
        })
    }

    /// The generation (root) this intermediate belongs to.
    pub fn generation(&self) -> u32 {
        self.generation
    }
    /// The intermediates a leaf is sent with, signer first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a workload certificate for `id` over `key`.
    ///
    /// notBefore is `now - backdate`, for hosts whose clocks run behind.
    /// notAfter is `now + ttl`, but never past the intermediate's own expiry,
    /// because a chain is only as valid as its shortest link.
    pub fn issue(
        &self,
        key: &impl PublicKeyData,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        backdate: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let not_before = now.checked_sub(backdate).unwrap_or(now);
        let not_after = (now + ttl).min(self.not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e| CaError::Signing(format!("{id} cannot be encoded: {e}")))?;
        p.subject_alt_names.push(SanType::URI(uri));
        for d in dns_names {
            if let Some(problem) = dns_name_problem(d) {
                return Err(CaError::Usage(format!(
                    "--dns-name / ca.dns_names: {problem}"
                )));
            }
            let name = d
                .as_str()
                .try_into()
                .map_err(|e| CaError::Usage(format!("DNS name {d:?}: {e}")))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = pki::offset_time(not_before);
        p.not_after = pki::offset_time(not_after);
        let serial = pki::random_serial();
        let serial_hex = pki::hex(&serial.to_bytes());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(Issued {
            leaf: cert.der().clone(),
            // Certificates carry whole seconds.
            not_before: pki::whole_seconds(not_before),
            not_after: pki::whole_seconds(not_after),
            serial: serial_hex,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateParams;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn csr(sans: &[SanType], f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans.to_vec();
        f(&mut p);
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_exactly_the_authenticated_identity() {
        let a = id("spiffe://td/a");
        assert!(check_csr(&csr(&[uri("spiffe://td/a")], |_| {}), &a).is_ok());
        assert!(matches!(
            check_csr(&csr(&[uri("spiffe://td/b")], |_| {}), &a),
            Err(CsrError::IdentityMismatch { .. })
        ));
        assert!(matches!(
            check_csr(&csr(&[], |_| {}), &a),
            Err(CsrError::MissingIdentity(_))
        ));
    }

    #[test]
    fn refuses_anything_more() {
        let a = id("spiffe://td/a");
        let dns = SanType::DnsName("evil.example".try_into().unwrap());
        assert!(matches!(
            check_csr(&csr(&[uri("spiffe://td/a"), dns], |_| {}), &a),
            Err(CsrError::ExtraName(_))
        ));
        assert!(matches!(
            check_csr(
                &csr(&[uri("spiffe://td/a"), uri("spiffe://td/a")], |_| {}),
                &a
            ),
            Err(CsrError::ExtraName(_))
        ));
        assert!(matches!(
            check_csr(
                &csr(&[uri("spiffe://td/a")], |p| p.is_ca =
                    IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
                &a
            ),
            Err(CsrError::CaRequested(_))
        ));
        let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
        assert!(check_csr(&csr(&[uri("spiffe://td/a"), ip], |_| {}), &a).is_err());
    }

    #[test]
    fn refuses_tampered_and_garbage() {
        let a = id("spiffe://td/a");
        let mut der = csr(&[uri("spiffe://td/a")], |_| {});
        // Flip a bit in the signature, which is at the end.
        let n = der.len();
        der[n - 3] ^= 1;
        assert_eq!(check_csr(&der, &a), Err(CsrError::BadSignature));
        assert!(matches!(
            check_csr(b"junk", &a),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            check_csr(&vec![0u8; MAX_CSR_DER + 1], &a),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_the_cas_own_identity() {
        let ca = id("spiffe://td/legate/ca");
        assert_eq!(
            check_csr(&csr(&[uri("spiffe://td/legate/ca")], |_| {}), &ca).unwrap_err(),
            CsrError::ReservedIdentity(ca.clone())
        );
        // Neighbouring paths are ordinary workload identities.
        let other = id("spiffe://td/legate/ca2");
        assert!(check_csr(&csr(&[uri("spiffe://td/legate/ca2")], |_| {}), &other).is_ok());
    }

    #[test]
    fn dns_names_must_be_dns_names() {
        for good in ["ca", "legate-ca.mesh.svc.cluster.local", "*.example.com"] {
            assert_eq!(dns_name_problem(good), None, "{good}");
        }
        for bad in ["a b", "", "-x.example", "x..y", "x.", "ca_1", "*."] {
            assert!(dns_name_problem(bad).is_some(), "{bad:?} accepted");
        }
        for ip in ["10.0.0.1", "::1"] {
            let p = dns_name_problem(ip).unwrap();
            assert!(p.contains("IP address"), "{p}");
        }
    }

    #[test]
    fn accepts_p384_keys() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri("spiffe://td/a")];
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        assert!(
            check_csr(&der, &id("spiffe://td/a")).is_ok(),
            "P-384 is fine"
        );
    }
}
