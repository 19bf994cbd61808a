//! The command line: one clap derive struct per command, noun then verb.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ztnet: manage a zero-trust overlay network through its coordinator, and look at a node.
#[derive(Debug, Parser)]
#[command(name = "ztnet", version, propagate_version = true)]
#[command(after_help = "\
Examples:
  ztnet login --coordinator 10.0.0.1:7443 --api-key-file admin.key --ca-cert ca.pem
  ztnet network create --name prod-vpc --zero-trust
  TOKEN=$(ztnet token create --network prod-vpc --namespace production --tag web)
  ztnet policy check policy.toml
  ztnet status

Configuration, strongest first: flags, then ZTNET_COORDINATOR, ZTNET_API_KEY_FILE, ZTNET_API_KEY,
ZTNET_CA_CERT, then the file written by `ztnet login` (~/.config/ztnet/config.toml, or
$ZTNET_CONFIG). When both ZTNET_API_KEY_FILE and ZTNET_API_KEY are set, the file wins.")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Coordinator address, HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "ZTNET_COORDINATOR",
        value_name = "HOST:PORT"
    )]
    pub coordinator: Option<String>,
    /// File holding the admin API key (one line); wins over ZTNET_API_KEY when both are set.
    #[arg(long, global = true, env = "ZTNET_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The coordinator's CA certificate (its ca.pem): the only certificate trusted.
    #[arg(long, global = true, env = "ZTNET_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Output format of results.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Top-level nouns.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save the coordinator address, API key file and CA certificate to the config file.
    #[command(after_help = "\
Example:
  ztnet login --coordinator 10.0.0.1:7443 --api-key-file /secure/admin.key --ca-cert ca.pem")]
    Login(LoginArgs),
    /// Networks: create, list, show, set.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled nodes: list, show, delete, revoke, set-endpoint, rotate-key.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Policies: apply, show, history, and the offline check and explain.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The audit log of a network, or with --global the entries of no network.
    #[command(
        after_help = "Examples:\n  ztnet audit --network prod-vpc --output json\n  \
                            ztnet audit --global"
    )]
    Audit(AuditArgs),
    /// The local node's status, read from its status socket.
    #[command(after_help = "\
Examples:
  ztnet status
  ztnet status --interface ztnet1 --output json
  ztnet status --socket /run/ztnet/ztnet0.sock")]
    Status(StatusArgs),
    /// WireGuard keys: check a public key the way every ztnet component parses it.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Workload registrations (SPIFFE IDs for processes on a node): register, list, show,
    /// delete.
    #[command(subcommand)]
    Workload(crate::cmd::workload::WorkloadCmd),
    /// The coordinator's CAs: status, list, rotate, activate, bundle.
    #[command(subcommand)]
    Ca(crate::cmd::ca::CaCmd),
    /// Admin API keys: create (shown once), list, revoke.
    #[command(subcommand)]
    ApiKey(crate::cmd::apikey::ApiKeyCmd),
    /// This process's workload identity, fetched from the local node's workload API.
    #[command(after_help = "\
Examples:
  ztnet identity fetch --format x509 --output /run/certs/svid.pem
  ztnet identity fetch --output /run/certs/svid.pem --watch
Run `ztnet identity fetch --help` for every option.")]
    Identity(crate::cmd::identity::IdentityStub),
}

/// `ztnet login`: takes the global `--coordinator`, `--api-key-file` and `--ca-cert`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Do not contact the coordinator to check the settings before saving them.
    #[arg(long)]
    pub no_verify: bool,
}

/// `ztnet network ...`.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Creates a network.
    #[command(after_help = "\
Examples:
  ztnet network create --name prod-vpc --zero-trust
  ztnet network create --name lab --zero-trust --cidr 100.65.0.0/16")]
    Create(NetworkCreateArgs),
    /// Lists networks.
    #[command(after_help = "Example:\n  ztnet network list --output json")]
    List,
    /// Shows one network.
    #[command(after_help = "Example:\n  ztnet network show prod-vpc")]
    Show(NetworkShowArgs),
    /// Changes a network's settings.
    #[command(after_help = "Example:\n  ztnet network set prod-vpc --key-ttl 12h")]
    Set(NetworkSetArgs),
}

