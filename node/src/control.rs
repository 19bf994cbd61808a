//! The control client of coordinator mode.
//!
//! This file is the protocol core, without I/O or clocks (`now` is passed in as Unix seconds):
//! - [`NetmapTracker`]: which netmap is in force, applying `Full` and `Delta` updates, expiry;
//! - [`dataplane_config`]: the data-plane configuration a netmap stands for;
//! - [`judge_cached`]: whether the netmap on disk may be used at start (fail-static, never
//!   fail-open);
//! - [`CertValidity`]: node certificate expiry, clock skew and the renewal time;
//! - [`Backoff`]: reconnect delays, with the jitter passed in;
//! - [`reauth_delay`]: when to re-authenticate ahead of a `max_session` deadline;
//! - [`classify`]: what a refusal from the coordinator means for the node.
//!
//! The I/O shell is in [`client`] (QUIC connections, enrollment, the session loop) and
//! [`tls`] (certificate verification).

pub mod client;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use ztnet_proto::control::{
    ControlError, MAX_FLOWS_ANSWERED, Netmap, NetmapUpdate, NetmapVersion, NodeMsg, PeerInfo,
};

use crate::netconfig::{DataplaneConfig, PeerConfig};

/// Persistent keepalive given to every peer, in seconds: keeps NAT bindings open.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

/// Where the control client puts what it learns: the running data plane, or in tests a sink
/// that records configurations.
pub trait DataplaneSink: Send + Sync {
    /// Applies a configuration atomically.
    fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()>;
    /// The UDP port the data plane listens on.
    fn listen_port(&self) -> u16;
    /// Local addresses worth reporting, with the listen port.
    fn local_endpoints(&self) -> Vec<SocketAddr>;
    /// Records whether the control channel is up.
    fn set_control_connected(&self, connected: bool);
    /// Key mismatches the data plane saw since the last call (FC-20).
    fn take_key_mismatches(&self) -> Vec<crate::dataplane::peers::KeyMismatch> {
        Vec::new()
    }
    /// Whether [`DataplaneSink::open_flows`] tells the truth (a sink without a filter does
    /// not, and the session then does not announce the flow query).
    fn answers_flow_queries(&self) -> bool {
        false
    }
    /// At most `limit` open flows with peers in the configuration in force, and whether there
    /// were more.
    fn open_flows(&self, limit: usize) -> (Vec<netpolicy::OpenFlow>, bool) {
        let _ = limit;
        (Vec::new(), false)
    }
}

/// The answer to a [`ztnet_proto::control::ServerMsg::FlowQuery`]: the sink's open flows, at
/// most [`MAX_FLOWS_ANSWERED`].
pub fn flow_answer(sink: &dyn DataplaneSink, id: u64) -> NodeMsg {
    let (flows, truncated) = sink.open_flows(MAX_FLOWS_ANSWERED);
    tracing::debug!(flows = flows.len(), truncated, "open flows asked for");
    NodeMsg::Flows {
        id,
        flows,
        truncated,
    }
}

/// The data-plane configuration for a netmap at `now` (Unix seconds): its addresses and
/// routes, each peer with its endpoints (the first preferred) and its next key, and its
/// filter. A peer whose key expired by `now` is left out (FC-17): this node drops it by its own
/// clock, whatever the coordinator says or fails to say.
pub fn dataplane_config(netmap: &Netmap, now: u64) -> DataplaneConfig {
    let peers = netmap
        .peers
        .iter()
        .filter(|p| !key_expired(p, now))
        .map(|p| PeerConfig {
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.endpoints.first().copied(),
            endpoints: p.endpoints.clone(),
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: Some(PERSISTENT_KEEPALIVE),
            identity: Some(p.identity.clone()),
            preshared_key: None,
            next_public_key: p.next_public_key,
        })
        .collect();
    DataplaneConfig {
        node_name: Some(netmap.node.name.clone()),
        version: Some(netmap.version.0),
        addresses: netmap.node.addresses.clone(),
        routes: netmap.node.routes.clone(),
        peers,
        filter: netmap.filter.clone(),
        private_key: None,
    }
}

