//! Workload identity: SPIFFE IDs and selectors as the coordinator stores them, the admin API
//! bodies of `ztnet workload ...`, the registrations a node is told about over the control
//! channel, and the node's local workload API (`ztnet identity fetch`). No I/O.
//!
//! The workload API is one request line of JSON ([`WorkloadRequest`]) on the node's Unix
//! socket, answered by one JSON document ([`WorkloadReply`]) before the node closes the stream.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Shortest SVID lifetime a registration may ask for.
pub const MIN_SVID_TTL_SECS: u64 = 10;
/// Longest SVID lifetime a registration may ask for.
pub const MAX_SVID_TTL_SECS: u64 = 24 * 3600;
/// SVID lifetime when a registration names none.
pub const DEFAULT_SVID_TTL_SECS: u64 = 3600;
/// Longest SPIFFE ID accepted, in bytes (the SPIFFE standard's limit).
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Most selectors one registration may carry.
const MAX_SELECTORS: usize = 16;

/// A SPIFFE ID that passed [`SpiffeId::parse`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

/// Why a SPIFFE ID or a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The SPIFFE ID breaks the SPIFFE ID rules.
    #[error("SPIFFE ID {id:?} is not valid: {reason}")]
    BadSpiffeId {
        /// What was given.
        id: String,
        /// The rule broken.
        reason: String,
    },
    /// The SPIFFE ID names another trust domain than the coordinator's.
    #[error("SPIFFE ID {id:?} is in trust domain {got:?}; this coordinator issues for {want:?}")]
    ForeignTrustDomain {
        /// What was given.
        id: String,
        /// Its trust domain.
        got: String,
        /// The coordinator's.
        want: String,
    },
    /// A selector does not parse.
    #[error(
        "selector {given:?} is not valid: {reason} (use unix:uid:N, unix:gid:N or \
         unix:path:/absolute/path)"
    )]
    BadSelector {
        /// What was given.
        given: String,
        /// What is wrong.
        reason: String,
    },
}

impl SpiffeId {
    /// Checks the SPIFFE ID rules: `spiffe://` then a trust domain of lowercase letters,
    /// digits, `.`, `-`, `_`, then a non-empty path of segments of letters, digits, `.`, `-`,
    /// `_`, none empty, `.` or `..`, no trailing slash, no query or fragment.
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let bad = |reason: &str| IdentityError::BadSpiffeId {
            id: s.chars().take(200).collect(),
            reason: reason.into(),
        };
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it must start with spiffe:// (lowercase)"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(bad("the trust domain is empty"));
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
        {
            return Err(bad(
                "the trust domain may hold only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        if path.is_empty() {
            return Err(bad(
                "a workload ID needs a path after the trust domain, e.g. /ns/prod/sa/api",
            ));
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => return Err(bad("a path segment is empty (// or a trailing /)")),
                "." | ".." => return Err(bad("a path segment is '.' or '..'")),
                _ => {}
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
            {
                return Err(bad(
                    "path segments may hold only letters, digits, '.', '-' and '_' \
                     (no query, fragment, percent-encoding or port)",
                ));
            }
        }
        Ok(SpiffeId(s.to_string()))
    }

    /// Parses and checks that the ID is in `trust_domain` and not of the form that node IDs
    /// use (`/ns/NS/node/NAME`), so that no workload can hold a node's identity.
    pub fn parse_workload(s: &str, trust_domain: &str) -> Result<SpiffeId, IdentityError> {
        let id = SpiffeId::parse(s)?;
        if id.trust_domain() != trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id: s.to_string(),
                got: id.trust_domain().to_string(),
                want: trust_domain.to_string(),
            });
        }
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        if segments.len() == 4 && segments[0] == "ns" && segments[2] == "node" {
            return Err(IdentityError::BadSpiffeId {
                id: s.to_string(),
                reason: "/ns/NS/node/NAME is the form of node identities; use /ns/NS/sa/NAME"
                    .into(),
            });
        }
        Ok(id)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or(rest)
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.find('/').map_or("", |i| &rest[i..])
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        SpiffeId::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.0
    }
}

