//! Certificates for the nginx and HAProxy pairs: one ECDSA P-256 root that
//! signs a server and a client certificate, the same key type and curve the
//! mesh uses. The server's certificate names `server.bench` so that the
//! client-side proxies verify the name as well as the chain, as the mesh
//! verifies its peer's SPIFFE ID.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

use crate::Result;

/// The name the server certificate carries and the clients check.
pub const SERVER_NAME: &str = "server.bench";

/// PEM files, readable by any user.
#[derive(Debug, Clone)]
pub struct PeerCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Certificate then key, the form HAProxy's `crt` wants.
    pub server_combined: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_combined: PathBuf,
}

pub fn generate(dir: &Path) -> Result<PeerCerts> {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    root.distinguished_name
        .push(DnType::CommonName, "legate bench root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = CertifiedIssuer::self_signed(root, root_key)?;

    let leaf = |cn: &str, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose| -> Result<_> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &root)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        SERVER_NAME,
        vec![
            SanType::DnsName(SERVER_NAME.try_into()?),
            SanType::URI("spiffe://bench.local/server".try_into()?),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        "client.bench",
        vec![SanType::URI("spiffe://bench.local/client".try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let write = |name: &str, body: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, body)?;
        Ok(path)
    };
    Ok(PeerCerts {
        ca: write("ca.pem", &root.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        server_combined: write("server-combined.pem", &format!("{server_cert}{server_key}"))?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client.key", &client_key)?,
        client_combined: write("client-combined.pem", &format!("{client_cert}{client_key}"))?,
    })
}
