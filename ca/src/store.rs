//! The CA directory: roots, intermediates, the token key, and rotation.
//!
//! ```text
//! <dir>/state.json              trust domain, generations, which one signs
//! <dir>/token.key               HMAC key for bootstrap tokens (0600)
//! <dir>/bundle.pem              roots of every live generation (for operators)
//! <dir>/gen-<n>/root.crt        the generation's root
//! <dir>/gen-<n>/root.key        its key (0600); absent when the operator
//!                               keeps the root offline; `serve` never reads it
//! <dir>/gen-<n>/intermediate.crt  the signing intermediate (then any
//!                               intermediates above it, up to the root)
//! <dir>/gen-<n>/intermediate.key  its key (0600)
//! <dir>/gen-<n>/issued-until    latest notAfter the generation has issued
//! ```
//!
//! A *generation* is one root with its intermediate. `init` creates
//! generation 1; `rotate` adds the next one and makes it the signer, while
//! the bundle keeps every root that is not retired, so certificates from
//! the old chain and the new one verify each other during the overlap.
//! `rotate --retire` drops old roots, but only once `issued-until` shows
//! that nothing they issued can still be valid.
//!
//! `issued-until` is written *before* a certificate leaves the CA, and
//! ahead of need (with some slack) so that it is rewritten rarely: it may
//! overstate how long old certificates live, never understate it.
//!
//! Only `init`, `rotate` and `rotate --retire` write `state.json` (atomically);
//! a running `serve` notices the change on its next request and switches.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use legate_config::{CaConfig, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::credentials::Bundle;
use crate::files::{self, PUBLIC, SECRET};
use crate::issuer::{Issued, SigningCa};
use crate::pki;
use crate::tls::{self, PeerMatcher};
use crate::token::{TokenError, TokenKey};
use crate::CaError;

pub const STATE_FILE: &str = "state.json";
const TOKEN_KEY: &str = "token.key";
const BUNDLE_FILE: &str = "bundle.pem";
const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";
const INTER_CERT: &str = "intermediate.crt";
const INTER_KEY: &str = "intermediate.key";
const ISSUED_UNTIL: &str = "issued-until";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct State {
    version: u32,
    trust_domain: String,
    active: u32,
    generations: Vec<Generation>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Generation {
    id: u32,
    created: u64,
    #[serde(default)]
    imported: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired: Option<u64>,
}

impl State {
    fn live(&self) -> impl Iterator<Item = &Generation> {
        self.generations.iter().filter(|g| g.retired.is_none())
    }
}

fn gen_dir(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("gen-{id}"))
}

fn read_state(dir: &Path) -> Result<State, CaError> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CaError::NotInitialised(dir.to_owned()))
        }
        Err(e) => return Err(CaError::io("read", path, e)),
    };
    let state: State = serde_json::from_str(&text)
        .map_err(|e| CaError::material(&path, format!("not a legate CA state file: {e}")))?;
    if state.version != 1 {
        return Err(CaError::material(
            &path,
            format!(
                "state version {} is newer than this legate understands; upgrade legate",
                state.version
            ),
        ));
    }
    Ok(state)
}

/// Checks that generation `id`, which the state counts on, still has its
/// directory. Without this a lost `gen-<n>` shows up as an unreadable
/// `root.crt`, or, for a signing generation the state does not list, as
/// "retired", neither of which says what happened or how to recover.
fn check_present(dir: &Path, state: &State, id: u32) -> Result<(), CaError> {
    let g = gen_dir(dir, id);
    // `symlink_metadata` so that a dangling symlink counts as present and
    // is named by the read that follows, with its own error.
    if fs::symlink_metadata(&g).is_ok() {
        return Ok(());
    }
    let signing = id == state.active;
    let fix = if signing {
        format!(
            "this CA cannot sign: `legate ca init --force --dir {} --trust-domain {}` replaces it with a new one (certificates issued so far stop verifying once no bundle carries their root)",
            dir.display(),
            state.trust_domain
        )
    } else {
        format!(
            "drop it with `legate ca rotate --retire --dir {}` (certificates it issued stop verifying)",
            dir.display()
        )
    };
    Err(CaError::GenerationMissing {
        generation: id,
        role: if signing {
            "the signing generation"
        } else {
            "a live generation"
        },
        dir: g,
        state: dir.join(STATE_FILE),
        fix,
    })
}