/// What the kernel says about a caller of the workload API; selectors match against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Executable, from `/proc/PID/exe`; `None` when it cannot be read.
    pub path: Option<String>,
}

/// One condition on a caller: `unix:uid:N`, `unix:gid:N` or `unix:path:/abs/path`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    /// The caller's user id.
    Uid(u32),
    /// The caller's group id.
    Gid(u32),
    /// The caller's executable path.
    Path(String),
}

impl Selector {
    /// Parses one selector.
    pub fn parse(s: &str) -> Result<Selector, IdentityError> {
        let bad = |reason: &str| IdentityError::BadSelector {
            given: s.chars().take(200).collect(),
            reason: reason.into(),
        };
        let rest = s
            .strip_prefix("unix:")
            .ok_or_else(|| bad("only unix: selectors exist"))?;
        let (kind, value) = rest
            .split_once(':')
            .ok_or_else(|| bad("missing the value after the kind"))?;
        let id = |v: &str| -> Result<u32, IdentityError> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the id must be a decimal number"));
            }
            v.parse::<u32>()
                .map_err(|_| bad("the id is above 4294967295"))
        };
        match kind {
            "uid" => Ok(Selector::Uid(id(value)?)),
            "gid" => Ok(Selector::Gid(id(value)?)),
            "path" => {
                if !value.starts_with('/') {
                    return Err(bad("the path must be absolute"));
                }
                if value.len() > 4096 || value.contains('\0') {
                    return Err(bad("the path is over 4096 bytes or holds a NUL"));
                }
                if value.split('/').any(|c| c == "." || c == "..") {
                    return Err(bad("the path must not contain . or .. components"));
                }
                Ok(Selector::Path(value.to_string()))
            }
            _ => Err(bad("the kind must be uid, gid or path")),
        }
    }

    /// Parses a registration's selectors: at least one, at most 16, sorted, no duplicates.
    pub fn parse_all(given: &[String]) -> Result<Vec<Selector>, IdentityError> {
        if given.is_empty() {
            return Err(IdentityError::BadSelector {
                given: String::new(),
                reason: "a registration needs at least one selector".into(),
            });
        }
        if given.len() > MAX_SELECTORS {
            return Err(IdentityError::BadSelector {
                given: format!("{} selectors", given.len()),
                reason: format!("at most {MAX_SELECTORS} are allowed"),
            });
        }
        let mut out = given
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Whether the caller meets this condition.
    pub fn matches(&self, caller: &Caller) -> bool {
        match self {
            Selector::Uid(u) => caller.uid == *u,
            Selector::Gid(g) => caller.gid == *g,
            Selector::Path(p) => caller.path.as_deref() == Some(p.as_str()),
        }
    }
}

/// Whether a caller meets every selector of a registration (an empty list matches nobody).
pub fn matches_all(selectors: &[Selector], caller: &Caller) -> bool {
    !selectors.is_empty() && selectors.iter().all(|s| s.matches(caller))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(u) => write!(f, "unix:uid:{u}"),
            Selector::Gid(g) => write!(f, "unix:gid:{g}"),
            Selector::Path(p) => write!(f, "unix:path:{p}"),
        }
    }
}

impl TryFrom<String> for Selector {
    type Error = IdentityError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Selector::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

/// `POST /v1/networks/{net}/workloads`. Unknown fields are refused, so a misspelt one is not
/// silently dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorkload {
    /// The SPIFFE ID to issue (in the coordinator's trust domain).
    pub spiffe_id: String,
    /// The node on which the workload runs.
    pub node: String,
    /// Conditions on the caller, all of which must hold.
    pub selectors: Vec<String>,
    /// SVID lifetime in seconds; [`DEFAULT_SVID_TTL_SECS`] when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A registration as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Registration id, unique per coordinator.
    pub id: u64,
    /// Network name.
    pub network: String,
    /// SPIFFE ID issued.
    pub spiffe_id: SpiffeId,
    /// Node name.
    pub node: String,
    /// Conditions on the caller.
    pub selectors: Vec<Selector>,
    /// SVID lifetime in seconds.
    pub ttl_secs: u64,
    /// API key name that registered it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `active`, or `revoked` once its node was revoked or deleted (nothing is issued for it
    /// again; SVIDs issued before stay valid until they expire).
    #[serde(default = "active")]
    pub state: String,
    /// For a revoked registration: why (its node's revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_reason: Option<String>,
    /// For a revoked registration: Unix seconds of its node's revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

fn active() -> String {
    "active".into()
}

/// A registration as its node is told about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    /// SPIFFE ID issued.
    pub spiffe_id: SpiffeId,
    /// Conditions on the caller.
    pub selectors: Vec<Selector>,
    /// SVID lifetime in seconds.
    pub ttl_secs: u64,
}

