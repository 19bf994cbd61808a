//! WireGuard keys in their standard form: 32 bytes, canonical padded base64 (44 characters).
//!
//! Every entry point (CLI, admin API, node config) parses keys with [`WgKey::parse`], so a bad
//! key is refused where it is typed, with the same message everywhere.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A WireGuard public key (or any 32-byte key in the public encoding).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Empty input.
    #[error("key is empty")]
    Empty,
    /// Whitespace or a line break around or inside the key.
    #[error("key contains whitespace or a line break at position {0}; remove it")]
    Whitespace(usize),
    /// Quotes around the key.
    #[error("key is wrapped in quotes; remove them")]
    Quoted,
    /// Wrong number of characters.
    #[error("key has {0} characters; a WireGuard key is 44 base64 characters ending in '='")]
    Length(usize),
    /// A character outside the standard base64 alphabet.
    #[error(
        "key has an invalid character {ch:?} at position {pos}; use standard base64 (A-Z a-z 0-9 + /)"
    )]
    BadChar {
        /// 1-based position.
        pos: usize,
        /// The character.
        ch: char,
    },
    /// The last data character sets padding bits, so the string is not the canonical encoding.
    #[error("key is not canonical base64: its 43rd character sets padding bits")]
    NonCanonical,
    /// All 32 bytes are zero.
    #[error("key is all zeros, which is not a usable key")]
    Zero,
}

impl WgKey {
    /// Parses a key in canonical base64. Refuses anything else, saying what is wrong.
    pub fn parse(s: &str) -> Result<WgKey, KeyError> {
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if s.starts_with('"') || s.starts_with('\'') || s.ends_with('"') || s.ends_with('\'') {
            return Err(KeyError::Quoted);
        }
        if let Some(pos) = s.chars().position(char::is_whitespace) {
            return Err(KeyError::Whitespace(pos + 1));
        }
        if s.len() != 44 || s.chars().count() != 44 {
            return Err(KeyError::Length(s.chars().count()));
        }
        for (i, ch) in s.chars().enumerate() {
            let ok = ch.is_ascii_alphanumeric() || ch == '+' || ch == '/' || (i == 43 && ch == '=');
            if !ok {
                return Err(KeyError::BadChar { pos: i + 1, ch });
            }
        }
        let mut out = [0u8; 32];
        match STANDARD.decode_slice(s, &mut out) {
            Ok(32) => {}
            _ => return Err(KeyError::NonCanonical),
        }
        if STANDARD.encode(out) != s {
            return Err(KeyError::NonCanonical);
        }
        if out == [0u8; 32] {
            return Err(KeyError::Zero);
        }
        Ok(WgKey(out))
    }

    /// The canonical base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The first 8 characters of the base64 form, for logs.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_string()
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({}…)", self.short())
    }
}

impl std::str::FromStr for WgKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        WgKey::parse(s)
    }
}

impl Serialize for WgKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WgKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A WireGuard private key. Its `Debug` is redacted and its bytes are zeroed on drop; it has no
/// `Display` and no `Serialize`, so it cannot end up in a log line or a message by accident.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// Makes a new key from the OS random source, clamped as X25519 requires.
    pub fn generate() -> PrivateKey {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        PrivateKey(Zeroizing::new(secret.to_bytes()))
    }

    /// Parses a private key from canonical base64 (the content of a key file, one line).
    pub fn parse(s: &str) -> Result<PrivateKey, KeyError> {
        let k = WgKey::parse(s)?;
        Ok(PrivateKey(Zeroizing::new(k.0)))
    }

    /// Parses a key file's content: one line, a trailing newline allowed.
    pub fn parse_file_content(s: &str) -> Result<PrivateKey, KeyError> {
        let line = s.strip_suffix('\n').unwrap_or(s);
        PrivateKey::parse(line)
    }

    /// The raw bytes, for handing to the WireGuard engine.
    pub fn to_bytes(&self) -> [u8; 32] {
        *self.0
    }

    /// Base64 form, for writing the key file only.
    pub fn to_base64_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(*self.0))
    }

    /// The matching public key.
    pub fn public_key(&self) -> WgKey {
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        WgKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GI=";

    #[test]
    fn field_case_31_keys() {
        assert!(WgKey::parse(VALID).is_ok());
        assert_eq!(WgKey::parse(&VALID[..43]), Err(KeyError::Length(43)));
        assert_eq!(
            WgKey::parse(&format!("{VALID}A")),
            Err(KeyError::Length(45))
        );
        // 'I' -> 'J' at position 43 sets a padding bit.
        let noncanon = format!("{}J=", &VALID[..42]);
        assert_eq!(WgKey::parse(&noncanon), Err(KeyError::NonCanonical));
        assert_eq!(WgKey::parse(&format!("\"{VALID}\"")), Err(KeyError::Quoted));
        assert_eq!(
            WgKey::parse(&format!("{VALID}\r\n")),
            Err(KeyError::Whitespace(45))
        );
        let urlsafe = VALID.replace('+', "-");
        assert!(matches!(
            WgKey::parse(&urlsafe),
            Err(KeyError::BadChar { ch: '-', .. })
        ));
        let zero = STANDARD.encode([0u8; 32]);
        assert_eq!(WgKey::parse(&zero), Err(KeyError::Zero));
        let hexkey = "00".repeat(32);
        assert_eq!(WgKey::parse(&hexkey), Err(KeyError::Length(64)));
        assert_eq!(WgKey::parse(""), Err(KeyError::Empty));
    }

    #[test]
    fn generated_keys_round_trip() {
        let k = PrivateKey::generate();
        let again = PrivateKey::parse(&k.to_base64_secret()).expect("own encoding parses");
        assert_eq!(k.public_key(), again.public_key());
        assert_eq!(format!("{k:?}"), "PrivateKey(redacted)");
    }
}