/// `ztnet network set`.
#[derive(Debug, Args)]
pub struct NetworkSetArgs {
    /// Network name.
    pub name: String,
    /// Life of each node's WireGuard key in a zero-trust network (10s to 30d; 24h by
    /// default). Nodes rotate at half of it; a key older than it is dropped by every peer.
    #[arg(long, value_parser = parse_duration)]
    pub key_ttl: Option<Duration>,
}

/// `ztnet network create`.
#[derive(Debug, Args)]
pub struct NetworkCreateArgs {
    /// Name: lowercase letters, digits and '-', 1 to 63 characters.
    #[arg(long)]
    pub name: String,
    /// Zero-trust mode: default deny, expiring node keys, mandatory identity checks.
    #[arg(long)]
    pub zero_trust: bool,
    /// IPv4 overlay prefix inside 100.64.0.0/10 (default: the next free /16).
    #[arg(long, value_parser = parse_cidr)]
    pub cidr: Option<ipnet::IpNet>,
}

/// `ztnet network show`.
#[derive(Debug, Args)]
pub struct NetworkShowArgs {
    /// Network name.
    pub name: String,
}

/// `ztnet token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Creates a join token; prints the token alone on stdout (id and expiry on stderr).
    #[command(after_help = "\
Examples:
  TOKEN=$(ztnet token create --network prod-vpc --namespace production --tag web)
  ztnet token create --network prod-vpc --namespace ops --tag ops --tag admin --uses 3 --ttl 30m")]
    Create(TokenCreateArgs),
    /// Lists a network's tokens: uses left, expiry, which nodes used them.
    #[command(after_help = "Example:\n  ztnet token list --network prod-vpc")]
    List(NetworkArg),
    /// Revokes a token by id.
    #[command(after_help = "Example:\n  ztnet token revoke --network prod-vpc 3f9a1c0b2d4e")]
    Revoke(TokenRevokeArgs),
}

/// `--network N`, for commands that need nothing else.
#[derive(Debug, Args)]
pub struct NetworkArg {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
}

/// `ztnet token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Namespace that nodes enrolled with this token get.
    #[arg(long)]
    pub namespace: String,
    /// A tag that enrolled nodes get (repeat for more).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Number of enrollments allowed.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// Lifetime, e.g. 15m, 1h, 2d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// `ztnet token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Token id, as `token list` shows it.
    pub id: String,
}

/// `ztnet node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Lists a network's nodes.
    #[command(after_help = "Example:\n  ztnet node list --network prod-vpc")]
    List(NetworkArg),
    /// Shows one node.
    #[command(after_help = "Example:\n  ztnet node show --network prod-vpc web-1")]
    Show(NodeNameArgs),
    /// Deletes a node: it leaves every netmap at once and its control channel is closed.
    #[command(after_help = "Example:\n  ztnet node delete --network prod-vpc web-1")]
    Delete(NodeNameArgs),
    /// Revokes a node: it leaves every netmap at once, its control channel is closed with
    /// `revoked`, and its certificate and WireGuard key are refused from then on. It stays in
    /// `node list` as revoked; it can come back only as a new node, with a new token and key.
    #[command(
        after_help = "Example:\n  ztnet node revoke --network prod-vpc web-1 --reason \
                            \"laptop stolen\""
    )]
    Revoke(NodeRevokeArgs),
    /// Pins the endpoint that peers try first for a node (it wins over what the node
    /// reports), or clears the pin.
    #[command(
        after_help = "Examples:\n  ztnet node set-endpoint --network prod-vpc web-1 \
                            198.51.100.7:51820\n  ztnet node set-endpoint --network prod-vpc \
                            web-1 --clear --revision 3"
    )]
    SetEndpoint(NodeSetEndpointArgs),
    /// Asks a node to rotate its WireGuard key now: it makes the key (the private half never
    /// leaves it), its peers learn the public half, then it switches.
    #[command(
        after_help = "Examples:\n  ztnet node rotate-key --network prod-vpc web-1\n  ztnet node \
                            rotate-key --network prod-vpc web-1 --order node-first --gap 10s"
    )]
    RotateKey(NodeRotateKeyArgs),
}