/// Checks that the state's signing generation and every live one are in
/// `dir`, and that the signing one is live.
fn check_generations(dir: &Path, state: &State) -> Result<(), CaError> {
    check_active(dir, state)?;
    state
        .live()
        .try_for_each(|g| check_present(dir, state, g.id))
}

/// Checks that the state's signing generation is in `dir` and is a live
/// generation the state lists.
fn check_active(dir: &Path, state: &State) -> Result<(), CaError> {
    check_present(dir, state, state.active)?;
    let state_path = dir.join(STATE_FILE);
    match state.generations.iter().find(|g| g.id == state.active) {
        None => Err(CaError::material(
            &state_path,
            format!(
                "names generation {} as the signing one but does not list it among its generations; restore the file from a backup taken with the gen-* directories",
                state.active
            ),
        )),
        Some(g) if g.retired.is_some() => Err(CaError::material(
            &state_path,
            format!(
                "generation {} signs but is marked retired, so its root is in no bundle; restore the file from a backup taken with the gen-* directories",
                state.active
            ),
        )),
        Some(_) => Ok(()),
    }
}

fn write_state(dir: &Path, state: &State) -> Result<(), CaError> {
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| CaError::Usage(format!("cannot encode the CA state: {e}")))?;
    files::write_atomic(&dir.join(STATE_FILE), json.as_bytes(), PUBLIC)
}

/// Certificates and keys the operator brings instead of generated ones
/// (from openssl, cert-manager, or an offline root).
#[derive(Debug, Clone, Default)]
pub struct Import {
    pub root_cert: PathBuf,
    /// Needed unless an intermediate (cert and key) is given; then the root
    /// key can stay offline.
    pub root_key: Option<PathBuf>,
    pub intermediate_cert: Option<PathBuf>,
    pub intermediate_key: Option<PathBuf>,
}

/// One generation's key material, in memory.
struct Material {
    root: CertificateDer<'static>,
    root_key: Option<KeyPair>,
    /// Signing intermediate first, then any intermediates above it.
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    imported: bool,
}

fn ca_params(
    cn: String,
    not_before: SystemTime,
    not_after: SystemTime,
    path_len: u8,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "legate");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = pki::offset_time(not_before);
    p.not_after = pki::offset_time(not_after);
    p.serial_number = Some(pki::random_serial());
    p
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Signing(format!("cannot generate a P-256 key: {e}")))
}

/// Signs a new intermediate under `root`.
fn new_intermediate(
    td: &TrustDomain,
    gen: u32,
    root: &CertificateDer<'static>,
    root_key: &KeyPair,
    cfg: &CaConfig,
    now: SystemTime,
) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let root_parsed = pki::parse_cert(root).map_err(CaError::Signing)?;
    let root_end = pki::system_time(root_parsed.validity().not_after);
    let key = new_key()?;
    let mut p = ca_params(
        format!("legate intermediate {td} {gen}"),
        now.checked_sub(cfg.backdate).unwrap_or(now),
        (now + cfg.intermediate_ttl).min(root_end),
        0,
    );
    p.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_der(root, root_key)
        .map_err(|e| CaError::Signing(format!("the root cannot sign: {e}")))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    Ok((cert.der().clone(), key))
}

fn generate(
    td: &TrustDomain,
    gen: u32,
    cfg: &CaConfig,
    now: SystemTime,
) -> Result<Material, CaError> {
    let root_key = new_key()?;
    let p = ca_params(
        format!("legate root {td} {gen}"),
        now.checked_sub(cfg.backdate).unwrap_or(now),
        now + cfg.root_ttl,
        1,
    );
    let root = p
        .self_signed(&root_key)
        .map_err(|e| CaError::Signing(e.to_string()))?
        .der()
        .clone();
    let (inter, key) = new_intermediate(td, gen, &root, &root_key, cfg, now)?;
    Ok(Material {
        root,
        root_key: Some(root_key),
        chain: vec![inter],
        key,
        imported: false,
    })
}

fn read_one_cert(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    pki::parse_certs(&files::read(path)?).map_err(|r| CaError::material(path, r))
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    pki::parse_key(&files::read(path)?).map_err(|r| CaError::material(path, r))
}