/// Whether a peer's key has expired at `now`.
pub fn key_expired(peer: &PeerInfo, now: u64) -> bool {
    peer.key_expires_at.is_some_and(|at| at <= now)
}

/// The peers of a netmap whose key has expired at `now`, by name.
pub fn expired_peers(netmap: &Netmap, now: u64) -> Vec<String> {
    netmap
        .peers
        .iter()
        .filter(|p| key_expired(p, now))
        .map(|p| p.name.clone())
        .collect()
}

/// The next time (Unix seconds, after `now`) at which a peer key of `netmap` expires.
pub fn next_key_expiry(netmap: &Netmap, now: u64) -> Option<u64> {
    netmap
        .peers
        .iter()
        .filter_map(|p| p.key_expires_at)
        .filter(|&at| at > now)
        .min()
}

/// Whether this node should start a key rotation at `now` by its netmap (half its key's
/// life has passed).
pub fn rotation_due(netmap: &Netmap, now: u64) -> bool {
    netmap.node.key_rotate_at.is_some_and(|at| at <= now)
}

/// A configuration that passes nothing: no peers, the empty filter, no netmap version.
pub fn deny_all_config(node_name: Option<String>) -> DataplaneConfig {
    DataplaneConfig {
        node_name,
        ..DataplaneConfig::default()
    }
}

/// What to do with the netmap found on disk at start.
#[derive(Debug, Clone, PartialEq)]
pub enum CachedNetmap {
    /// Not expired: start the data plane from it at once.
    Usable(Box<Netmap>),
    /// Expired: not used; the node passes nothing until the coordinator sends a new one.
    Expired {
        /// Its version.
        version: NetmapVersion,
        /// When it expired, Unix seconds.
        expires_at: u64,
    },
    /// No netmap on disk.
    Missing,
}

/// Decides whether a cached netmap may be used at `now`.
pub fn judge_cached(netmap: Option<Netmap>, now: u64) -> CachedNetmap {
    match netmap {
        None => CachedNetmap::Missing,
        Some(n) if n.expires_at <= now => CachedNetmap::Expired {
            version: n.version,
            expires_at: n.expires_at,
        },
        Some(n) => CachedNetmap::Usable(Box::new(n)),
    }
}

/// Why an update was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpdateRefused {
    /// A delta that does not start at the version in force: reconnect to get a full netmap.
    #[error("netmap delta does not apply: {0}")]
    DeltaMismatch(ControlError),
    /// The netmap had already expired when it arrived: clock skew, or a stale coordinator.
    #[error("netmap v{} arrived already expired (at {}); is this node's clock right?",
        .version.0, crate::control::unix_to_rfc3339(*.expires_at))]
    ArrivedExpired {
        /// Its version.
        version: NetmapVersion,
        /// Its expiry, Unix seconds.
        expires_at: u64,
    },
}

/// The netmap in force, and the rules for changing it.
///
/// Call [`prepare`](Self::prepare) with each update to get the netmap it leads to, apply that
/// to the data plane, then [`commit`](Self::commit) it. Call [`expire`](Self::expire)
/// periodically: a netmap past its expiry is dropped, and the node must then pass nothing.
#[derive(Debug, Clone, Default)]
pub struct NetmapTracker {
    current: Option<Netmap>,
}

impl NetmapTracker {
    /// Starts from a netmap already in force (from disk), or none.
    pub fn new(current: Option<Netmap>) -> NetmapTracker {
        NetmapTracker { current }
    }

    /// The netmap in force.
    pub fn current(&self) -> Option<&Netmap> {
        self.current.as_ref()
    }

    /// Its version, for `Hello`.
    pub fn version(&self) -> Option<NetmapVersion> {
        self.current.as_ref().map(|n| n.version)
    }

