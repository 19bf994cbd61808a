//! Static mode: `ztnet-node --config node.toml` runs the data plane from a file, without a
//! coordinator. The node compiles its policy itself, over an inventory made of itself and the
//! peers listed in the file.
//!
//! ```toml
//! [interface]
//! name = "ztnet0"                 # default ztnet0
//! private_key_file = "node.key"   # relative to this file; must be mode 0600
//! listen_port = 51820             # default 51820; 0: a free port the kernel picks
//! mtu = 1420                      # default 1420
//! addresses = ["10.90.0.1/16", "fd00:90::1/64"]
//! routes = ["10.95.0.0/24"]       # default: the networks of the addresses and the peers' IPs
//! policy_file = "policy.toml"     # none: every packet is dropped
//!
//! [identity]
//! name = "n1"
//! namespace = "default"
//! tags = ["web"]
//! trust_domain = "ztnet.local"
//!
//! [[peer]]
//! name = "n2"
//! public_key = "base64 key"
//! endpoint = "192.0.2.2:51820"
//! allowed_ips = ["10.90.0.2/32"]
//! namespace = "default"
//! tags = ["db"]
//! persistent_keepalive = 25
//! ```
//!
//! Every error names the file, the line and column, and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netpolicy::{FilterSpec, Inventory, NodeIdentity, Policy, Severity};
use serde::Deserialize;
use toml::Spanned;
use ztnet_proto::control::Identity;
use ztnet_proto::prefix::Prefix;
use ztnet_proto::{PrivateKey, WgKey, names};

use crate::netconfig::{DataplaneConfig, InterfaceConfig, PeerConfig};

/// A static configuration, loaded and checked.
#[derive(Debug, Clone)]
pub struct StaticConfig {
    /// Where it was read from.
    pub path: PathBuf,
    /// The interface settings (fixed for the life of the process).
    pub interface: InterfaceConfig,
    /// What the data plane runs (applied again at every reload).
    pub dataplane: DataplaneConfig,
    /// Warnings from the policy, as `file:line:column: message`.
    pub warnings: Vec<String>,
    /// The policy file, resolved against the config file's directory.
    pub policy_file: Option<PathBuf>,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A problem at a place in a file.
    #[error("{}:{line}:{column}: {message}", file.display())]
    At {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem with a whole file (cannot read it, wrong permissions).
    #[error("{}: {message}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    identity: RawIdentity,
    #[serde(default, rename = "peer")]
    peers: Vec<Spanned<RawPeer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    #[serde(default = "default_name")]
    name: String,
    private_key_file: Spanned<PathBuf>,
    #[serde(default = "default_port")]
    listen_port: Spanned<i64>,
    #[serde(default = "default_mtu")]
    mtu: Spanned<i64>,
    #[serde(default)]
    addresses: Vec<Spanned<Prefix>>,
    routes: Option<Vec<Prefix>>,
    policy_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: Spanned<String>,
    #[serde(default = "default_namespace")]
    namespace: Spanned<String>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default = "default_trust_domain")]
    trust_domain: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    public_key: Spanned<WgKey>,
    endpoint: Option<Spanned<String>>,
    #[serde(default)]
    allowed_ips: Vec<Spanned<Prefix>>,
    #[serde(default = "default_namespace")]
    namespace: Spanned<String>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    persistent_keepalive: Option<Spanned<i64>>,
}

