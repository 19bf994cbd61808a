//! Coordinator mode, `ztnet-node --coordinator HOST:PORT --token TOKEN --state-dir DIR`: opens
//! the state directory, starts the data plane (it passes nothing until a netmap is applied),
//! and runs the control client on it until a signal or a revocation.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use tracing::{info, warn};

use crate::control::DataplaneSink;
use crate::control::client::{self, Exit, NodeOptions};
use crate::dataplane::Dataplane;
use crate::netconfig::{DataplaneConfig, InterfaceConfig};
use crate::state::StateDir;
use ztnet_proto::token::JoinToken;

/// Arguments of coordinator mode. Its `Debug` hides the token.
#[derive(Clone)]
pub struct UpArgs {
    /// `HOST:PORT` of the coordinator; taken from the token when absent.
    pub coordinator: Option<String>,
    /// Join token, needed only for the first start.
    pub token: Option<String>,
    /// State directory (keys, certificate, last netmap).
    pub state_dir: std::path::PathBuf,
    /// Node name; defaults to the hostname.
    pub name: Option<String>,
    /// TUN interface name.
    pub interface: String,
    /// WireGuard listen port.
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u16,
}

impl std::fmt::Debug for UpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpArgs")
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "redacted"))
            .field("state_dir", &self.state_dir)
            .field("name", &self.name)
            .field("interface", &self.interface)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// Runs coordinator mode until a signal: enroll if needed, start the data plane from the last
/// netmap on disk if there is one, keep the control channel up. A revoked node exits with an
/// error after its data plane stopped passing traffic.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let state = StateDir::open(&args.state_dir)
        .with_context(|| format!("state directory {}", args.state_dir.display()))?;
    // Before anything else is made or changed: one process per identity.
    let _lock = state.lock()?;
    let enrollment = state.enrollment()?;
    let enrolled = enrollment.is_some();
    let name = match (&enrollment, args.name.clone()) {
        (Some(e), Some(n)) if !n.eq_ignore_ascii_case(&e.name) => {
            warn!(enrolled = %e.name, "enrolled under another name: --name {n} is not used");
            e.name.clone()
        }
        (Some(e), _) => e.name.clone(),
        (None, Some(n)) => n,
        (None, None) => hostname().context("no --name given and the hostname cannot be read")?,
    };
    if !enrolled && args.token.is_none() {
        bail!(
            "{} holds no enrollment: start once with --token (from `ztnet token create`)",
            args.state_dir.display()
        );
    }
    if enrolled && args.token.is_some() {
        warn!("already enrolled: --token is not used (delete the state directory to re-enroll)");
    }
    if args.token.is_some() && token_on_command_line(std::env::args_os()) {
        warn!(
            "the join token was given on the command line, where any local user can read it in \
             the process list for as long as this node runs; pass it in ZTNET_TOKEN instead"
        );
    }
    if !enrolled {
        // Refuse a bad name or token before a key file or an interface is made.
        ztnet_proto::names::node(&name).map_err(|e| {
            anyhow::anyhow!("{e} (give another with --name; names are single DNS labels)")
        })?;
        if let Some(token) = &args.token {
            JoinToken::parse(token).context("the join token (--token or ZTNET_TOKEN)")?;
        }
    }

    let private_key = state.wg_key()?;
    let dataplane = Dataplane::start(InterfaceConfig {
        name: args.interface.clone(),
        mtu: args.mtu,
        listen_port: args.listen_port,
        private_key,
        mode: "coordinator".into(),
    })
    .with_context(|| format!("starting the data plane on {}", args.interface))?;
    dataplane
        .serve_local_api()
        .context("starting the local status socket")?;
    let sink = Arc::new(DataplaneHandle(dataplane));
    info!(interface = %args.interface, node = %name, "coordinator mode starting");

    let opts = NodeOptions {
        state,
        coordinator: args.coordinator.clone(),
        token: args.token.clone(),
        name,
        version: env!("CARGO_PKG_VERSION").to_string(),
        renew_fraction: 0.5,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let workload_socket = crate::workload::api::socket_path(&args.interface);
    let lost = std::sync::atomic::AtomicBool::new(false);
    let broker = crate::workload::Broker::new();
    let exit = runtime.block_on(async {
        let listener = crate::workload::api::bind(&workload_socket)
            .context("starting the workload API socket")?;
        info!(socket = %workload_socket.display(), "workload API listening");
        let server = tokio::spawn(crate::workload::api::serve(listener, broker.clone()));
        let stop = stop_signal_or_lost_interface(&sink, &lost);
        let exit = client::run_with_workloads(opts, sink.clone(), Some(broker), stop).await;
        server.abort();
        exit
    });
    drop(runtime);
    let _ = std::fs::remove_file(&workload_socket);
    drop(sink);
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        bail!(interface_gone_message(&args.interface));
    }
    match exit? {
        Exit::Shutdown => {
            info!("stopped by a signal");
            Ok(())
        }
        Exit::Revoked(e) => bail!(
            "this node was revoked by the coordinator: {} ({}); it passes no traffic; \
             enroll it again with a new token and an empty state directory",
            e.message,
            e.code
        ),
    }
}

