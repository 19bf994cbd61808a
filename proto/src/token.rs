//! Join tokens: what a node needs to enroll, in one string an operator can paste.
//!
//! Form: `ztjoin1_` followed by unpadded base64url of a JSON object with the coordinator's
//! address (`c`), the SHA-256 fingerprint of its CA certificate in hex (`f`) and the secret (`s`).
//! The coordinator stores only `secret_hash(secret)`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const PREFIX: &str = "ztjoin1_";

/// A parsed join token. Its `Debug` hides the secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinToken {
    /// Coordinator address, `HOST:PORT`.
    #[serde(rename = "c")]
    pub coordinator: String,
    /// SHA-256 of the coordinator CA certificate (DER), lowercase hex.
    #[serde(rename = "f")]
    pub ca_fingerprint: String,
    /// The secret; only its hash is stored by the coordinator.
    #[serde(rename = "s")]
    pub secret: String,
}

/// Why a token string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Does not start with `ztjoin1_`.
    #[error("not a ztnet join token (expected it to start with {PREFIX:?})")]
    Prefix,
    /// The body is not valid base64url or JSON.
    #[error("join token is corrupted: {0}")]
    Corrupt(String),
    /// A field is empty or malformed.
    #[error("join token field {0} is invalid")]
    Field(&'static str),
}

impl JoinToken {
    /// Makes a token with a fresh 32-byte random secret.
    pub fn generate(coordinator: String, ca_fingerprint: String) -> JoinToken {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        JoinToken {
            coordinator,
            ca_fingerprint,
            secret: hex::encode(bytes),
        }
    }

    /// Parses the string form, tolerating surrounding whitespace.
    pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|e| {
            TokenError::Corrupt(match e {
                base64::DecodeError::InvalidByte(at, _) => format!(
                    "character {} after the {PREFIX} prefix cannot be part of a token \
                     (was it changed or wrapped when copied?)",
                    at + 1
                ),
                _ => "it is cut short or has extra characters (copy the whole token, on one \
                      line)"
                    .into(),
            })
        })?;
        let token: JoinToken = serde_json::from_slice(&json).map_err(|_| {
            TokenError::Corrupt(
                "its text decodes but does not hold a ztnet token (was it cut or joined \
                 with something else?)"
                    .into(),
            )
        })?;
        if token.coordinator.is_empty() {
            return Err(TokenError::Field("coordinator"));
        }
        if token.ca_fingerprint.len() != 64 || hex::decode(&token.ca_fingerprint).is_err() {
            return Err(TokenError::Field("ca fingerprint"));
        }
        if token.secret.len() < 32 {
            return Err(TokenError::Field("secret"));
        }
        Ok(token)
    }

    /// The string form. Contains the secret: show it once, never log it.
    pub fn encode(&self) -> Zeroizing<String> {
        let json = serde_json::to_vec(self).expect("a struct of strings always serializes");
        Zeroizing::new(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json)))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("coordinator", &self.coordinator)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"redacted")
            .finish()
    }
}

/// The hash under which a secret (token or API key) is stored: SHA-256, lowercase hex. Secrets
/// are 256-bit random values, so an unsalted fast hash is enough; compare in constant time.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// SHA-256 of DER bytes, lowercase hex: the CA fingerprint form used in tokens.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_hides_secret() {
        let t = JoinToken::generate("[::1]:7443".into(), "ab".repeat(32));
        let s = t.encode();
        let back = JoinToken::parse(&s).expect("own encoding parses");
        assert_eq!(back.secret, t.secret);
        assert_eq!(back.coordinator, "[::1]:7443");
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn garbage_tokens_are_refused() {
        assert_eq!(JoinToken::parse("hello").unwrap_err(), TokenError::Prefix);
        let bad_char = JoinToken::parse("ztjoin1_ab!c").unwrap_err().to_string();
        assert!(bad_char.contains("character 3 after"), "{bad_char}");
        let t = JoinToken::generate("[::1]:7443".into(), "ab".repeat(32)).encode();
        let cut = JoinToken::parse(&t[..t.len() - 3]).unwrap_err().to_string();
        assert!(cut.contains("corrupted"), "{cut}");
        assert!(!cut.contains("symbol") && !cut.contains("offset"), "{cut}");
        let not_json = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b"{\"x\":1"));
        let msg = JoinToken::parse(&not_json).unwrap_err().to_string();
        assert!(msg.contains("does not hold a ztnet token"), "{msg}");
        assert!(!msg.contains("EOF") && !msg.contains("line 1"), "{msg}");
    }
}
