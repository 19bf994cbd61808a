//! `ztnet-node wg IFACE`: plain WireGuard mode.
//!
//! The node creates the TUN interface IFACE and its UDP socket in the network namespace it was
//! started in, serves WireGuard's configuration protocol on `/var/run/wireguard/IFACE.sock`
//! (so the stock `wg` configures it), and runs until IFACE is deleted or it is told to stop.
//! Like the other userspace WireGuard implementations it goes to the background: the command
//! returns once the interface and the socket exist. `--foreground` keeps it attached.
//!
//! Trust: peers set with `wg` are trusted as WireGuard trusts them (cryptokey routing and the
//! anti-spoofing check decide; there is no identity and no policy filter). This is reached only
//! through this subcommand and `Dataplane::start_plain_wireguard`; the zero-trust modes
//! (`--config`, `--state-dir`) never run without their filter.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use ztnet_node::dataplane::Dataplane;
use ztnet_node::netconfig::InterfaceConfig;
use ztnet_proto::PrivateKey;

/// Set in the environment of the background child; its stdout is the pipe it reports on.
const CHILD_ENV: &str = "ZTNET_WG_DAEMON_CHILD";

/// The line the child writes once the interface and the socket exist.
const READY: &str = "ready";

/// How long the parent waits for the child to report.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `ztnet-node wg` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct WgArgs {
    /// The TUN interface to create (1 to 15 characters).
    pub interface: String,
    /// Stay in the foreground (logs to stderr) instead of going to the background.
    #[arg(long, short)]
    pub foreground: bool,
    /// In the background, append logs to this file instead of the inherited stderr.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// MTU the interface starts with (`ip link set mtu` changes it later).
    #[arg(long, default_value_t = 1420)]
    pub mtu: u16,
}

/// Runs plain WireGuard mode: in the background unless `--foreground` (or this is the child).
pub fn run(args: WgArgs) -> anyhow::Result<()> {
    let child = std::env::var_os(CHILD_ENV).is_some();
    if args.foreground || child {
        return serve(&args, child);
    }
    spawn_background(&args)
}

/// Starts this program again as the background daemon and returns once it reports ready,
/// or with its error when it exits first.
fn spawn_background(args: &WgArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut cmd = Command::new(exe);
    cmd.arg("wg")
        .arg(&args.interface)
        .arg("--mtu")
        .arg(args.mtu.to_string())
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    if let Some(path) = &args.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open log file {}", path.display()))?;
        cmd.stderr(file);
    }
    let mut child = cmd.spawn().context("cannot start the background daemon")?;
    let stdout = child
        .stdout
        .take()
        .context("the child's stdout is a pipe (Stdio::piped)")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) if line.trim() == READY => Ok(()),
        Ok(_) => {
            let status = child.wait().context("cannot wait for the daemon")?;
            anyhow::bail!("the daemon for {} did not start ({status})", args.interface)
        }
        Err(_) => {
            anyhow::bail!(
                "the daemon for {} did not report within {}s (pid {})",
                args.interface,
                START_TIMEOUT.as_secs(),
                child.id()
            )
        }
    }
}

/// Creates the interface and serves it until it is deleted or a signal stops the daemon.
fn serve(args: &WgArgs, report_ready: bool) -> anyhow::Result<()> {
    let iface = InterfaceConfig {
        name: args.interface.clone(),
        mtu: args.mtu,
        listen_port: 0,
        // Never used for a handshake: without a key set by `wg` the device has no peers.
        private_key: PrivateKey::generate(),
        mode: "wireguard".into(),
    };
    let dataplane = Dataplane::start_plain_wireguard(iface)?;
    dataplane.serve_local_api()?;
    tracing::info!(
        interface = dataplane.interface(),
        "plain WireGuard mode: configure with `wg`; peers are trusted by key, no policy filter"
    );
    if report_ready {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}").context("cannot report ready to the parent")?;
        out.flush().context("cannot report ready to the parent")?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = dataplane.interface_lost() => {
                tracing::info!(interface = dataplane.interface(), "interface deleted; stopping");
            }
        }
        anyhow::Ok(())
    })?;
    dataplane.shutdown();
    Ok(())
}