/// `ztnet node rotate-key`.
#[derive(Debug, Args)]
pub struct NodeRotateKeyArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Node name.
    pub name: String,
    /// `peers-first` (peers learn the key, then the node switches) or `node-first` (a drill:
    /// peers see a key mismatch until they learn it).
    #[arg(long, default_value = "peers-first")]
    pub order: String,
    /// Wait between the two steps (at most 60s).
    #[arg(long, default_value = "0s", value_parser = parse_gap)]
    pub gap: Duration,
}

/// `ztnet node revoke`.
#[derive(Debug, Args)]
pub struct NodeRevokeArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Node name.
    pub name: String,
    /// Why, kept with the node and in the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

/// `ztnet node set-endpoint`.
#[derive(Debug, Args)]
pub struct NodeSetEndpointArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Node name.
    pub name: String,
    /// The endpoint, ADDR:PORT.
    #[arg(required_unless_present = "clear", conflicts_with = "clear")]
    pub endpoint: Option<std::net::SocketAddr>,
    /// Clear the pin: peers use what the node reports.
    #[arg(long)]
    pub clear: bool,
    /// Change only if the pin is still at this revision (see `ztnet node show`).
    #[arg(long)]
    pub revision: Option<u64>,
}

/// `--network N NAME`.
#[derive(Debug, Args)]
pub struct NodeNameArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Node name.
    pub name: String,
}

/// `ztnet policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Applies a policy document; the coordinator runs its tests first and refuses on failure.
    #[command(after_help = "\
Examples:
  ztnet policy apply --network prod-vpc -f policy.toml
  ztnet policy apply --network prod-vpc -f policy.toml --wait --timeout 30s")]
    Apply(PolicyApplyArgs),
    /// Shows the policy in force.
    #[command(after_help = "Example:\n  ztnet policy show --network prod-vpc")]
    Show(NetworkArg),
    /// Lists every stored policy version.
    #[command(after_help = "Example:\n  ztnet policy history --network prod-vpc")]
    History(NetworkArg),
    /// Validates a policy file and runs its tests, offline. Exits non-zero on any problem.
    #[command(after_help = "Example:\n  ztnet policy check policy.toml")]
    Check(PolicyCheckArgs),
    /// Answers "can A reach B on this port, and why", offline.
    #[command(after_help = "\
Identity syntax: NAME[,ns=NAMESPACE][,tags=TAG+TAG...][,ip=ADDR+ADDR...][,spiffe=ID]
  the same fields as a [[test]] entry; a missing ns or spiffe is empty (matches no ns: or
  spiffe: selector); with --trust-domain and ns, spiffe is spiffe://TD/ns/NS/node/NAME.

Examples:
  ztnet policy explain policy.toml --from web-1,ns=production,tags=web \\
      --to db-1,ns=production,tags=db --port tcp:5432
  ztnet policy explain policy.toml --from ops-1,tags=ops --to db-1,tags=db --port icmp")]
    Explain(PolicyExplainArgs),
    /// Lists every node that may open a flow to NODE on a port under the policy in force,
    /// with the grant that allows each.
    #[command(
        name = "who-can-reach",
        after_help = "Example:\n  ztnet policy who-can-reach --network prod-vpc db1 --port tcp:5432"
    )]
    WhoCanReach(PolicyWhoArgs),
    /// Shows the access pairs a policy document would add and remove, compared with the policy
    /// in force, over the network's current nodes; the open flows it would cut, as the nodes
    /// report them now; and the nodes its [[posture]] entries would quarantine or release.
    /// Changes nothing.
    #[command(after_help = "Example:\n  ztnet policy diff --network prod-vpc -f new.toml")]
    Diff(PolicyDiffArgs),
}