/// Checks that a certificate may act as a CA, now.
fn check_ca_cert(path: &Path, der: &CertificateDer<'_>, now: SystemTime) -> Result<(), CaError> {
    let c = pki::parse_cert(der).map_err(|r| CaError::material(path, r))?;
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(CaError::material(
                path,
                "not a CA certificate (basicConstraints CA:TRUE is missing); use a root or intermediate made for signing",
            ))
        }
        Err(e) => return Err(CaError::material(path, format!("bad basicConstraints: {e}"))),
    }
    // Before any signature check, which would fail with a misleading
    // "not signed by" for a key type ring cannot verify.
    if let Some(reason) = pki::unsupported_ca_key(&c) {
        return Err(CaError::material(path, reason));
    }
    if let Ok(Some(ku)) = c.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(CaError::material(
                path,
                "its key usage does not include keyCertSign, so it cannot sign certificates",
            ));
        }
    }
    let nb = pki::system_time(c.validity().not_before);
    let na = pki::system_time(c.validity().not_after);
    if now < nb {
        return Err(CaError::material(path, "not valid yet; check the clock"));
    }
    if now >= na {
        return Err(CaError::material(
            path,
            format!(
                "expired at {}; nothing it signs verifies. Use a certificate that is still valid (in a CA directory, `legate ca rotate` adds a new generation)",
                c.validity().not_after
            ),
        ));
    }
    Ok(())
}

fn check_key_matches(path: &Path, der: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CaError> {
    let c = pki::parse_cert(der).map_err(|r| CaError::material(path, r))?;
    if c.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(CaError::material(
            path,
            "the private key does not belong to this certificate",
        ));
    }
    Ok(())
}

/// Checks that `child` was signed by `parent` (names and signature).
fn check_signed_by(
    path: &Path,
    child: &CertificateDer<'_>,
    parent: &CertificateDer<'_>,
) -> Result<(), CaError> {
    let c = pki::parse_cert(child).map_err(|r| CaError::material(path, r))?;
    let p = pki::parse_cert(parent).map_err(|r| CaError::material(path, r))?;
    if c.issuer() != p.subject() {
        return Err(CaError::material(
            path,
            format!(
                "issued by \"{}\", not by \"{}\"; pass the matching root or the full chain",
                c.issuer(),
                p.subject()
            ),
        ));
    }
    c.verify_signature(Some(p.public_key())).map_err(|_| {
        CaError::material(
            path,
            format!(
                "its signature does not verify with the key of \"{}\"",
                p.subject()
            ),
        )
    })
}

/// Checks that `root` is a usable, self-signed root. `fix` says what to do
/// if it is not: at import, which flags to use; at load, which file to restore.
fn check_root(
    path: &Path,
    root: &CertificateDer<'_>,
    now: SystemTime,
    fix: &str,
) -> Result<(), CaError> {
    check_ca_cert(path, root, now)?;
    check_signed_by(path, root, root).map_err(|_| {
        CaError::material(path, format!("not self-signed, so it is not a root; {fix}"))
    })
}

/// Checks the intermediates below a checked root: each a usable CA signed
/// by the next, and every basicConstraints pathLenConstraint leaving room
/// for the CAs below it. webpki, which peers verify with, ignores
/// pathLenConstraint, so the self-test cannot catch it; openssl and other
/// verifiers reject such chains. `init` and `serve` share this.
fn check_chain(
    root_path: &Path,
    root: &CertificateDer<'_>,
    chain_path: &Path,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), CaError> {
    if chain.is_empty() {
        return Err(CaError::material(chain_path, "no certificate"));
    }
    if chain.iter().any(|c| c.as_ref() == root.as_ref()) {
        return Err(CaError::material(
            chain_path,
            "the intermediate is the root itself; give the intermediate the root signed, or give only --root-cert and --root-key and legate creates the intermediate",
        ));
    }
    for (i, c) in chain.iter().enumerate() {
        check_ca_cert(chain_path, c, now)?;
        let parent = chain.get(i + 1).unwrap_or(root);
        check_signed_by(chain_path, c, parent)?;
        check_path_len(chain_path, c, i)?;
    }
    check_path_len(root_path, root, chain.len())
}

/// Checks that `der`'s pathLenConstraint, if any, allows `below`
/// intermediates under it.
fn check_path_len(path: &Path, der: &CertificateDer<'_>, below: usize) -> Result<(), CaError> {
    let c = pki::parse_cert(der).map_err(|r| CaError::material(path, r))?;
    let Ok(Some(bc)) = c.basic_constraints() else {
        return Ok(());
    };
    match bc.value.path_len_constraint {
        Some(n) if (n as usize) < below => Err(CaError::material(
            path,
            format!(
                "its basicConstraints pathlen:{n} allows {n} intermediate(s) below it, but the chain has {below}, so certificates it issues fail verification (\"path length constraint exceeded\"); use a certificate with pathlen:{below} or more, or without pathlen"
            ),
        )),
        _ => Ok(()),
    }
}

