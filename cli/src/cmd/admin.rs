//! Commands that go through the coordinator's admin API: login, network, token, node, audit.

use anyhow::{Context, Result, bail};
use ztnet_proto::admin::{
    AuditEvent, CreateNetwork, CreateToken, Enforcement, Network, NodeInfo, Reach, RevokeNode,
    SetEndpoint, TokenCreated, TokenInfo,
};

use crate::args::{
    GlobalArgs, LoginArgs, NetworkCmd, NodeCmd, OutputFormat, TokenCmd, TokenCreateArgs,
};
use crate::client::ApiClient;
use crate::config::{self, ConfigFile};
use crate::output::{self, Table, emit, fields, list, noteln, time};

/// `ztnet login`: checks the settings against the coordinator, then saves them.
pub fn login(global: &GlobalArgs, args: &LoginArgs) -> Result<()> {
    let coordinator = global
        .coordinator
        .clone()
        .context("login needs --coordinator HOST:PORT")?;
    config::check_address(&coordinator)?;
    let key_file = global
        .api_key_file
        .as_ref()
        .context("login needs --api-key-file FILE")?;
    let ca_file = global
        .ca_cert
        .as_ref()
        .context("login needs --ca-cert FILE")?;
    let key_file = std::fs::canonicalize(key_file)
        .with_context(|| format!("API key file {}", key_file.display()))?;
    let ca_file = std::fs::canonicalize(ca_file)
        .with_context(|| format!("CA certificate {}", ca_file.display()))?;

    let resolved = config::Resolved {
        coordinator: coordinator.clone(),
        api_key: config::read_api_key_file(&key_file)?,
        ca_pem: std::fs::read(&ca_file)
            .with_context(|| format!("reading CA certificate {}", ca_file.display()))?,
        ca_path: ca_file.clone(),
    };
    let client = ApiClient::new(&resolved)?;
    if !args.no_verify {
        let _: Vec<Network> = client
            .get("/v1/networks")
            .context("checking the settings (use --no-verify to save them anyway)")?;
    }

    let path = config::config_path()?;
    let file = ConfigFile {
        coordinator: Some(coordinator),
        api_key_file: Some(key_file),
        ca_cert: Some(ca_file),
    };
    config::save_file(&path, &file)?;
    noteln!("saved to {}", path.display());
    Ok(())
}

/// `ztnet network ...`.
pub fn network(client: &ApiClient, fmt: OutputFormat, cmd: &NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create(a) => {
            let body = CreateNetwork {
                name: a.name.clone(),
                cidr: a.cidr,
                zero_trust: a.zero_trust,
            };
            let net: Network = client.post("/v1/networks", &body)?;
            emit(fmt, &net, network_fields)
        }
        NetworkCmd::List => {
            let nets: Vec<Network> = client.get("/v1/networks")?;
            emit(fmt, &nets, |nets| {
                let mut t = Table::new(&["NAME", "CIDR", "CIDR6", "MODE", "NODES", "POLICY"]);
                for n in nets {
                    t.row(vec![
                        n.name.clone(),
                        n.cidr.to_string(),
                        n.cidr6.to_string(),
                        mode(n.zero_trust).into(),
                        n.nodes.to_string(),
                        policy_version(n.policy_version),
                    ]);
                }
                t.render("no networks")
            })
        }
        NetworkCmd::Show(a) => {
            let net: Network = client.get(&format!("/v1/networks/{}", segment(&a.name)?))?;
            emit(fmt, &net, network_fields)
        }
        NetworkCmd::Set(a) => {
            let body = ztnet_proto::admin::NetworkSettings {
                key_ttl_secs: a.key_ttl.map(|d| d.as_secs()),
            };
            let path = format!("/v1/networks/{}", segment(&a.name)?);
            let net: Network = client.patch(&path, &body)?;
            emit(fmt, &net, network_fields)
        }
    }
}