/// `ztnet policy who-can-reach`.
#[derive(Debug, Args)]
pub struct PolicyWhoArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// The node flows go to.
    pub node: String,
    /// The flow: tcp:PORT, udp:PORT or icmp.
    #[arg(long)]
    pub port: String,
}

/// `ztnet policy diff`.
#[derive(Debug, Args)]
pub struct PolicyDiffArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// The new policy document (TOML).
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    pub file: PathBuf,
}

/// `ztnet policy apply`.
#[derive(Debug, Args)]
pub struct PolicyApplyArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Policy document (TOML).
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    pub file: PathBuf,
    /// Wait until every affected node that is online now acknowledged its new netmap, and print
    /// how long it took. Offline nodes are named and not waited for.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

/// `ztnet policy check`.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// Policy document (TOML).
    pub file: PathBuf,
}

/// `ztnet policy explain`.
#[derive(Debug, Args)]
pub struct PolicyExplainArgs {
    /// Policy document (TOML).
    pub file: PathBuf,
    /// Source identity: NAME, then ns=NS, tags=A+B, ip=ADDR, spiffe=ID, comma-separated.
    #[arg(long, value_name = "IDENTITY")]
    pub from: String,
    /// Destination identity, same syntax.
    #[arg(long, value_name = "IDENTITY")]
    pub to: String,
    /// What is opened: tcp:PORT, udp:PORT or icmp.
    #[arg(long, value_name = "PROBE")]
    pub port: String,
    /// Destination address (one of --to's addresses or routes); default its first address.
    #[arg(long, value_name = "ADDR")]
    pub dst: Option<std::net::IpAddr>,
    /// Trust domain used to build SPIFFE IDs not given with spiffe=.
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
}

/// `ztnet audit`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("scope").required(true).args(["network", "global"]))]
pub struct AuditArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: Option<String>,
    /// The entries that belong to no network: API keys and CA rotation.
    #[arg(long)]
    pub global: bool,
}

/// `ztnet status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Interface name of the node.
    #[arg(long, short = 'i', default_value = "ztnet0")]
    pub interface: String,
    /// Status socket path (default /var/run/ztnet/INTERFACE.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `ztnet key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Checks a WireGuard public key: 44 characters of canonical base64. Exits non-zero if bad.
    #[command(after_help = "\
Examples:
  ztnet key check YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GI=
  wg pubkey < private.key | ztnet key check -")]
    Check(KeyCheckArgs),
}

/// `ztnet key check`.
#[derive(Debug, Args)]
pub struct KeyCheckArgs {
    /// The key, or `-` to read one line from stdin.
    #[arg(allow_hyphen_values = true)]
    pub key: String,
}

/// Parses `30s`, `1h`, `2d` and the like.
fn parse_gap(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (try 0s, 10s)"))
}

/// An overlay prefix `ADDRESS/LENGTH`, refused with the part that is wrong.
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} has no prefix length; write it as 100.65.0.0/16"))?;
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address (try 100.65.0.0/16)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length {len:?} is not a number from 0 to {max}"))?;
    ipnet::IpNet::new(addr, len).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 30s, 15m, 1h, 2d)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn a_wrong_cidr_names_the_wrong_part() {
        assert!(parse_cidr("100.64.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(parse_cidr("fd00::/129").unwrap_err().contains("0 to 128"));
        assert!(
            parse_cidr("100.64.0.0")
                .unwrap_err()
                .contains("no prefix length")
        );
        assert!(
            parse_cidr("100.64.0/16")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert_eq!(
            parse_cidr("100.65.0.0/16").unwrap().to_string(),
            "100.65.0.0/16"
        );
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let subs: Vec<_> = cmd
                .get_subcommands()
                .filter(|c| c.get_name() != "help")
                .collect();
            if subs.is_empty() {
                let help = cmd
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if !help.contains("ztnet ") {
                    missing.push(path.clone());
                }
            }
            for s in subs {
                walk(s, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(
            missing.is_empty(),
            "commands without an example: {missing:?}"
        );
    }
}