fn import(
    td: &TrustDomain,
    gen: u32,
    imp: &Import,
    cfg: &CaConfig,
    now: SystemTime,
) -> Result<Material, CaError> {
    let roots = read_one_cert(&imp.root_cert)?;
    if roots.len() != 1 {
        return Err(CaError::material(
            &imp.root_cert,
            format!("holds {} certificates; give the root alone", roots.len()),
        ));
    }
    let Some(root) = roots.into_iter().next() else {
        return Err(CaError::material(&imp.root_cert, "no certificate"));
    };
    check_root(
        &imp.root_cert,
        &root,
        now,
        "pass it as --intermediate-cert and its root as --root-cert",
    )?;
    let root_key = match &imp.root_key {
        Some(p) => {
            let k = read_key(p)?;
            check_key_matches(p, &root, &k)?;
            Some(k)
        }
        None => None,
    };
    let (chain, key) = match (&imp.intermediate_cert, &imp.intermediate_key) {
        (Some(cp), Some(kp)) => {
            let chain = read_one_cert(cp)?;
            // The chain before the key, so that a key type legate cannot use
            // is named from the certificate rather than as a parse failure.
            check_chain(&imp.root_cert, &root, cp, &chain, now)?;
            let key = read_key(kp)?;
            check_key_matches(kp, &chain[0], &key)?;
            (chain, key)
        }
        (None, None) => {
            let rk = root_key.as_ref().ok_or_else(|| {
                CaError::Usage(
                    "an imported root needs --root-key so legate can sign an intermediate, or bring the intermediate too (--intermediate-cert and --intermediate-key)".into(),
                )
            })?;
            let (inter, key) = new_intermediate(td, gen, &root, rk, cfg, now)?;
            let chain = vec![inter];
            // The root's pathlen must leave room for the new intermediate.
            check_chain(&imp.root_cert, &root, &imp.root_cert, &chain, now)?;
            (chain, key)
        }
        _ => {
            return Err(CaError::Usage(
                "--intermediate-cert and --intermediate-key go together".into(),
            ))
        }
    };
    let m = Material {
        root,
        root_key,
        chain,
        key,
        imported: true,
    };
    self_test(td, gen, &m, now).map_err(|reason| {
        CaError::material(
            imp.intermediate_cert.as_ref().unwrap_or(&imp.root_cert),
            format!("a test certificate signed with this chain does not verify: {reason}"),
        )
    })?;
    Ok(m)
}

/// Issues a throwaway workload certificate and verifies it as peers will,
/// so that a chain that cannot work (name constraints, key usages,
/// mismatched files) is refused at init rather than at 3 a.m. Path length
/// is not among them: webpki ignores pathLenConstraint, so [`check_chain`]
/// checks it.
fn self_test(td: &TrustDomain, gen: u32, m: &Material, now: SystemTime) -> Result<(), String> {
    let signer = SigningCa::new(gen, m.chain.clone(), m.key.clone_key()?, m.root.clone())?;
    let id = SpiffeId::new(td, ["legate", "self-test"])?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let issued = signer
        .issue(
            &key,
            &id,
            &[],
            Duration::from_secs(300),
            Duration::from_secs(60),
            now,
        )
        .map_err(|e| e.to_string())?;
    let bundle = Bundle::new(vec![m.root.clone()]).map_err(|e| e.to_string())?;
    let provider = tls::provider();
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        tls::verify_chain(
            &bundle,
            &issued.leaf,
            &m.chain,
            UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default()),
            usage,
            &PeerMatcher::Exact(id.clone()),
            &provider.signature_verification_algorithms,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

trait CloneKey {
    fn clone_key(&self) -> Result<KeyPair, String>;
}

impl CloneKey for KeyPair {
    fn clone_key(&self) -> Result<KeyPair, String> {
        pki::parse_key(pki::key_pem(self).as_bytes())
    }
}

fn write_generation(dir: &Path, id: u32, m: &Material, force: bool) -> Result<(), CaError> {
    let g = gen_dir(dir, id);
    files::ensure_dir(&g)?;
    files::write_new(
        &g.join(ROOT_CERT),
        pki::certs_pem([&m.root]).as_bytes(),
        PUBLIC,
        force,
    )?;
    if let Some(k) = &m.root_key {
        files::write_new(&g.join(ROOT_KEY), pki::key_pem(k).as_bytes(), SECRET, force)?;
    }
    files::write_new(
        &g.join(INTER_CERT),
        pki::certs_pem(&m.chain).as_bytes(),
        PUBLIC,
        force,
    )?;
    files::write_new(
        &g.join(INTER_KEY),
        pki::key_pem(&m.key).as_bytes(),
        SECRET,
        force,
    )?;
    Ok(())
}

fn write_bundle(dir: &Path, state: &State) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut roots = Vec::new();
    for g in state.live() {
        roots.extend(read_one_cert(&gen_dir(dir, g.id).join(ROOT_CERT))?);
    }
    files::write_atomic(
        &dir.join(BUNDLE_FILE),
        pki::certs_pem(&roots).as_bytes(),
        PUBLIC,
    )?;
    Ok(roots)
}