fn network_fields(n: &Network) -> String {
    fields(&[
        ("name", n.name.clone()),
        ("cidr", n.cidr.to_string()),
        ("cidr6", n.cidr6.to_string()),
        ("mode", mode(n.zero_trust).into()),
        ("nodes", n.nodes.to_string()),
        ("policy", policy_version(n.policy_version)),
        ("key ttl", key_ttl(n.key_ttl_secs)),
        ("created", time(n.created_at)),
    ])
}

fn key_ttl(secs: u64) -> String {
    if secs == 0 {
        "keys do not expire (not zero-trust)".into()
    } else {
        humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
    }
}

fn mode(zero_trust: bool) -> &'static str {
    if zero_trust { "zero-trust" } else { "standard" }
}

fn policy_version(v: u64) -> String {
    if v == 0 {
        "none (deny all)".into()
    } else {
        format!("v{v}")
    }
}

/// `ztnet token ...`.
pub fn token(client: &ApiClient, fmt: OutputFormat, cmd: &TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create(a) => token_create(client, fmt, a),
        TokenCmd::List(a) => {
            let path = format!("/v1/networks/{}/tokens", segment(&a.network)?);
            let tokens: Vec<TokenInfo> = client.get(&path)?;
            emit(fmt, &tokens, |tokens| {
                let mut t = Table::new(&[
                    "ID",
                    "NAMESPACE",
                    "TAGS",
                    "USES LEFT",
                    "EXPIRES",
                    "STATE",
                    "USED BY",
                ]);
                let now = output::now_unix();
                for k in tokens {
                    t.row(vec![
                        k.id.clone(),
                        k.namespace.clone(),
                        list(&k.tags),
                        format!("{}/{}", k.uses_left, k.uses),
                        time(k.expires_at),
                        token_state(k, now).into(),
                        list(&k.used_by),
                    ]);
                }
                t.render("no tokens")
            })
        }
        TokenCmd::Revoke(a) => {
            let path = format!(
                "/v1/networks/{}/tokens/{}",
                segment(&a.network)?,
                segment(&a.id)?
            );
            let info: TokenInfo = client.delete(&path)?;
            emit(fmt, &info, |k| {
                format!("revoked token {} in {}\n", k.id, k.network)
            })
        }
    }
}

fn token_create(client: &ApiClient, fmt: OutputFormat, a: &TokenCreateArgs) -> Result<()> {
    let body = CreateToken {
        namespace: a.namespace.clone(),
        tags: a.tags.clone(),
        uses: a.uses,
        ttl_secs: a.ttl.as_secs().max(1),
    };
    let path = format!("/v1/networks/{}/tokens", segment(&a.network)?);
    let created: TokenCreated = client.post(&path, &body)?;
    if fmt == OutputFormat::Json {
        return emit(fmt, &created, |_| String::new());
    }
    // The token alone on stdout, so `TOKEN=$(ztnet token create ...)` works.
    noteln!(
        "token {} for network {}: {} use(s), expires {}",
        created.info.id,
        created.info.network,
        created.info.uses,
        time(created.info.expires_at)
    );
    output::write_stdout(&format!("{}\n", created.token))
}

fn token_state(k: &TokenInfo, now: u64) -> &'static str {
    if k.revoked {
        "revoked"
    } else if k.expires_at <= now {
        "expired"
    } else if k.uses_left == 0 {
        "used up"
    } else {
        "valid"
    }
}