    /// The netmap an update leads to, without changing anything.
    pub fn prepare(&self, update: &NetmapUpdate, now: u64) -> Result<Netmap, UpdateRefused> {
        let next = match update {
            // A full netmap is authoritative, whatever version it carries.
            NetmapUpdate::Full(n) => n.clone(),
            NetmapUpdate::Delta(d) => {
                let Some(cur) = &self.current else {
                    return Err(UpdateRefused::DeltaMismatch(ControlError {
                        code: "protocol".into(),
                        message: format!(
                            "delta {}->{} arrived but no netmap is in force",
                            d.from.0, d.version.0
                        ),
                    }));
                };
                let mut n = cur.clone();
                n.apply(d).map_err(UpdateRefused::DeltaMismatch)?;
                n
            }
        };
        if next.expires_at <= now {
            return Err(UpdateRefused::ArrivedExpired {
                version: next.version,
                expires_at: next.expires_at,
            });
        }
        Ok(next)
    }

    /// Makes a prepared netmap the one in force.
    pub fn commit(&mut self, netmap: Netmap) {
        self.current = Some(netmap);
    }

    /// Drops the netmap in force if it expired at `now`; returns it when that happened.
    pub fn expire(&mut self, now: u64) -> Option<Netmap> {
        if self.current.as_ref().is_some_and(|n| n.expires_at <= now) {
            return self.current.take();
        }
        None
    }

    /// When the netmap in force expires.
    pub fn expires_at(&self) -> Option<u64> {
        self.current.as_ref().map(|n| n.expires_at)
    }

    /// Forgets the netmap (revocation).
    pub fn clear(&mut self) {
        self.current = None;
    }
}

/// The validity window of a node certificate, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertValidity {
    /// NotBefore.
    pub not_before: u64,
    /// NotAfter.
    pub not_after: u64,
}

/// How a certificate stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertTime {
    /// Inside its window.
    Valid,
    /// Past NotAfter.
    Expired,
    /// Before NotBefore: this node's clock is behind.
    NotYetValid,
}

impl CertValidity {
    /// Reads the window of the first certificate in a PEM.
    pub fn from_pem(pem: &str) -> Result<CertValidity, String> {
        let der = tls::certs(pem, "node.pem").map_err(|e| e.to_string())?;
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
            .map_err(|e| format!("node.pem: {e}"))?;
        let v = cert.validity();
        Ok(CertValidity {
            not_before: v.not_before.timestamp().max(0) as u64,
            not_after: v.not_after.timestamp().max(0) as u64,
        })
    }

    /// Judges the certificate at `now`.
    pub fn judge(&self, now: u64) -> CertTime {
        if now < self.not_before {
            CertTime::NotYetValid
        } else if now >= self.not_after {
            CertTime::Expired
        } else {
            CertTime::Valid
        }
    }

    /// When to ask for a new certificate: half its life.
    pub fn renew_at(&self) -> u64 {
        self.renew_at_fraction(0.5)
    }

    /// When `fraction` (clamped to 0..=1) of its life has passed.
    pub fn renew_at_fraction(&self, fraction: f64) -> u64 {
        let life = self.not_after.saturating_sub(self.not_before);
        self.not_before + (life as f64 * fraction.clamp(0.0, 1.0)) as u64
    }

    /// A plain sentence for an unusable certificate (FC-22), or `None` when it is valid.
    pub fn problem(&self, now: u64) -> Option<String> {
        match self.judge(now) {
            CertTime::Valid => None,
            CertTime::Expired => Some(format!(
                "node certificate expired at {} (this node's clock says {}): it was offline \
                 longer than the certificate's life, or its clock is fast; renewing it through \
                 the coordinator",
                unix_to_rfc3339(self.not_after),
                unix_to_rfc3339(now)
            )),
            CertTime::NotYetValid => Some(format!(
                "node certificate is not yet valid until {} (this node's clock says {}): \
                 clock skew, fix this node's clock",
                unix_to_rfc3339(self.not_before),
                unix_to_rfc3339(now)
            )),
        }
    }
}

/// The least time before a session deadline at which the node re-authenticates.
pub const REAUTH_LEAD_MIN: Duration = Duration::from_secs(3);