fn now_secs() -> u64 {
    pki::unix_secs(SystemTime::now())
}

/// Creates the CA in `dir`: generation 1 (generated or imported) and the
/// token key. Refuses to touch an existing CA unless `force`.
pub fn init(
    dir: &Path,
    td: &TrustDomain,
    cfg: &CaConfig,
    imported: Option<&Import>,
    force: bool,
) -> Result<String, CaError> {
    let state_path = dir.join(STATE_FILE);
    if state_path.exists() && !force {
        return Err(CaError::Exists(state_path));
    }
    files::ensure_dir(dir)?;
    let now = SystemTime::now();
    let m = match imported {
        Some(imp) => import(td, 1, imp, cfg, now)?,
        None => generate(td, 1, cfg, now)?,
    };
    if force {
        // Generations of the CA being replaced must not linger as trusted
        // roots; remove them.
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("gen-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    write_generation(dir, 1, &m, force)?;
    files::write_new(
        &dir.join(TOKEN_KEY),
        &TokenKey::generate_bytes(),
        SECRET,
        force,
    )?;
    let state = State {
        version: 1,
        trust_domain: td.to_string(),
        active: 1,
        generations: vec![Generation {
            id: 1,
            created: now_secs(),
            imported: m.imported,
            retired: None,
        }],
    };
    write_state(dir, &state)?;
    write_bundle(dir, &state)?;
    Ok(format!(
        "initialised the CA for trust domain {td} in {}\n{}",
        dir.display(),
        describe(&m)
    ))
}

fn describe(m: &Material) -> String {
    let line = |label: &str, der: &CertificateDer<'_>| match pki::parse_cert(der) {
        Ok(c) => format!(
            "  {label}: {} (valid until {})\n",
            c.subject(),
            c.validity().not_after
        ),
        Err(_) => String::new(),
    };
    let mut s = line("root", &m.root);
    if let Some(c) = m.chain.first() {
        s.push_str(&line("intermediate", c));
    }
    if m.root_key.is_none() {
        s.push_str("  the root key stays with you (not stored in the CA directory)\n");
    }
    s
}

/// Adds a generation (new root and intermediate, or imported ones) and makes
/// it the signer. The bundle keeps the old roots until they are retired.
pub fn rotate(dir: &Path, cfg: &CaConfig, imported: Option<&Import>) -> Result<String, CaError> {
    let mut state = read_state(dir)?;
    // Before anything is written: the new bundle needs every live root.
    check_generations(dir, &state)?;
    let td: TrustDomain = state
        .trust_domain
        .parse()
        .map_err(|e| CaError::material(dir.join(STATE_FILE), format!("trust domain: {e}")))?;
    let id = state.generations.iter().map(|g| g.id).max().unwrap_or(0) + 1;
    let now = SystemTime::now();
    let m = match imported {
        Some(imp) => import(&td, id, imp, cfg, now)?,
        None => generate(&td, id, cfg, now)?,
    };
    write_generation(dir, id, &m, false)?;
    let old = state.active;
    state.generations.push(Generation {
        id,
        created: now_secs(),
        imported: m.imported,
        retired: None,
    });
    state.active = id;
    write_state(dir, &state)?;
    let roots = write_bundle(dir, &state)?;
    // Only a hint in the report; `retire` reads the file again and refuses
    // if it is unusable.
    let until = read_issued_until(dir, old).ok().flatten();
    let mut out = format!(
        "generation {id} now signs; the bundle carries {} roots\n{}",
        roots.len(),
        describe(&m)
    );
    out.push_str(&format!(
        "retire generation {old} with `legate ca rotate --retire` once its certificates have expired{}\n",
        match until {
            Some(t) if t > now_secs() => format!(" (after {})", fmt_unix(t)),
            _ => String::new(),
        }
    ));
    Ok(out)
}

fn fmt_unix(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .map(|d| {
            format!(
                "{} {:02}:{:02}:{:02} UTC",
                d.date(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| t.to_string())
}

/// The recorded `issued-until` of a generation. Only a missing file means
/// nothing was issued (the CA writes it before the first certificate leaves);
/// a file that cannot be read or parsed is an error, because guessing "never
/// issued" could retire a root while its certificates are still in use.
fn read_issued_until(dir: &Path, gen: u32) -> Result<Option<u64>, CaError> {
    let path = gen_dir(dir, gen).join(ISSUED_UNTIL);
    let bad = |reason: String| CaError::IssuedUntil {
        path: path.clone(),
        generation: gen,
        reason,
    };
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        // A dangling symlink also reads as NotFound; only a path that is
        // truly absent means nothing was recorded.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(&path).is_err() =>
        {
            return Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("is a symlink to a file that does not exist".into()))
        }
        Err(e) => return Err(bad(format!("cannot be read ({e})"))),
    };
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| bad(format!("holds {:?}, not Unix seconds", text.trim())))
}

/// Retires every generation except the signing one, once nothing it issued
/// can still be valid. Refuses (and changes nothing) otherwise.
pub fn retire(dir: &Path, now: SystemTime) -> Result<String, CaError> {
    let mut state = read_state(dir)?;
    // Only the signing generation must be there, for the new bundle: a
    // missing older one is what `--retire` is the way out for.
    check_active(dir, &state)?;
    let now_s = pki::unix_secs(now);
    let active = state.active;
    let candidates: Vec<u32> = state
        .live()
        .filter(|g| g.id != active)
        .map(|g| g.id)
        .collect();
    if candidates.is_empty() {
        return Err(CaError::Retire(format!(
            "generation {active} is the only live one; run `legate ca rotate` first"
        )));
    }
    let mut busy = Vec::new();
    for &id in &candidates {
        match read_issued_until(dir, id)? {
            Some(t) if t > now_s => busy.push(format!(
                "generation {id} issued certificates that may be valid until {} ({} from now)",
                fmt_unix(t),
                pki::human(Duration::from_secs(t - now_s))
            )),
            _ => {}
        }
    }
    if !busy.is_empty() {
        return Err(CaError::Retire(format!(
            "{}; retiring its root now would break them. Try again after that time",
            busy.join("; ")
        )));
    }
    for g in state.generations.iter_mut() {
        if candidates.contains(&g.id) {
            g.retired = Some(now_s);
        }
    }
    write_state(dir, &state)?;
    let roots = write_bundle(dir, &state)?;
    Ok(format!(
        "retired generation(s) {}; the bundle now carries {} root(s)\n",
        candidates
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        roots.len()
    ))
}

/// The bundle file operators copy into `identity.ca_bundle`, after the
/// checks any bundle gets before it is used (PEM that parses, CA
/// certificates only), and with at least one root still valid at `now`:
/// a file that fails them would only surface later, as workloads that
/// trust no CA.
pub fn bundle(dir: &Path, now: SystemTime) -> Result<String, CaError> {
    let path = dir.join(BUNDLE_FILE);
    let pem = files::read_string(&path).map_err(|e| match e {
        CaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            CaError::NotInitialised(dir.to_owned())
        }
        other => other,
    })?;
    let bundle = Bundle::from_pem(pem.as_bytes())
        .map_err(|e| CaError::material(&path, format!("{e}; {}", rebuild_bundle(dir))))?;
    let last = bundle
        .certs()
        .iter()
        .filter_map(|c| pki::parse_cert(c).ok())
        .map(|c| pki::system_time(c.validity().not_after))
        .max();
    if let Some(last) = last.filter(|t| *t <= now) {
        return Err(CaError::material(
            &path,
            format!(
                "every root in it has expired, the last at {}, so nothing verifies under it. If the CA's roots have expired too, `legate ca rotate --dir {}` adds a new generation and rewrites the file; otherwise {}",
                fmt_unix(pki::unix_secs(last)),
                dir.display(),
                rebuild_bundle(dir)
            ),
        ));
    }
    Ok(pem)
}