/// `ztnet node ...`.
pub fn node(client: &ApiClient, fmt: OutputFormat, cmd: &NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List(a) => {
            let nodes = all_nodes(client, &a.network)?;
            emit(fmt, &nodes, |nodes| {
                let mut t = Table::new(&[
                    "NAME",
                    "NAMESPACE",
                    "TAGS",
                    "ADDRESSES",
                    "STATUS",
                    "NETMAP",
                    "ENDPOINTS",
                ]);
                for n in nodes {
                    t.row(vec![
                        n.name.clone(),
                        n.namespace.clone(),
                        list(&n.tags),
                        list(&n.addresses),
                        online(n),
                        netmap_state(n),
                        if n.state == "revoked" {
                            "-".into()
                        } else {
                            list(&n.endpoints)
                        },
                    ]);
                }
                t.render("no nodes")
            })
        }
        NodeCmd::Show(a) => {
            let path = format!(
                "/v1/networks/{}/nodes/{}",
                segment(&a.network)?,
                segment(&a.name)?
            );
            let n: NodeInfo = client.get(&path)?;
            emit(fmt, &n, node_fields)
        }
        NodeCmd::Delete(a) => {
            let path = format!(
                "/v1/networks/{}/nodes/{}",
                segment(&a.network)?,
                segment(&a.name)?
            );
            let n: NodeInfo = client.delete(&path)?;
            let measured = measured(client, &a.network, n.reach.as_ref(), fmt);
            emit(fmt, &n, |n| {
                format!(
                    "deleted node {} from {}: {}\n",
                    n.name,
                    n.network,
                    reach_words(&n.name, n.reach.as_ref(), measured.as_ref())
                )
            })
        }
        NodeCmd::Revoke(a) => {
            let path = format!(
                "/v1/networks/{}/nodes/{}/revoke",
                segment(&a.network)?,
                segment(&a.name)?
            );
            let body = RevokeNode {
                reason: a.reason.clone(),
            };
            let n: NodeInfo = client.post(&path, &body)?;
            let measured = measured(client, &a.network, n.reach.as_ref(), fmt);
            emit(fmt, &n, |n| {
                format!(
                    "revoked node {} in {}: it left the netmaps, its control channel was \
                     closed, and the coordinator refuses its key from now on; {}\n",
                    n.name,
                    n.network,
                    reach_words(&n.name, n.reach.as_ref(), measured.as_ref())
                )
            })
        }
        NodeCmd::RotateKey(a) => {
            let path = format!(
                "/v1/networks/{}/nodes/{}/rotate-key",
                segment(&a.network)?,
                segment(&a.name)?
            );
            let body = ztnet_proto::admin::RotateKey {
                order: Some(a.order.clone()),
                gap_secs: Some(a.gap.as_secs()),
            };
            let n: NodeInfo = client.post(&path, &body)?;
            emit(fmt, &n, |n| {
                format!(
                    "asked node {} in {} to rotate its key; `ztnet audit` shows node.key-rotate \
                     when it is done\n",
                    n.name, n.network
                )
            })
        }
        NodeCmd::SetEndpoint(a) => {
            let path = format!(
                "/v1/networks/{}/nodes/{}/endpoint",
                segment(&a.network)?,
                segment(&a.name)?
            );
            let body = SetEndpoint {
                endpoint: if a.clear { None } else { a.endpoint },
                expected_revision: a.revision,
            };
            let n: NodeInfo = client.put(&path, &body)?;
            emit(fmt, &n, |n| match n.pinned_endpoint {
                Some(e) => format!(
                    "node {} in {}: endpoint pinned to {e} (revision {})\n",
                    n.name, n.network, n.endpoint_revision
                ),
                None => format!(
                    "node {} in {}: endpoint pin cleared (revision {})\n",
                    n.name, n.network, n.endpoint_revision
                ),
            })
        }
    }
}