/// The prefix lists of a config as text with their places; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PrefixLists {
    interface: PrefixListsInterface,
    peer: Vec<PrefixListsPeer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PrefixListsInterface {
    addresses: Vec<Spanned<String>>,
    routes: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PrefixListsPeer {
    allowed_ips: Vec<Spanned<String>>,
}

fn default_name() -> String {
    "ztnet0".into()
}
fn default_port() -> Spanned<i64> {
    Spanned::new(0..0, 51820)
}
fn default_mtu() -> Spanned<i64> {
    Spanned::new(0..0, 1420)
}
fn default_namespace() -> Spanned<String> {
    Spanned::new(0..0, "default".into())
}
fn default_trust_domain() -> Spanned<String> {
    Spanned::new(0..0, "ztnet.local".into())
}

impl StaticConfig {
    /// Reads and checks a config file, its key file and its policy file.
    pub fn load(path: &Path) -> Result<StaticConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            file: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        let at = |span: Range<usize>, message: String| {
            let (line, column) = line_col(&text, span.start);
            ConfigError::At {
                file: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        // Prefixes first, each read as text, so that a bad one is reported at its own place in
        // its list (through the typed lists below, toml points at the list's start).
        if let Ok(lists) = toml::from_str::<PrefixLists>(&text) {
            let routes = lists.interface.routes.iter().flatten();
            let allowed = lists.peer.iter().flat_map(|p| &p.allowed_ips);
            for item in lists
                .interface
                .addresses
                .iter()
                .chain(routes)
                .chain(allowed)
            {
                ztnet_proto::prefix::parse(item.get_ref()).map_err(|m| at(item.span(), m))?;
            }
        }
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            at(
                e.span().unwrap_or(0..0),
                plain_words(e.message().trim_end()),
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));

        let port = *raw.interface.listen_port.get_ref();
        let listen_port = u16::try_from(port).map_err(|_| {
            at(
                raw.interface.listen_port.span(),
                format!(
                    "listen_port {port} is not a UDP port: give 1-65535, or 0 for one the \
                     kernel picks"
                ),
            )
        })?;
        let addresses: Vec<IpNet> = raw
            .interface
            .addresses
            .iter()
            .map(|a| a.get_ref().0)
            .collect();
        for a in &raw.interface.addresses {
            let net = a.get_ref().0;
            if net.addr().is_unspecified() || net.addr().is_multicast() {
                return Err(at(
                    a.span(),
                    format!("address {net} cannot be an interface address"),
                ));
            }
        }
        let mtu = *raw.interface.mtu.get_ref();
        let mtu = match u16::try_from(mtu) {
            Ok(m) if m >= 576 && (m >= 1280 || !has_v6(&addresses)) => m,
            _ => {
                return Err(at(
                    raw.interface.mtu.span(),
                    format!("mtu {mtu} is out of range (576-65535, at least 1280 with IPv6)"),
                ));
            }
        };
        let key_path = base.join(raw.interface.private_key_file.get_ref());
        let private_key = read_key_file(&key_path)?;

        // The coordinator's rules for names, namespaces, tags and trust domains.
        let check = |value: &Spanned<String>, rule: fn(&str) -> Result<(), String>| {
            rule(value.get_ref()).map_err(|m| at(value.span(), m))
        };
        let id = &raw.identity;
        check(&id.name, names::node)?;
        check(&id.namespace, names::namespace)?;
        check(&id.trust_domain, names::trust_domain)?;
        for t in &id.tags {
            check(t, names::tag)?;
        }

        let self_name = raw.identity.name.get_ref().clone();
        let mut peers = Vec::new();
        let mut seen: BTreeMap<String, ()> = BTreeMap::new();
        seen.insert(self_name.clone(), ());
        // Unlike plain WireGuard, a key or a prefix given twice is an error here: in a
        // zero-trust config they say who a packet is from, so "last wins" would silently move
        // an identity. Prefixes that only overlap (a /24 and a /32 in it) stay allowed.
        let mut keys: BTreeMap<WgKey, &str> = BTreeMap::new();
        let mut prefixes: BTreeMap<IpNet, &str> = BTreeMap::new();
        for spanned in &raw.peers {
            let p = spanned.get_ref();
            let name = p.name.get_ref();
            check(&p.name, names::node)?;
            check(&p.namespace, names::namespace)?;
            for t in &p.tags {
                check(t, names::tag)?;
            }
            if seen.insert(name.clone(), ()).is_some() {
                return Err(at(
                    p.name.span(),
                    format!("peer name {name:?} is used twice (or is this node's own name)"),
                ));
            }
            if *p.public_key.get_ref() == private_key.public_key() {
                return Err(at(
                    p.public_key.span(),
                    format!("peer {name} has this node's own public key"),
                ));
            }
            if let Some(first) = keys.insert(*p.public_key.get_ref(), name) {
                return Err(at(
                    p.public_key.span(),
                    format!("peers {first} and {name} have the same public key"),
                ));
            }
            for net in &p.allowed_ips {
                let given = net.get_ref().0;
                let prefix = given.trunc();
                if given != prefix {
                    // `10.90.0.2/24` would quietly make the peer's own address a range it
                    // routes, which the policy does not see as the peer; say which was meant.
                    return Err(at(
                        net.span(),
                        format!(
                            "allowed ip {given} of peer {name} has bits set past its prefix \
                             length: write {}/{} for the one address, or {prefix} for the \
                             range",
                            given.addr(),
                            given.max_prefix_len()
                        ),
                    ));
                }
                if let Some(own) = addresses.iter().find(|a| IpNet::from(a.addr()) == prefix) {
                    return Err(at(
                        net.span(),
                        format!(
                            "allowed ip {prefix} of peer {name} is this node's own address \
                             ({own}); a peer's allowed ips hold the peer's addresses"
                        ),
                    ));
                }
                match prefixes.insert(prefix, name) {
                    Some(first) if first != name => {
                        return Err(at(
                            net.span(),
                            format!(
                                "allowed ip {prefix} is claimed by peers {first} and {name}; \
                                 a prefix may belong to one peer only"
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            let td = raw.identity.trust_domain.get_ref();
            peers.push(PeerConfig {
                name: name.clone(),
                public_key: *p.public_key.get_ref(),
                endpoint: match &p.endpoint {
                    Some(e) => Some(parse_endpoint(e.get_ref()).map_err(|m| at(e.span(), m))?),
                    None => None,
                },
                endpoints: Vec::new(),
                allowed_ips: p.allowed_ips.iter().map(|n| n.get_ref().0).collect(),
                persistent_keepalive: match &p.persistent_keepalive {
                    Some(k) => match u16::try_from(*k.get_ref()) {
                        Ok(0) => None,
                        Ok(v) => Some(v),
                        Err(_) => {
                            return Err(at(
                                k.span(),
                                format!(
                                    "persistent_keepalive {} is out of range (0-65535 seconds; \
                                     0 is off)",
                                    k.get_ref()
                                ),
                            ));
                        }
                    },
                    None => None,
                },
                identity: Some(Identity {
                    spiffe_id: spiffe_id(td, p.namespace.get_ref(), name),
                    namespace: p.namespace.get_ref().clone(),
                    tags: p.tags.iter().map(|t| t.get_ref().clone()).collect(),
                }),
                preshared_key: None,
                next_public_key: None,
            });
        }

        let (filter, warnings) = match &raw.interface.policy_file {
            Some(file) => {
                let full = base.join(file.get_ref());
                if let Err(e) = std::fs::metadata(&full) {
                    return Err(at(
                        file.span(),
                        format!("policy_file {}: {e}", full.display()),
                    ));
                }
                compile_policy(&full, &raw, &peers)?
            }
            None => (FilterSpec::default(), vec![]),
        };
        let routes = raw
            .interface
            .routes
            .as_ref()
            .map(|r| r.iter().map(|p| p.0).collect())
            .unwrap_or_else(|| default_routes(&addresses, &peers));

        Ok(StaticConfig {
            path: path.to_path_buf(),
            interface: InterfaceConfig {
                name: raw.interface.name.clone(),
                mtu,
                listen_port,
                private_key,
                mode: "static".into(),
            },
            dataplane: DataplaneConfig {
                node_name: Some(self_name),
                version: None,
                addresses,
                routes,
                peers,
                filter,
                private_key: None,
            },
            warnings,
            policy_file: raw
                .interface
                .policy_file
                .as_ref()
                .map(|f| base.join(f.get_ref())),
        })
    }
}

/// Reads a private key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<PrivateKey, ConfigError> {
    let err = |message: String| ConfigError::File {
        file: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read key file: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "key file has mode {mode:04o}; it must be readable by its owner only \
             (chmod 600 {})",
            path.display()
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("cannot read key file: {e}")))?;
    PrivateKey::parse_file_content(&text).map_err(|e| err(format!("bad private key: {e}")))
}

fn compile_policy(
    file: &Path,
    raw: &RawConfig,
    peers: &[PeerConfig],
) -> Result<(FilterSpec, Vec<String>), ConfigError> {
    let source = std::fs::read_to_string(file).map_err(|e| ConfigError::File {
        file: file.to_path_buf(),
        message: format!("cannot read policy: {e}"),
    })?;
    let checked = Policy::parse(&source).map_err(|e| {
        let first = e
            .diagnostics
            .iter()
            .find(|d| d.severity == Severity::Error)
            .or(e.diagnostics.first());
        match first {
            Some(d) => ConfigError::At {
                file: file.to_path_buf(),
                line: d.line,
                column: d.column,
                message: format!("{} ({:?}); {}", d.message, d.text, e),
            },
            None => ConfigError::File {
                file: file.to_path_buf(),
                message: e.to_string(),
            },
        }
    })?;
    let warnings = checked
        .warnings
        .iter()
        .map(|d| format!("{}:{}:{}: {}", file.display(), d.line, d.column, d.message))
        .collect();
    let report = checked.policy.run_tests();
    if let Some(failed) = report.results.iter().find(|r| !r.passed) {
        return Err(ConfigError::At {
            file: file.to_path_buf(),
            line: failed.line,
            column: 1,
            message: format!(
                "policy test failed: {} (decided by {})",
                failed.description, failed.decided_by
            ),
        });
    }

    let td = raw.identity.trust_domain.get_ref();
    let me = raw.identity.name.get_ref();
    let namespace = raw.identity.namespace.get_ref();
    let mut inventory = Inventory::default();
    inventory.nodes.push(NodeIdentity {
        name: me.clone(),
        namespace: namespace.clone(),
        tags: raw
            .identity
            .tags
            .iter()
            .map(|t| t.get_ref().clone())
            .collect(),
        spiffe_id: spiffe_id(td, namespace, me),
        addresses: raw
            .interface
            .addresses
            .iter()
            .map(|a| IpNet::from(a.get_ref().0.addr()))
            .collect(),
        routes: vec![],
    });
    for p in peers {
        let (hosts, routed): (Vec<IpNet>, Vec<IpNet>) = p
            .allowed_ips
            .iter()
            .partition(|n| n.prefix_len() == n.max_prefix_len());
        let identity = p.identity.clone().unwrap_or_else(|| Identity {
            spiffe_id: spiffe_id(td, "default", &p.name),
            namespace: "default".into(),
            tags: vec![],
        });
        inventory.nodes.push(NodeIdentity {
            name: p.name.clone(),
            namespace: identity.namespace,
            tags: identity.tags,
            spiffe_id: identity.spiffe_id,
            addresses: hosts,
            routes: routed,
        });
    }
    let compiled = netpolicy::compile(&checked.policy, &inventory);
    let filter = compiled.filters.get(me).cloned().unwrap_or_default();
    Ok((filter, warnings))
}

/// A peer endpoint, `IPV4:PORT` or `[IPV6]:PORT`, with an error that names what is wrong.
fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "endpoint {text:?}: port 0 cannot be sent to (1-65535)"
            ));
        }
        return Ok(addr);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) =>
        {
            (h, p)
        }
        _ => {
            // An IPv6 address with the port run on after it, as in fd00::2:51820.
            let run_on = text.rsplit_once(':').filter(|(h, p)| {
                h.parse::<std::net::Ipv6Addr>().is_ok() && p.parse::<u16>().is_ok()
            });
            let hint = match run_on {
                Some((h, p)) => format!(" (IPv6 goes in brackets: [{h}]:{p})"),
                None if text.parse::<std::net::IpAddr>().is_ok() => {
                    " (IPv6 goes in brackets: [fd00::2]:51820)".to_string()
                }
                None => String::new(),
            };
            return Err(format!(
                "endpoint {text:?} needs a port, as in 192.0.2.2:51820 or [2001:db8::2]:51820{hint}"
            ));
        }
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "endpoint {text:?}: {host:?} is not an IP address (host names are not resolved in \
             static mode; give the address)"
        ));
    }
    match port.parse::<u32>() {
        Ok(p) if p > 65_535 => Err(format!("endpoint {text:?}: port {p} is above 65535")),
        Ok(_) => Err(format!("endpoint {text:?} is not IP:PORT")),
        Err(_) => Err(format!("endpoint {text:?}: {port:?} is not a port number")),
    }
}

