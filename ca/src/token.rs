//! Bootstrap tokens: signed, expiring, bound to one identity, and checked
//! without a database.
//!
//! A token is `legate1.<payload>.<tag>`, both parts base64url without
//! padding. The payload is JSON `{"sub": SPIFFE ID, "iat": unix seconds,
//! "exp": unix seconds, "nonce": random}` and the tag is HMAC-SHA256 over
//! `legate1.<payload>` with a 256-bit key kept in the CA directory (mode
//! 0600).
//!
//! Why HMAC rather than an ECDSA signature: the only party that mints and
//! the only party that checks tokens is the CA itself, on the same key
//! directory, so a public verification key buys nothing. HMAC keys are
//! simple to generate and rotate, the tag is short, and verification is a
//! constant-time compare. If tokens ever need checking elsewhere, a new
//! version prefix can carry a signature.
//!
//! Tokens can be replayed until they expire (no database remembers them),
//! which is why their default lifetime is short (`ca.token_ttl`, 10 min)
//! and why one only ever yields the identity it names.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use legate_config::SpiffeId;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::pki::{human, unix_secs};

const PREFIX: &str = "legate1.";
/// Longer inputs are refused before any decoding work.
const MAX_LEN: usize = 4096;

/// Why a token is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "not a legate bootstrap token; mint one with `legate ca token --identity <SPIFFE ID>`"
    )]
    Malformed,
    #[error("the token's signature does not verify: it was not minted by this CA (or the CA's token key changed); mint a new one with `legate ca token`")]
    BadSignature,
    #[error("the token expired {} ago; mint a new one with `legate ca token` (tokens are meant for bootstrap only; renewals use the current certificate)", human(*.0))]
    Expired(Duration),
    #[error("the token is not valid for another {}; check the clocks of the CA and the host that minted it", human(*.0))]
    NotYetValid(Duration),
    #[error("the token names {0:?}, which is not a valid SPIFFE ID")]
    BadIdentity(String),
    /// The key file holds raw bytes (not text or base64), as `init` writes.
    /// The advice replaces only the token key: `init --force` would also
    /// replace the roots and break every issued certificate.
    #[error("the token key is {0} bytes but must be at least 32 raw random bytes; restore the file from a backup, or replace it with new ones, mode 0600: `head -c 32 /dev/urandom` (tokens minted with the old key stop working; roots and certificates are unaffected)")]
    ShortKey(usize),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
    nonce: String,
}

/// The HMAC key that mints and verifies tokens.
#[derive(Clone)]
pub struct TokenKey(hmac::Key);

impl TokenKey {
    /// Key length in bytes.
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenError> {
        if bytes.len() < Self::LEN {
            return Err(TokenError::ShortKey(bytes.len()));
        }
        Ok(TokenKey(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// Fresh random key bytes, to be stored with mode 0600.
    pub fn generate_bytes() -> [u8; Self::LEN] {
        rand::random()
    }

    /// A token for `id` valid from `now` for `ttl`.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> String {
        let iat = unix_secs(now);
        let nonce: [u8; 12] = rand::random();
        let claims = Claims {
            sub: id.to_string(),
            iat,
            exp: iat.saturating_add(ttl.as_secs().max(1)),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
        };
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let signed = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let tag = hmac::sign(&self.0, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks the tag first (so nothing an attacker wrote is interpreted
    /// before it is authenticated), then the lifetime, and returns the
    /// identity the token is bound to.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<SpiffeId, TokenError> {
        let token = token.trim();
        if token.len() > MAX_LEN || !token.starts_with(PREFIX) {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.0, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        let now = unix_secs(now);
        // One second of grace for clocks that disagree by a tick.
        if claims.iat > now + 1 {
            return Err(TokenError::NotYetValid(Duration::from_secs(
                claims.iat - now,
            )));
        }
        if now >= claims.exp {
            return Err(TokenError::Expired(Duration::from_secs(now - claims.exp)));
        }
        claims
            .sub
            .parse()
            .map_err(|_| TokenError::BadIdentity(claims.sub.clone()))
    }
}

/// The identity a token names, *without* checking its signature: for a
/// client deciding what to ask for. Only the CA's [`TokenKey::verify`] makes
/// the claim trustworthy.
pub fn unverified_subject(token: &str) -> Option<SpiffeId> {
    let token = token.trim();
    if token.len() > MAX_LEN {
        return None;
    }
    let payload = token.strip_prefix(PREFIX)?.split('.').next()?;
    let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims.sub.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let key = TokenKey::from_bytes(&TokenKey::generate_bytes()).unwrap();
        let now = SystemTime::now();
        let t = key.mint(&id("spiffe://td/a"), Duration::from_secs(60), now);
        assert_eq!(key.verify(&t, now).unwrap(), id("spiffe://td/a"));
    }

    #[test]
    fn a_short_key_is_refused_with_advice_that_keeps_the_roots() {
        let err = TokenKey::from_bytes(&[7u8; 31]).err().unwrap();
        assert_eq!(err, TokenError::ShortKey(31));
        let text = err.to_string();
        assert!(text.contains("head -c 32 /dev/urandom"), "{text}");
        assert!(!text.contains("init --force"), "{text}");
    }

    #[test]
    fn expired_forged_and_garbage_are_refused() {
        let key = TokenKey::from_bytes(&TokenKey::generate_bytes()).unwrap();
        let other = TokenKey::from_bytes(&TokenKey::generate_bytes()).unwrap();
        let now = SystemTime::now();
        let t = key.mint(&id("spiffe://td/a"), Duration::from_secs(60), now);
        assert!(matches!(
            key.verify(&t, now + Duration::from_secs(120)),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(other.verify(&t, now), Err(TokenError::BadSignature));
        // Swap the payload for one naming another identity, keep the tag.
        let forged_payload = URL_SAFE_NO_PAD
            .encode(br#"{"sub":"spiffe://td/admin","iat":0,"exp":99999999999,"nonce":"x"}"#);
        let tag = t.rsplit_once('.').unwrap().1;
        let forged = format!("{PREFIX}{forged_payload}.{tag}");
        assert_eq!(key.verify(&forged, now), Err(TokenError::BadSignature));
        for junk in [
            "",
            "legate1.",
            "legate1..",
            "eyJhbGciOi.x.y",
            &"a".repeat(10_000),
        ] {
            assert!(key.verify(junk, now).is_err(), "{junk:?} accepted");
        }
    }
}