/// A request on the node's workload socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkloadRequest {
    /// Fetch every X.509-SVID the caller is entitled to.
    FetchX509,
}

/// The node's answer on the workload socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum WorkloadReply {
    /// The caller's SVIDs, at least one.
    Svids {
        /// One per registration the caller matches, sorted by SPIFFE ID.
        svids: Vec<X509Svid>,
    },
    /// No identity for this caller, or none could be issued now.
    Refused {
        /// Stable code: `no-match`, `unavailable`, `refused`, `bad-request`, `busy`.
        code: String,
        /// One readable sentence.
        message: String,
    },
}

/// One X.509-SVID with its private key and the trust bundle. Its `Debug` hides the key.
#[derive(Clone, Serialize, Deserialize)]
pub struct X509Svid {
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// PEM chain, leaf first.
    pub cert_chain_pem: String,
    /// PEM PKCS#8 private key, made on the node.
    pub key_pem: String,
    /// PEM CA certificates of the trust domain.
    pub bundle_pem: String,
    /// Unix seconds of the certificate's notAfter.
    pub not_after: u64,
    /// Unix seconds of its notBefore (back-dated for clock skew).
    pub not_before: u64,
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("key_pem", &"redacted")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_follow_the_standard_rules() {
        let ok = SpiffeId::parse_workload("spiffe://corp.example/ns/prod/sa/api", "corp.example");
        assert_eq!(
            ok.map(|i| i.path().to_string()),
            Ok("/ns/prod/sa/api".into())
        );
        for bad in [
            "http://corp.example/a",
            "SPIFFE://corp.example/a",
            "spiffe://Corp.example/a",
            "spiffe://corp.example",
            "spiffe://corp.example/",
            "spiffe://corp.example/a//b",
            "spiffe://corp.example/a/../b",
            "spiffe://corp.example/a?x=1",
            "spiffe://corp.example:443/a",
            "spiffe:///a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn workload_ids_stay_in_the_trust_domain_and_off_node_ids() {
        let foreign = SpiffeId::parse_workload("spiffe://evil.example/ns/a/sa/b", "corp.example");
        assert!(matches!(
            foreign,
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        let node = SpiffeId::parse_workload("spiffe://corp.example/ns/a/node/web1", "corp.example");
        assert!(node.unwrap_err().to_string().contains("node identities"));
    }

    #[test]
    fn selectors_parse_and_match_all_of_them() {
        let given = ["unix:uid:1001".to_string(), "unix:path:/usr/bin/api".into()];
        let sel = Selector::parse_all(&given).expect("valid");
        let caller = Caller {
            uid: 1001,
            gid: 5,
            path: Some("/usr/bin/api".into()),
        };
        assert!(matches_all(&sel, &caller));
        let other = Caller {
            path: Some("/usr/bin/sh".into()),
            ..caller.clone()
        };
        assert!(!matches_all(&sel, &other));
        assert!(!matches_all(&[], &caller));
        for bad in [
            "uid:1",
            "unix:uid:",
            "unix:uid:-1",
            "unix:uid:99999999999",
            "unix:path:x",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(Selector::parse_all(&[]).is_err());
    }

    #[test]
    fn svid_debug_hides_the_key() {
        let svid = X509Svid {
            spiffe_id: SpiffeId::parse("spiffe://a/b").expect("valid"),
            cert_chain_pem: String::new(),
            key_pem: "PRIVATE-MATERIAL".into(),
            bundle_pem: String::new(),
            not_after: 0,
            not_before: 0,
        };
        assert!(!format!("{svid:?}").contains("PRIVATE-MATERIAL"));
    }
}