/// How long from now to open a new session, told a `max_session` of `max_session_secs` with
/// `remaining_secs` left: a tenth of `max_session` before the deadline, at least
/// [`REAUTH_LEAD_MIN`] and at most half of it; at once when less than that is left.
pub fn reauth_delay(max_session_secs: u64, remaining_secs: u64) -> Duration {
    let max = Duration::from_secs(max_session_secs);
    let lead = (max / 10).max(REAUTH_LEAD_MIN).min(max / 2);
    Duration::from_secs(remaining_secs).saturating_sub(lead)
}

/// Exponential reconnect delays from [`Backoff::MIN`] to [`Backoff::MAX`], with jitter.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The shortest delay.
    pub const MIN: Duration = Duration::from_millis(500);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(30);

    /// The next delay. `jitter` in `[0, 1)` spreads it over the upper half of the current
    /// step, so that nodes cut off together do not come back together.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = Self::MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(Self::MAX);
        self.attempt = self.attempt.saturating_add(1);
        let j = jitter.clamp(0.0, 1.0);
        step.mul_f64(0.5 + 0.5 * j).max(Self::MIN)
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a [`ControlError`] means for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node is revoked or unknown: stop passing traffic and exit.
    Revoked,
    /// The join token cannot be used: the operator must make a new one.
    NeedsNewToken,
    /// Enrollment asked for a name another node has.
    NameTaken,
    /// Anything else: retry later.
    Retry,
}

/// Sorts a refusal by its code.
pub fn classify(err: &ControlError) -> Refusal {
    match err.code.as_str() {
        "revoked" | "unknown-node" => Refusal::Revoked,
        "token-invalid" | "token-expired" | "token-used-up" => Refusal::NeedsNewToken,
        "name-taken" => Refusal::NameTaken,
        _ => Refusal::Retry,
    }
}

