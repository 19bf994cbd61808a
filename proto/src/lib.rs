//! Every message that crosses a process boundary in ztnet: the control channel between a node
//! and the coordinator (QUIC), the admin API between the CLI and the coordinator (HTTPS/JSON),
//! and a node's local status socket. Also the shared value types that all three parse the same
//! way: WireGuard keys and join tokens.
//!
//! Versioning: `PROTOCOL_VERSION` is sent in the first control frame; fields are only added,
//! with `#[serde(default)]`, within one version.

pub mod admin;
pub mod ca;
pub mod control;
pub mod frame;
pub mod key;
pub mod names;
pub mod prefix;
pub mod report;
pub mod status;
pub mod token;
pub mod workload;

pub use key::{KeyError, PrivateKey, WgKey};
pub use token::{JoinToken, TokenError};

/// The version of the control protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol name of the control channel.
pub const CONTROL_ALPN: &[u8] = b"ztnet/1";

/// DNS name that the coordinator's TLS certificate carries and that nodes and the CLI verify.
pub const COORDINATOR_SERVER_NAME: &str = "ztnet-coordinator";