/// How long the CLI waits for the connected peers' acknowledgements of a removal.
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The measured enforcement of a removal's audit entry, once its connected peers acknowledged
/// (polled for at most [`ACK_WAIT`]); `None` when it is not in yet or not needed.
fn measured(
    client: &ApiClient,
    network: &str,
    reach: Option<&Reach>,
    fmt: OutputFormat,
) -> Option<Enforcement> {
    let reach = reach?;
    if reach.connected.is_empty() || !matches!(fmt, OutputFormat::Table) {
        return None;
    }
    let path = format!("/v1/networks/{}/audit", segment(network).ok()?);
    let deadline = std::time::Instant::now() + ACK_WAIT;
    loop {
        let events: Vec<AuditEvent> = client.get(&path).ok()?;
        let e = events
            .into_iter()
            .find(|e| e.id == reach.audit_id)
            .and_then(|e| e.enforcement);
        if let Some(e) = e.filter(|e| e.ms.is_some() || !e.unacknowledged.is_empty()) {
            return Some(e);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Where a removal of `subject` holds, in words: the peers that refuse it now, and the offline
/// ones that keep accepting it until they reconnect.
pub fn reach_words(subject: &str, reach: Option<&Reach>, e: Option<&Enforcement>) -> String {
    let Some(r) = reach else {
        return "its peers were told".into();
    };
    let connected = r.connected.len();
    let total = connected + r.offline.len();
    let mut out = if total == 0 {
        "no peer had it in its netmap".to_string()
    } else {
        match e {
            Some(e) if e.unacknowledged.is_empty() => {
                let ms = e.ms.unwrap_or_default();
                if r.offline.is_empty() {
                    format!("refused by all {connected} of its peers (acknowledged in {ms} ms)")
                } else {
                    format!("refused by {connected} of {total} peers (acknowledged in {ms} ms)")
                }
            }
            Some(e) => format!(
                "sent to {connected} connected peers; {} did not acknowledge: {}",
                e.unacknowledged.len(),
                e.unacknowledged.join(", ")
            ),
            None if connected == 0 => format!("no connected peer had it (0 of {total} peers)"),
            None => format!(
                "sent to {connected} connected peers of {total} (`ztnet audit` shows when they \
                 acknowledged)"
            ),
        }
    };
    if !r.offline.is_empty() {
        let named: Vec<String> = r
            .offline
            .iter()
            .map(|p| match p.last_seen {
                Some(t) => format!("{} (offline since {})", p.node, rfc3339(t)),
                None => format!("{} (never connected)", p.node),
            })
            .collect();
        let verb = if named.len() == 1 {
            "is offline and keeps"
        } else {
            "are offline and keep"
        };
        let until = match r.subject_key_expires_at {
            Some(at) => format!(
                "until it reconnects or {subject}'s key expires at {}",
                rfc3339(at)
            ),
            None => "until it reconnects".into(),
        };
        out.push_str(&format!(
            "; {} {verb} accepting {subject} {until}",
            named.join(", ")
        ));
    }
    out
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// `GET /v1/networks/N/nodes`.
/// The active nodes of a network (revoked ones left out).
pub fn node_list(client: &ApiClient, network: &str) -> Result<Vec<NodeInfo>> {
    let mut nodes = all_nodes(client, network)?;
    nodes.retain(|n| n.state != "revoked");
    Ok(nodes)
}

/// Every node the coordinator lists, revoked ones included.
fn all_nodes(client: &ApiClient, network: &str) -> Result<Vec<NodeInfo>> {
    client.get(&format!("/v1/networks/{}/nodes", segment(network)?))
}

fn node_fields(n: &NodeInfo) -> String {
    fields(&[
        ("name", n.name.clone()),
        ("network", n.network.clone()),
        ("namespace", n.namespace.clone()),
        ("tags", list(&n.tags)),
        ("spiffe id", n.spiffe_id.clone()),
        ("addresses", list(&n.addresses)),
        ("public key", n.public_key.to_base64()),
        ("key made", time(n.key_created_at)),
        (
            "key expires",
            n.key_expires_at.map_or_else(
                || "never (not a --zero-trust network)".into(),
                |at| format!("{} (rotated by the node at half its life)", time(at)),
            ),
        ),
        (
            "endpoints",
            format!(
                "{} (observed by the coordinator first, then reported by the node)",
                list(&n.endpoints)
            ),
        ),
        (
            "pinned endpoint",
            format!(
                "{} (revision {})",
                n.pinned_endpoint
                    .map_or_else(|| "-".to_string(), |e| e.to_string()),
                n.endpoint_revision
            ),
        ),
        ("status", online(n)),
        ("last seen", output::opt_time(n.last_seen)),
        ("netmap", netmap_state(n)),
        ("applied at", output::opt_time(n.applied_at)),
        (
            "version",
            if n.version.is_empty() {
                "-".into()
            } else {
                n.version.clone()
            },
        ),
        ("state", n.state.clone()),
        ("enrolled", time(n.created_at)),
        ("revoked", output::opt_time(n.revoked_at)),
        (
            "revoke reason",
            n.revoke_reason.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "quarantine",
            n.quarantine.clone().unwrap_or_else(|| "-".into()),
        ),
        ("posture", posture_text(n)),
    ])
}

/// The node's last posture report in one line.
fn posture_text(n: &NodeInfo) -> String {
    let Some(p) = &n.posture else {
        return "- (no report)".into();
    };
    let facts: Vec<String> = p.facts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut text = format!(
        "version {}, kernel {}, os {}, facts: {}",
        p.version,
        p.kernel,
        p.os,
        if facts.is_empty() {
            "-".into()
        } else {
            facts.join(" ")
        }
    );
    if let Some(e) = &p.error {
        text.push_str(&format!(" (facts not read: {e})"));
    }
    text
}

fn online(n: &NodeInfo) -> String {
    if let Some(q) = &n.quarantine {
        format!("quarantined: {q}")
    } else if n.state == "revoked" {
        match n.revoke_reason.as_deref() {
            Some(r) if !r.is_empty() => format!("revoked ({r})"),
            _ => "revoked".into(),
        }
    } else if n.online {
        "online".into()
    } else {
        "offline".into()
    }
}

fn netmap_state(n: &NodeInfo) -> String {
    if n.applied_version >= n.netmap_version {
        format!("v{} (applied)", n.applied_version)
    } else {
        format!("v{} (applied v{})", n.netmap_version, n.applied_version)
    }
}

/// `ztnet audit --network N`, or without a network (`--global`) the entries of no network.
pub fn audit(client: &ApiClient, fmt: OutputFormat, network: &Option<String>) -> Result<()> {
    let path = match network {
        Some(n) => format!("/v1/networks/{}/audit", segment(n)?),
        None => "/v1/audit".to_string(),
    };
    let events: Vec<AuditEvent> = client.get(&path)?;
    emit(fmt, &events, |events| {
        let mut t = Table::new(&[
            "ID", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL", "ENFORCED",
        ]);
        for e in events {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms);
            t.row(vec![
                e.id.to_string(),
                humantime::format_rfc3339_millis(at).to_string(),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone(),
                e.detail.clone(),
                enforced(e),
            ]);
        }
        t.render("no audit events")
    })
}

/// The measured time to enforcement of an audit entry: `12 ms (19 peers)`, the reason it was
/// not measured, `measuring` while the coordinator waits, `-` for entries that take no access.
fn enforced(e: &AuditEvent) -> String {
    match &e.enforcement {
        Some(x) => {
            let mut out = match x.ms {
                Some(_) if x.peers == 0 && !(x.pending_offline.is_empty() && x.late.is_empty()) => {
                    "no connected peer".to_string()
                }
                Some(_) if x.peers == 0 => "nothing to change".to_string(),
                Some(ms) if x.peers == 1 => format!("{ms} ms (1 peer)"),
                Some(ms) => format!("{ms} ms ({} peers)", x.peers),
                None if !x.pending_offline.is_empty() && x.unacknowledged.is_empty() => {
                    format!("measuring ({} peers)", x.peers)
                }
                None => return x.summary.clone(),
            };
            if !x.pending_offline.is_empty() {
                let names: Vec<&str> = x.pending_offline.iter().map(|p| p.node.as_str()).collect();
                out.push_str(&format!("; not yet on {} (offline)", names.join(", ")));
            }
            for l in &x.late {
                if l.removed {
                    out.push_str(&format!("; {} left", l.node));
                } else {
                    let after = match l.after_ms {
                        0..1000 => "under 1s".to_string(),
                        ms => humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
                            .to_string(),
                    };
                    out.push_str(&format!("; {} {after} later", l.node));
                }
            }
            out
        }
        None if matches!(
            e.action.as_str(),
            "node.revoke"
                | "node.delete"
                | "node.quarantine"
                | "node.release"
                | "node.key-expire"
                | "policy.apply"
        ) =>
        {
            // The coordinator tracks for 30 s; older entries without a figure predate it or
            // outlived a restart.
            let age = output::now_unix().saturating_sub(e.at_ms / 1000);
            if age < 35 {
                "measuring"
            } else {
                "not measured"
            }
            .into()
        }
        None => "-".into(),
    }
}

/// Checks a name before it goes into a URL path: letters, digits, `-`, `_`, `.`.
pub fn segment(name: &str) -> Result<&str> {
    if name.is_empty() {
        bail!("name is empty");
    }
    if let Some((i, ch)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        bail!(
            "name {name:?} has an invalid character {ch:?} at position {}; names use letters, \
             digits and '-'",
            i + 1
        );
    }
    if name == "." || name == ".." {
        bail!("name {name:?} is not a valid name");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztnet_proto::admin::OfflinePeer;

    fn reach(connected: &[&str], offline: &[&str], key: Option<u64>) -> Reach {
        Reach {
            audit_id: 7,
            connected: connected.iter().map(|s| s.to_string()).collect(),
            offline: offline
                .iter()
                .map(|s| OfflinePeer {
                    node: s.to_string(),
                    last_seen: Some(1_796_364_070),
                    netmap_version: 4,
                })
                .collect(),
            subject_key_expires_at: key,
        }
    }

    fn acked(ms: u64, peers: u32) -> Enforcement {
        Enforcement {
            ms: Some(ms),
            peers,
            acknowledged: peers,
            summary: String::new(),
            pending_offline: Vec::new(),
            late: Vec::new(),
            unacknowledged: Vec::new(),
            offline_keeps: None,
        }
    }

    #[test]
    fn the_enforced_column_never_reads_zero_peers() {
        let event = |x: Enforcement| AuditEvent {
            id: 1,
            at_ms: 0,
            actor: "admin".into(),
            action: "node.revoke".into(),
            target: "r1".into(),
            detail: String::new(),
            enforcement: Some(x),
        };
        assert_eq!(enforced(&event(acked(0, 0))), "nothing to change");
        assert_eq!(enforced(&event(acked(7, 1))), "7 ms (1 peer)");
        let mut late = acked(0, 0);
        late.late.push(ztnet_proto::admin::LateAck {
            node: "h1".into(),
            at_ms: 8_000,
            after_ms: 8_000,
            removed: false,
        });
        assert_eq!(enforced(&event(late)), "no connected peer; h1 8s later");
    }

    #[test]
    fn a_removal_names_the_offline_peers_that_still_accept_it() {
        let r = reach(&["a", "b", "c"], &["r2"], Some(1_796_450_470));
        let said = reach_words("r1", Some(&r), Some(&acked(12, 3)));
        assert_eq!(
            said,
            "refused by 3 of 4 peers (acknowledged in 12 ms); r2 (offline since \
             2026-12-04T06:01:10Z) is offline and keeps accepting r1 until it reconnects or \
             r1's key expires at 2026-12-05T06:01:10Z"
        );
        let none_online = reach_words("r1", Some(&reach(&[], &["r2"], None)), None);
        assert!(
            none_online.starts_with("no connected peer had it (0 of 1 peers); r2")
                && none_online.ends_with("keeps accepting r1 until it reconnects"),
            "{none_online}"
        );
        let all = reach_words("r1", Some(&reach(&["a"], &[], None)), Some(&acked(5, 1)));
        assert_eq!(all, "refused by all 1 of its peers (acknowledged in 5 ms)");
        assert_eq!(
            reach_words("r1", Some(&reach(&[], &[], None)), None),
            "no peer had it in its netmap"
        );
    }
}