/// toml's message with Rust's type names put in words (`listen_port = "51820"` says
/// "expected a whole number, without quotes", not "expected i64").
fn plain_words(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, words) in [
        ("expected i64", "expected a whole number, without quotes"),
        (
            "expected a boolean",
            "expected true or false, without quotes",
        ),
    ] {
        m = m.replace(rust, words);
    }
    m
}

fn spiffe_id(trust_domain: &str, namespace: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/node/{name}")
}

fn has_v6(addresses: &[IpNet]) -> bool {
    addresses.iter().any(|a| a.addr().is_ipv6())
}

/// The networks of the node's addresses, plus the peers' allowed IPs that those do not cover.
fn default_routes(addresses: &[IpNet], peers: &[PeerConfig]) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = addresses
        .iter()
        .map(IpNet::trunc)
        .filter(|n| n.prefix_len() < n.max_prefix_len())
        .collect();
    for p in peers {
        for net in &p.allowed_ips {
            let net = net.trunc();
            if !routes.iter().any(|r| r.contains(&net)) {
                routes.push(net);
            }
        }
    }
    routes.sort();
    routes.dedup();
    routes
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Dir {
            let d = Dir(tempfile::tempdir().expect("temp dir"));
            d.write_key("n1.key", 0o600);
            d
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.path().join(name);
            let mut f = std::fs::File::create(&p).expect("create");
            f.write_all(text.as_bytes()).expect("write");
            p
        }

        fn write_key(&self, name: &str, mode: u32) -> PathBuf {
            let k = PrivateKey::generate();
            let p = self.write(name, &format!("{}\n", k.to_base64_secret().as_str()));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        }
    }

    const PEER_KEY: &str = "YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GI=";

    fn config(peer_key: &str) -> String {
        format!(
            r#"[interface]
private_key_file = "n1.key"
addresses = ["10.90.0.1/16"]

[identity]
name = "n1"

[[peer]]
name = "n2"
public_key = "{peer_key}"
endpoint = "192.0.2.2:51820"
allowed_ips = ["10.90.0.2/32"]
"#
        )
    }

    #[test]
    fn valid_config_loads_with_defaults() {
        let d = Dir::new();
        let p = d.write("node.toml", &config(PEER_KEY));

        let c = StaticConfig::load(&p).expect("loads");

        assert_eq!(c.interface.name, "ztnet0");
        assert_eq!(c.interface.mtu, 1420);
        assert_eq!(c.interface.listen_port, 51820);
        assert_eq!(c.dataplane.peers.len(), 1);
        assert_eq!(
            c.dataplane.routes,
            vec!["10.90.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            c.dataplane.filter,
            FilterSpec::default(),
            "no policy denies all"
        );
    }

    #[test]
    fn bad_key_names_file_line_and_problem() {
        let d = Dir::new();
        let p = d.write("node.toml", &config(&PEER_KEY[..43]));

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:10:"), "{e}");
        assert!(e.contains("43 characters"), "{e}");
    }

    #[test]
    fn every_bad_key_form_is_refused() {
        let noncanon = format!("{}J=", &PEER_KEY[..42]);
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let urlsafe = PEER_KEY.replace('+', "-");
        let hexkey = "00".repeat(32);
        for bad in [
            noncanon.as_str(),
            zero,
            urlsafe.as_str(),
            hexkey.as_str(),
            "",
            "\\\"x\\\"",
        ] {
            let d = Dir::new();
            let p = d.write("node.toml", &config(bad));
            let e = StaticConfig::load(&p).expect_err("refused").to_string();
            assert!(e.contains("node.toml:10:"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_field_is_an_error_with_its_line() {
        let d = Dir::new();
        let text = config(PEER_KEY).replace("[identity]", "[identity]\ncolour = \"red\"");
        let p = d.write("node.toml", &text);

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:6:1"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn readable_key_file_is_refused() {
        let d = Dir::new();
        d.write_key("n1.key", 0o644);
        let p = d.write("node.toml", &config(PEER_KEY));

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("n1.key"), "{e}");
        assert!(e.contains("0644"), "{e}");
    }

    #[test]
    fn duplicate_peer_name_is_refused() {
        let d = Dir::new();
        let mut text = config(PEER_KEY);
        text.push_str(
            "\n[[peer]]\nname = \"n2\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\n",
        );
        let p = d.write("node.toml", &text);

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:15:8"), "{e}");
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn identity_values_follow_the_coordinators_rules() {
        for (from, to, place, says) in [
            (
                "name = \"n1\"",
                "name = \"n b/../x\"",
                "node.toml:6:8",
                "node name",
            ),
            (
                "name = \"n1\"",
                "name = \"n1\"\nnamespace = \"Prod\"",
                "node.toml:7:13",
                "namespace",
            ),
            (
                "name = \"n1\"",
                "name = \"n1\"\ntags = [\"web\", \"we b\"]",
                "node.toml:7:16",
                "tag",
            ),
            (
                "name = \"n1\"",
                "name = \"n1\"\ntags = [\"\"]",
                "node.toml:7:9",
                "tag is empty",
            ),
            (
                "name = \"n1\"",
                "name = \"n1\"\ntrust_domain = \"spiffe://x y\"",
                "node.toml:7:16",
                "trust domain",
            ),
            (
                "name = \"n2\"",
                "name = \"n-\"",
                "node.toml:9:8",
                "node name",
            ),
            (
                "allowed_ips",
                "namespace = \"a_b\"\nallowed_ips",
                "node.toml:12:13",
                "namespace",
            ),
            (
                "allowed_ips",
                "tags = [\"db\", \"DB\"]\nallowed_ips",
                "node.toml:12:15",
                "tag",
            ),
        ] {
            let d = Dir::new();
            let p = d.write("node.toml", &config(PEER_KEY).replacen(from, to, 1));

            let e = StaticConfig::load(&p).expect_err(to).to_string();

            assert!(e.contains(place), "{to}: {e}");
            assert!(e.contains(says), "{to}: {e}");
        }
    }

    fn with_n3(key: &str, allowed_ips: &str) -> String {
        format!(
            "{}\n[[peer]]\nname = \"n3\"\npublic_key = \"{key}\"\nallowed_ips = {allowed_ips}\n",
            config(PEER_KEY)
        )
    }

    const N3_KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn a_prefix_given_to_two_peers_is_refused() {
        let d = Dir::new();
        let p = d.write(
            "node.toml",
            &with_n3(N3_KEY, r#"["10.90.0.9/32", "10.90.0.2/32"]"#),
        );

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:17:32"), "{e}");
        assert!(
            e.contains("10.90.0.2/32") && e.contains("n2") && e.contains("n3"),
            "{e}"
        );
    }

    #[test]
    fn an_allowed_ip_with_host_bits_set_is_refused_with_both_readings() {
        let d = Dir::new();
        let p = d.write("node.toml", &with_n3(N3_KEY, r#"["10.90.0.3/24"]"#));

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:17:"), "{e}");
        assert!(
            e.contains("10.90.0.3/32") && e.contains("10.90.0.0/24") && e.contains("n3"),
            "{e}"
        );
    }

    #[test]
    fn overlapping_prefixes_of_different_lengths_stay_allowed() {
        let d = Dir::new();
        let p = d.write("node.toml", &with_n3(N3_KEY, r#"["10.90.0.0/24"]"#));

        let c = StaticConfig::load(&p).expect("a /24 around another peer's /32 loads");

        assert_eq!(c.dataplane.peers.len(), 2);
    }

    #[test]
    fn a_public_key_given_to_two_peers_is_refused() {
        let d = Dir::new();
        let p = d.write("node.toml", &with_n3(PEER_KEY, r#"["10.90.0.3/32"]"#));

        let e = StaticConfig::load(&p).expect_err("refused").to_string();

        assert!(e.contains("node.toml:16:14"), "{e}");
        assert!(e.contains("n2") && e.contains("n3"), "{e}");
        assert!(e.contains("same public key"), "{e}");
    }

    #[test]
    fn bad_numbers_and_prefixes_name_their_line_and_fault() {
        for (from, to, place, says) in [
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/40\"]",
                "node.toml:3:14",
                "prefix length 40 in `10.90.0.1/40` is longer than an IPv4 address (0-32)",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\nlisten_port = 70000",
                "node.toml:4:15",
                "listen_port 70000 is not a UDP port",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\nlisten_port = -1",
                "node.toml:4:15",
                "listen_port -1 is not a UDP port",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"0.0.0.0/16\"]",
                "node.toml:3:14",
                "cannot be an interface address",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\nroutes = [\"10.95.0.0\"]",
                "node.toml:4:11",
                "`10.95.0.0/32` for this one address",
            ),
            (
                "[\"10.90.0.2/32\"]",
                "[\"10.90.0.2/32\", \"fd00::2/300\"]",
                "node.toml:12:32",
                "longer than an IPv6 address (0-128)",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"192.0.2.2:70000\"",
                "node.toml:11:12",
                "port 70000 is above 65535",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"192.0.2.2\"",
                "node.toml:11:12",
                "needs a port, as in 192.0.2.2:51820",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"fd00::2\"",
                "node.toml:11:12",
                "IPv6 goes in brackets",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\nlisten_port = \"51820\"",
                "node.toml:4:15",
                "expected a whole number, without quotes",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"fd00::2:51820\"",
                "node.toml:11:12",
                "IPv6 goes in brackets: [fd00::2]:51820",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"db1.example:51820\"",
                "node.toml:11:12",
                "\"db1.example\" is not an IP address (host names are not resolved",
            ),
            (
                "endpoint = \"192.0.2.2:51820\"",
                "endpoint = \"192.0.2.2:0\"",
                "node.toml:11:12",
                "port 0 cannot be sent to",
            ),
            (
                "allowed_ips = [\"10.90.0.2/32\"]",
                "allowed_ips = [\"10.90.0.2/32\"]\npersistent_keepalive = 70000",
                "node.toml:13:24",
                "persistent_keepalive 70000 is out of range",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\nmtu = 70000",
                "node.toml:4:7",
                "mtu 70000 is out of range",
            ),
            (
                "addresses = [\"10.90.0.1/16\"]",
                "addresses = [\"10.90.0.1/16\"]\npolicy_file = \"missing.toml\"",
                "node.toml:4:15",
                "missing.toml: No such file",
            ),
            (
                "[\"10.90.0.2/32\"]",
                "[\"10.90.0.1/32\"]",
                "node.toml:12:16",
                "allowed ip 10.90.0.1/32 of peer n2 is this node's own address (10.90.0.1/16)",
            ),
        ] {
            let d = Dir::new();
            let p = d.write("node.toml", &config(PEER_KEY).replacen(from, to, 1));

            let e = StaticConfig::load(&p).expect_err(to).to_string();

            assert!(e.contains(place), "{to}: {e}");
            assert!(e.contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn port_zero_lets_the_kernel_pick() {
        let d = Dir::new();
        let text = config(PEER_KEY).replacen(
            "addresses = [\"10.90.0.1/16\"]",
            "addresses = [\"10.90.0.1/16\"]\nlisten_port = 0",
            1,
        );
        let p = d.write("node.toml", &text);

        let c = StaticConfig::load(&p).expect("loads");

        assert_eq!(c.interface.listen_port, 0);
    }
}
