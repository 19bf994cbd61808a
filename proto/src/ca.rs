//! The admin API's CA rotation messages: `GET /v1/ca`, `POST /v1/ca/rotate`,
//! `POST /v1/ca/activate`. See docs/identity.md for the stages.

use serde::{Deserialize, Serialize};

/// Where the CAs stand.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaStatus {
    /// `steady`, `staged` or `retiring`.
    pub phase: String,
    /// One sentence: what happens next and what it waits for.
    pub summary: String,
    /// Every CA in the trust bundle, oldest first.
    pub authorities: Vec<CaAuthority>,
    /// In the `staged` phase: active nodes that have not yet acknowledged the new bundle.
    #[serde(default)]
    pub pending: Vec<PendingNode>,
    /// In the `staged` phase: the earliest activation (Unix seconds), once every SVID issued
    /// before the new CA was staged has expired.
    #[serde(default)]
    pub activate_after: Option<u64>,
    /// The trust bundle, PEM: what `ca.pem` and `bundle.pem` hold.
    pub bundle_pem: String,
    /// The audit entries of every CA step, oldest first.
    #[serde(default)]
    pub history: Vec<CaEvent>,
}

/// One CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaAuthority {
    /// 1 for the first CA, one more per rotation.
    pub generation: u32,
    /// SHA-256 fingerprint of its certificate (what join tokens pin).
    pub fingerprint: String,
    /// Subject common name.
    pub subject: String,
    /// `signing`, `staged` or `retiring`.
    pub role: String,
    /// Validity of the CA certificate, Unix seconds.
    pub not_before: u64,
    /// Validity of the CA certificate, Unix seconds.
    pub not_after: u64,
    /// When it was made (0: before rotation existed).
    pub added_at: u64,
    /// When it began to sign.
    #[serde(default)]
    pub activated_at: Option<u64>,
    /// When it leaves the bundle (a retiring CA).
    #[serde(default)]
    pub retire_at: Option<u64>,
}

/// A node the rotation waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingNode {
    /// Its network.
    pub network: String,
    /// Its name.
    pub node: String,
    /// Whether it has a control session now (an offline node acknowledges when it returns).
    pub online: bool,
}

/// `POST /v1/ca/activate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// Activate although some nodes or SVIDs have not caught up yet.
    #[serde(default)]
    pub force: bool,
}

/// One audited CA step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// API key name, or `coordinator` for an automatic step.
    pub actor: String,
    /// `ca.stage`, `ca.activate` or `ca.retire`.
    pub action: String,
    /// What happened, readable.
    pub detail: String,
}