/// Unix seconds in RFC 3339, UTC.
pub fn unix_to_rfc3339(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;
    use netpolicy::FilterSpec;
    use ztnet_proto::WgKey;
    use ztnet_proto::control::{Identity, NetmapDelta, PeerInfo, SelfInfo};

    use super::*;

    fn identity(name: &str) -> Identity {
        Identity {
            spiffe_id: format!("spiffe://td/ns/prod/node/{name}"),
            namespace: "prod".into(),
            tags: vec!["web".into()],
        }
    }

    fn peer(name: &str, byte: u8) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            public_key: WgKey([byte; 32]),
            endpoints: vec![
                format!("192.0.2.{byte}:51820").parse().expect("addr"),
                format!("198.51.100.{byte}:51820").parse().expect("addr"),
            ],
            allowed_ips: vec![format!("100.64.0.{byte}/32").parse().expect("net")],
            identity: identity(name),
            key_expires_at: None,
            next_public_key: None,
        }
    }

    fn netmap(version: u64, expires_at: u64, peers: Vec<PeerInfo>) -> Netmap {
        Netmap {
            version: NetmapVersion(version),
            network: "prod-vpc".into(),
            node: SelfInfo {
                name: "n1".into(),
                identity: identity("n1"),
                addresses: vec!["100.64.0.1/16".parse::<IpNet>().expect("net")],
                routes: vec!["100.64.0.0/16".parse::<IpNet>().expect("net")],
                key_expires_at: None,
                key_rotate_at: None,
                quarantine: None,
            },
            peers,
            filter: FilterSpec::default(),
            expires_at,
            bundle_pem: None,
        }
    }

    #[test]
    fn config_uses_first_endpoint_and_keepalive() {
        let cfg = dataplane_config(&netmap(3, 100, vec![peer("a", 2), peer("b", 3)]), 10);
        assert_eq!(cfg.version, Some(3));
        assert_eq!(cfg.node_name.as_deref(), Some("n1"));
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(
            cfg.peers[0].endpoint,
            Some("192.0.2.2:51820".parse().expect("addr"))
        );
        assert_eq!(cfg.peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            cfg.peers[1].identity.as_ref().map(|i| i.namespace.as_str()),
            Some("prod")
        );
        assert_eq!(
            cfg.routes,
            vec!["100.64.0.0/16".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn a_peer_is_dropped_when_its_key_expires_by_this_nodes_clock() {
        let mut a = peer("a", 2);
        a.key_expires_at = Some(1000);
        a.next_public_key = Some(WgKey([9; 32]));
        let mut b = peer("b", 3);
        b.key_expires_at = Some(2000);
        let mut n = netmap(3, 10_000, vec![a, b, peer("c", 4)]);
        n.node.key_rotate_at = Some(500);
        let names =
            |c: &DataplaneConfig| c.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let before = dataplane_config(&n, 999);
        assert_eq!(names(&before), ["a", "b", "c"]);
        assert_eq!(before.peers[0].next_public_key, Some(WgKey([9; 32])));
        assert_eq!(names(&dataplane_config(&n, 1000)), ["b", "c"]);
        assert_eq!(names(&dataplane_config(&n, 2000)), ["c"]);
        assert_eq!(expired_peers(&n, 1500), ["a"]);
        assert_eq!(next_key_expiry(&n, 999), Some(1000));
        assert_eq!(next_key_expiry(&n, 1000), Some(2000));
        assert_eq!(next_key_expiry(&n, 2000), None);
        assert!(!rotation_due(&n, 499) && rotation_due(&n, 500));
    }

    #[test]
    fn deny_all_config_has_no_peers_and_the_empty_filter() {
        let cfg = deny_all_config(Some("n1".into()));
        assert!(cfg.peers.is_empty());
        assert_eq!(cfg.filter, FilterSpec::default());
        assert_eq!(cfg.version, None);
    }

    #[test]
    fn expired_cached_netmap_is_not_used() {
        assert_eq!(judge_cached(None, 10), CachedNetmap::Missing);
        let n = netmap(4, 100, vec![]);
        assert_eq!(
            judge_cached(Some(n.clone()), 99),
            CachedNetmap::Usable(Box::new(n.clone()))
        );
        assert_eq!(
            judge_cached(Some(n), 100),
            CachedNetmap::Expired {
                version: NetmapVersion(4),
                expires_at: 100
            }
        );
    }

    #[test]
    fn delta_applies_on_top_of_the_version_in_force() {
        let mut t = NetmapTracker::new(None);
        let full = netmap(1, 1000, vec![peer("a", 2)]);
        let next = t
            .prepare(&NetmapUpdate::Full(full), 10)
            .expect("full applies");
        t.commit(next);

        let delta = NetmapDelta {
            from: NetmapVersion(1),
            version: NetmapVersion(2),
            upsert_peers: vec![peer("b", 3)],
            remove_peers: vec!["a".into()],
            filter: None,
            node: None,
            expires_at: 2000,
            bundle_pem: None,
        };
        let next = t
            .prepare(&NetmapUpdate::Delta(delta), 10)
            .expect("delta applies");
        assert_eq!(next.version, NetmapVersion(2));
        assert_eq!(
            next.peers
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(
            t.version(),
            Some(NetmapVersion(1)),
            "prepare changes nothing"
        );
        t.commit(next);
        assert_eq!(t.version(), Some(NetmapVersion(2)));
        assert_eq!(t.expires_at(), Some(2000));
    }

    #[test]
    fn delta_from_another_version_asks_for_a_reconnect() {
        let mut t = NetmapTracker::new(Some(netmap(5, 1000, vec![])));
        let delta = NetmapDelta {
            from: NetmapVersion(4),
            version: NetmapVersion(6),
            upsert_peers: vec![],
            remove_peers: vec![],
            filter: None,
            node: None,
            expires_at: 2000,
            bundle_pem: None,
        };
        let update = NetmapUpdate::Delta(delta);
        assert!(matches!(
            t.prepare(&update, 10),
            Err(UpdateRefused::DeltaMismatch(_))
        ));
        t.clear();
        assert!(matches!(
            t.prepare(&update, 10),
            Err(UpdateRefused::DeltaMismatch(_))
        ));
    }

    #[test]
    fn netmap_expired_on_arrival_is_refused() {
        let t = NetmapTracker::new(None);
        let err = t
            .prepare(&NetmapUpdate::Full(netmap(1, 100, vec![])), 100)
            .expect_err("expired");
        assert!(err.to_string().contains("clock"), "{err}");
    }

    #[test]
    fn tracker_drops_a_netmap_when_it_expires() {
        let mut t = NetmapTracker::new(Some(netmap(1, 100, vec![])));
        assert!(t.expire(99).is_none());
        assert_eq!(t.expire(100).map(|n| n.version), Some(NetmapVersion(1)));
        assert!(t.current().is_none());
        assert!(t.expire(200).is_none());
    }

    #[test]
    fn certificate_window_gives_expiry_skew_and_renewal() {
        let v = CertValidity {
            not_before: 1000,
            not_after: 1000 + 86_400,
        };
        assert_eq!(v.judge(999), CertTime::NotYetValid);
        assert_eq!(v.judge(1000), CertTime::Valid);
        assert_eq!(v.judge(1000 + 86_400), CertTime::Expired);
        assert_eq!(v.renew_at(), 1000 + 43_200);
        assert_eq!(v.renew_at_fraction(0.0), 1000);
        assert_eq!(v.renew_at_fraction(2.0), 1000 + 86_400);
        assert!(v.problem(5000).is_none());
        let expired = v.problem(200_000).expect("expired");
        assert!(
            expired.contains("expired at 1970-01-02T00:16:40Z"),
            "{expired}"
        );
        let early = v.problem(10).expect("not yet valid");
        assert!(
            early.contains("clock skew") && early.contains("not yet valid"),
            "{early}"
        );
    }

    #[test]
    fn certificate_window_is_read_from_pem() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["n1".into()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 3);
        let cert = params.self_signed(&key).expect("cert");
        let v = CertValidity::from_pem(&cert.pem()).expect("parses");
        assert_eq!(v.not_after - v.not_before, 2 * 86_400);
        assert!(CertValidity::from_pem("garbage").is_err());
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(0.0), Backoff::MIN);
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(2));
        for _ in 0..20 {
            let d = b.next_delay(0.99);
            assert!(d <= Backoff::MAX && d >= Backoff::MIN);
        }
        assert_eq!(b.next_delay(1.0), Backoff::MAX);
        assert_eq!(b.next_delay(0.0), Backoff::MAX / 2);
        b.reset();
        assert_eq!(b.next_delay(0.0), Backoff::MIN);
    }

    #[test]
    fn reauthentication_is_due_a_tenth_of_max_session_early_and_at_least_three_seconds() {
        let s = Duration::from_secs;
        // The shortest max_session: 3 s early, so 7 s into a fresh session.
        assert_eq!(reauth_delay(10, 10), s(7));
        assert_eq!(reauth_delay(10, 9), s(6));
        // Eight hours: 48 minutes early.
        assert_eq!(reauth_delay(8 * 3600, 8 * 3600), s(8 * 3600 - 48 * 60));
        // Told late, or a deadline already due: at once.
        assert_eq!(reauth_delay(10, 2), s(0));
        assert_eq!(reauth_delay(10, 0), s(0));
        // Never more than half of a (malformed) tiny max_session early.
        assert_eq!(reauth_delay(4, 4), s(2));
    }

    #[test]
    fn refusals_are_sorted_by_code() {
        let e = |c: &str| ControlError {
            code: c.into(),
            message: String::new(),
        };
        assert_eq!(classify(&e("revoked")), Refusal::Revoked);
        assert_eq!(classify(&e("unknown-node")), Refusal::Revoked);
        assert_eq!(classify(&e("token-used-up")), Refusal::NeedsNewToken);
        assert_eq!(classify(&e("token-expired")), Refusal::NeedsNewToken);
        assert_eq!(classify(&e("name-taken")), Refusal::NameTaken);
        assert_eq!(classify(&e("internal")), Refusal::Retry);
    }
}