/// The running data plane as the control client's sink.
struct DataplaneHandle(Dataplane);

impl DataplaneSink for DataplaneHandle {
    fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()> {
        self.0.apply(config)
    }

    fn listen_port(&self) -> u16 {
        self.0.listen_port()
    }

    fn local_endpoints(&self) -> Vec<SocketAddr> {
        self.0.local_endpoints()
    }

    fn set_control_connected(&self, connected: bool) {
        self.0.set_control_connected(connected);
    }

    fn take_key_mismatches(&self) -> Vec<crate::dataplane::peers::KeyMismatch> {
        self.0.take_key_mismatches()
    }

    fn answers_flow_queries(&self) -> bool {
        true
    }

    fn open_flows(&self, limit: usize) -> (Vec<netpolicy::OpenFlow>, bool) {
        self.0.open_flows(limit)
    }
}

/// Why a node stops when its interface was deleted under it. It exits with an error, so that
/// a service manager restarts it (the shipped unit has `Restart=on-failure`) and the restart
/// makes the interface again.
pub fn interface_gone_message(interface: &str) -> String {
    format!(
        "the TUN interface {interface} was deleted (ip link del?): the node passes nothing \
         through it and stops; start it again to make the interface anew"
    )
}

/// Completes on SIGINT or SIGTERM, or when the data plane lost its interface (then `lost`
/// is set).
async fn stop_signal_or_lost_interface(
    sink: &DataplaneHandle,
    lost: &std::sync::atomic::AtomicBool,
) {
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = sink.0.interface_lost() => {
            lost.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still stops on the default action.
        _ => std::future::pending::<()>().await,
    }
}

/// Whether `--token` appears among the process's own arguments (rather than in the
/// environment, which other users cannot read).
fn token_on_command_line(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == "--token" || a.starts_with("--token=")
    })
}

/// The machine's hostname, from the kernel.
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading /proc/sys/kernel/hostname")?;
    let name = name.trim();
    if name.is_empty() {
        bail!("the hostname is empty");
    }
    // Only the first label: node names are single labels.
    Ok(name.split('.').next().unwrap_or(name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_the_arguments_is_noticed() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(token_on_command_line(
            args(&["ztnet-node", "--token", "x"]).into_iter()
        ));
        assert!(token_on_command_line(
            args(&["ztnet-node", "--token=x"]).into_iter()
        ));
        assert!(!token_on_command_line(
            args(&["ztnet-node", "--state-dir", "/s"]).into_iter()
        ));
        assert!(!token_on_command_line(args(&["--token"]).into_iter()));
    }

    #[test]
    fn debug_output_hides_the_token() {
        let args = UpArgs {
            coordinator: None,
            token: Some("ztjoin1_secret-material".into()),
            state_dir: "/tmp/x".into(),
            name: None,
            interface: "ztnet0".into(),
            listen_port: 51820,
            mtu: 1420,
        };
        let text = format!("{args:?}");
        assert!(
            !text.contains("secret-material") && text.contains("redacted"),
            "{text}"
        );
    }
}