/// How to rebuild `bundle.pem`: it is the live generations' roots put
/// together, which only `init`, `rotate` and `retire` write.
fn rebuild_bundle(dir: &Path) -> String {
    let path = dir.join(BUNDLE_FILE);
    match read_state(dir) {
        Ok(state) => format!(
            "rebuild it from the live generations' roots: `cat {} > {}`",
            state
                .live()
                .map(|g| gen_dir(dir, g.id).join(ROOT_CERT).display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            path.display()
        ),
        Err(_) => format!(
            "rebuild it by putting the root.crt of each live gen-<n> in {} together into {}",
            dir.display(),
            path.display()
        ),
    }
}

/// The trust domain of the CA in `dir`.
pub fn trust_domain(dir: &Path) -> Result<TrustDomain, CaError> {
    let state = read_state(dir)?;
    state
        .trust_domain
        .parse()
        .map_err(|e| CaError::material(dir.join(STATE_FILE), format!("trust domain: {e}")))
}

/// Mints a bootstrap token for `id` with the CA's token key. Refuses the
/// CA's own identity: a certificate for it would let its holder pose as the
/// CA to every client.
pub fn mint_token(dir: &Path, id: &SpiffeId, ttl: Duration) -> Result<String, CaError> {
    if crate::issuer::is_ca_identity(id) {
        return Err(CaError::ReservedIdentity(id.clone()));
    }
    let state = read_state(dir)?;
    if id.trust_domain() != state.trust_domain {
        return Err(CaError::Usage(format!(
            "{id} is outside this CA's trust domain {}",
            state.trust_domain
        )));
    }
    let key = load_token_key(dir)?;
    Ok(key.mint(id, ttl, SystemTime::now()))
}

fn load_token_key(dir: &Path) -> Result<TokenKey, CaError> {
    let path = dir.join(TOKEN_KEY);
    TokenKey::from_bytes(&files::read(&path)?).map_err(|e| match e {
        // Here the file is known, so the command that replaces it can name it.
        TokenError::ShortKey(n) => CaError::material(
            &path,
            format!(
                "the token key is {n} bytes but must be at least 32 raw random bytes; restore it from a backup, or write a new one with `(umask 077; head -c 32 /dev/urandom > {})` (tokens minted with the old key stop working; roots and certificates are unaffected)",
                path.display()
            ),
        ),
        other => CaError::material(&path, other.to_string()),
    })
}

/// Identifies a version of `state.json`, to notice changes cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<(SystemTime, u64, u64)>);

impl Stamp {
    pub fn of(dir: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp(
            fs::metadata(dir.join(STATE_FILE))
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.ino(), m.len()))),
        )
    }
}

/// The loaded CA: what `serve` signs and serves with.
pub struct Authority {
    dir: PathBuf,
    trust_domain: TrustDomain,
    bundle: Arc<Bundle>,
    bundle_pem: String,
    active: Arc<SigningCa>,
    server_signer: Arc<SigningCa>,
    token: TokenKey,
    stamp: Stamp,
    /// Recorded `issued-until` per generation; the lock also serialises
    /// the file writes.
    issued_until: Mutex<HashMap<u32, u64>>,
}

impl Authority {
    /// Loads the CA from `dir`. Reads the signing intermediates' keys, never
    /// the root keys.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let stamp = Stamp::of(dir);
        let state = read_state(dir)?;
        let state_path = dir.join(STATE_FILE);
        let trust_domain: TrustDomain = state
            .trust_domain
            .parse()
            .map_err(|e| CaError::material(&state_path, format!("trust domain: {e}")))?;
        check_generations(dir, &state)?;
        let mut roots = Vec::new();
        for g in state.live() {
            roots.extend(read_one_cert(&gen_dir(dir, g.id).join(ROOT_CERT))?);
        }
        let bundle = Bundle::new(roots)
            .map_err(|e| CaError::material(dir.join(BUNDLE_FILE), e.to_string()))?;
        let bundle_pem = bundle.to_pem();
        let active = Arc::new(load_signer(dir, state.active)?);
        // The API's own certificate comes from the oldest live generation:
        // during a rotation every client still trusts that root, including
        // those that have not fetched the new bundle yet.
        let oldest = state.live().map(|g| g.id).min().unwrap_or(state.active);
        let server_signer = if oldest == state.active {
            active.clone()
        } else {
            Arc::new(load_signer(dir, oldest).map_err(|e| {
                // Its root signs the API's own certificate; once the
                // generation has run out, retiring it is the fix, not a
                // new generation.
                CaError::Usage(format!(
                    "generation {oldest}, the oldest live one, cannot be loaded: {e}. \
                     If it has expired, its certificates have too: retire it with \
                     `legate ca rotate --retire`"
                ))
            })?)
        };
        let left = active
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < Duration::from_secs(30 * 86400) {
            warn!(
                generation = state.active,
                "the signing intermediate expires in {}; certificates are cut short to its expiry. Run `legate ca rotate`",
                pki::human(left)
            );
        }
        let mut issued = HashMap::new();
        for g in state.live() {
            issued.insert(g.id, read_issued_until(dir, g.id)?.unwrap_or(0));
        }
        Ok(Authority {
            dir: dir.to_owned(),
            trust_domain,
            bundle: Arc::new(bundle),
            bundle_pem,
            active,
            server_signer,
            token: load_token_key(dir)?,
            stamp,
            issued_until: Mutex::new(issued),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
    pub fn token_key(&self) -> &TokenKey {
        &self.token
    }
    pub fn stamp(&self) -> &Stamp {
        &self.stamp
    }
    pub fn active(&self) -> &Arc<SigningCa> {
        &self.active
    }
    /// The signer of the API's own certificate.
    pub fn server_signer(&self) -> &Arc<SigningCa> {
        &self.server_signer
    }

    /// Signs a workload certificate with the active generation, recording
    /// its expiry first so that the generation is never retired under it.
    pub fn issue(
        &self,
        key: &impl PublicKeyData,
        id: &SpiffeId,
        cfg: &CaConfig,
        now: SystemTime,
    ) -> Result<(Issued, Vec<CertificateDer<'static>>), CaError> {
        // The API refuses this identity in the CSR check already; refusing
        // here too keeps any other caller from signing it.
        if crate::issuer::is_ca_identity(id) {
            return Err(CaError::ReservedIdentity(id.clone()));
        }
        let signer = &self.active;
        let issued = signer.issue(key, id, &[], cfg.cert_ttl, cfg.backdate, now)?;
        self.record(signer.generation(), issued.not_after, cfg.cert_ttl)?;
        let mut chain = Vec::with_capacity(1 + signer.chain().len());
        chain.push(issued.leaf.clone());
        chain.extend(signer.chain().iter().cloned());
        Ok((issued, chain))
    }

    fn record(&self, gen: u32, not_after: SystemTime, ttl: Duration) -> Result<(), CaError> {
        let na = pki::unix_secs(not_after);
        let mut map = self
            .issued_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let recorded = map.entry(gen).or_insert(0);
        if na <= *recorded {
            return Ok(());
        }
        // Record ahead by a quarter of the lifetime (at most an hour) so the
        // file is rewritten about four times per lifetime, not per request.
        let slack = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let until = na + slack.as_secs();
        files::write_atomic(
            &gen_dir(&self.dir, gen).join(ISSUED_UNTIL),
            format!("{until}\n").as_bytes(),
            PUBLIC,
        )?;
        *recorded = until;
        Ok(())
    }
}

/// Loads a generation's signer, after the checks `init` runs on imported
/// material: files may have been replaced, or simply expired, since, and
/// serving with them would fail every request with a misleading reason.
fn load_signer(dir: &Path, gen: u32) -> Result<SigningCa, CaError> {
    let g = gen_dir(dir, gen);
    let Some(root) = read_one_cert(&g.join(ROOT_CERT))?.into_iter().next() else {
        return Err(CaError::material(g.join(ROOT_CERT), "no certificate"));
    };
    let chain = read_one_cert(&g.join(INTER_CERT))?;
    let now = SystemTime::now();
    check_root(
        &g.join(ROOT_CERT),
        &root,
        now,
        "restore this generation's root certificate",
    )?;
    check_chain(&g.join(ROOT_CERT), &root, &g.join(INTER_CERT), &chain, now)?;
    let key = read_key(&g.join(INTER_KEY))?;
    check_key_matches(&g.join(INTER_KEY), &chain[0], &key)?;
    SigningCa::new(gen, chain, key, root).map_err(|r| CaError::material(g.join(INTER_CERT), r))
}
