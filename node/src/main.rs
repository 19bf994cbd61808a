//! `ztnet-node`: the daemon on every machine of a ztnet network.
//!
//! - `ztnet-node --config node.toml`: static mode (SIGHUP reloads the file).
//! - `ZTNET_TOKEN=T ztnet-node --coordinator HOST:PORT --state-dir DIR`: coordinator mode.
//! - `ztnet-node genkey` / `ztnet-node pubkey`: keys, like `wg genkey` / `wg pubkey`.
//! - `ztnet-node wg IFACE`: plain WireGuard mode, configured with `wg` (see [`wgmode`]).

mod wgmode;

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ztnet_node::dataplane::Dataplane;
use ztnet_node::netconfig::InterfaceConfig;
use ztnet_node::static_config::StaticConfig;
use ztnet_node::up::{self, UpArgs};
use ztnet_proto::PrivateKey;
use ztnet_proto::status::ConfigSource;

/// ztnet node daemon: userspace WireGuard filtered by peer identity.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  ztnet-node genkey --output node.key\n  \
                  ztnet-node pubkey < node.key\n  ztnet-node --config /etc/ztnet/node.toml\n  \
                  ZTNET_TOKEN=ztjoin1_... ztnet-node --coordinator coord:7443 \\\n    \
                  --state-dir /var/lib/ztnet\n\n\
                  Pass the join token in ZTNET_TOKEN rather than --token: arguments show in ps."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Static mode: run from this TOML file.
    #[arg(long, conflicts_with_all = ["coordinator", "token", "state_dir"])]
    config: Option<PathBuf>,
    /// Coordinator mode: HOST:PORT of the coordinator (taken from the token when absent).
    #[arg(long)]
    coordinator: Option<String>,
    /// Coordinator mode: join token, needed only at first start.
    #[arg(long, env = "ZTNET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Coordinator mode: state directory (keys, certificate, last netmap).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Coordinator mode: node name (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Coordinator mode: TUN interface name.
    #[arg(long, default_value = "ztnet0")]
    interface: String,
    /// Coordinator mode: WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Coordinator mode: TUN MTU.
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// Coordinator mode: posture facts from this TOML or JSON file (flat `name = value`).
    #[arg(long)]
    posture_file: Option<PathBuf>,
    /// Coordinator mode: posture facts from this program's stdout (TOML or JSON); run
    /// directly, never through a shell. Repeat --posture-arg for its arguments.
    #[arg(long)]
    posture_command: Option<PathBuf>,
    /// An argument of --posture-command (repeatable, in order).
    #[arg(long, requires = "posture_command", allow_hyphen_values = true)]
    posture_arg: Vec<String>,
    /// How long --posture-command may run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    posture_timeout: f64,
    /// How often posture facts are read again, in seconds.
    #[arg(long, default_value_t = 10.0)]
    posture_interval: f64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints a new private key (base64), like `wg genkey`.
    Genkey(GenkeyArgs),
    /// Reads a private key on stdin and prints its public key, like `wg pubkey`.
    Pubkey,
    /// Plain WireGuard mode (not zero trust): creates IFACE for the stock `wg` to configure;
    /// peers are trusted by their keys alone, as WireGuard trusts them.
    Wg(wgmode::WgArgs),
}

#[derive(Debug, clap::Args)]
struct GenkeyArgs {
    /// Write the key to this file (created with mode 0600) instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    if let Err(e) = run(cli) {
        eprintln!("ztnet-node: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Genkey(args)) => return genkey(args),
        Some(Command::Pubkey) => return pubkey(),
        Some(Command::Wg(args)) => return wgmode::run(args),
        None => {}
    }
    if let Some(config) = cli.config {
        return run_static(&config);
    }
    let Some(state_dir) = cli.state_dir else {
        anyhow::bail!("give --config FILE (static mode) or --state-dir DIR (coordinator mode)");
    };
    let seconds = |what: &str, v: f64| {
        if v.is_finite() && (0.05..=86_400.0).contains(&v) {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!(
                "{what} must be between 0.05 and 86400 seconds, not {v}"
            ))
        }
    };
    ztnet_node::posture::configure(ztnet_node::posture::PostureSource {
        file: cli.posture_file,
        command: cli
            .posture_command
            .map(|c| c.to_string_lossy().into_owned())
            .into_iter()
            .chain(cli.posture_arg)
            .collect(),
        timeout: seconds("--posture-timeout", cli.posture_timeout)?,
        interval: seconds("--posture-interval", cli.posture_interval)?,
    });
    up::run(UpArgs {
        coordinator: cli.coordinator,
        token: cli.token,
        state_dir,
        name: cli.name,
        interface: cli.interface,
        listen_port: cli.listen_port,
        mtu: cli.mtu,
    })
}

/// Logs to stderr at `RUST_LOG` (default `info`). boringtun's own messages stay off unless
/// `RUST_LOG` names it: it logs an expired session at error level, which is routine for a
/// daemon (the node logs session up and down itself, at info).
fn init_logging() {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("boringtun") {
        spec
    } else {
        format!("{spec},boringtun=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn genkey(args: GenkeyArgs) -> anyhow::Result<()> {
    let key = PrivateKey::generate();
    let line = format!("{}\n", key.to_base64_secret().as_str());
    match args.output {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create key file {}", path.display()))?;
            f.write_all(line.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => {
            let stdout = std::io::stdout();
            warn_if_world_readable_stdout();
            let mut lock = stdout.lock();
            lock.write_all(line.as_bytes())
                .context("cannot write key")?;
        }
    }
    Ok(())
}

/// Warns, as `wg genkey` does, when stdout is a file that others can read.
fn warn_if_world_readable_stdout() {
    if std::io::stdout().is_terminal() {
        return;
    }
    let Ok(meta) = std::fs::metadata("/proc/self/fd/1") else {
        return;
    };
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "Warning: writing the private key to a file that group or others can read.\n\
             Use `ztnet-node genkey --output FILE`, or set umask 077 first."
        );
    }
}

fn pubkey() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("cannot read the private key from stdin")?;
    let key = PrivateKey::parse_file_content(&input).context("invalid private key on stdin")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", key.public_key()).context("cannot write public key")?;
    Ok(())
}

fn run_static(path: &Path) -> anyhow::Result<()> {
    let config = StaticConfig::load(path)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let dataplane = Dataplane::start(config.interface.clone())?;
    dataplane
        .apply(config.dataplane.clone())
        .context("cannot apply the configuration")?;
    dataplane.set_config_source(config_source(path, &config));
    dataplane.serve_local_api()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut running = config;
        loop {
            tokio::select! {
                _ = hup.recv() => reload(&dataplane, path, &mut running),
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = dataplane.interface_lost() => {
                    anyhow::bail!(up::interface_gone_message(dataplane.interface()));
                }
            }
        }
        anyhow::Ok(())
    })?;
    dataplane.shutdown();
    Ok(())
}

/// Loads the file again and applies it; on any error the running configuration stays.
fn reload(dataplane: &Dataplane, path: &Path, running: &mut StaticConfig) {
    let mut next = match StaticConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            dataplane.config_refused(unix_now(), e.to_string());
            return;
        }
    };
    let pending = restart_only_changes(&running.interface, &next.interface);
    for change in &pending {
        tracing::warn!("{change} changes only at restart; the running one stays in use");
    }
    // What runs keeps the interface it started with, so the next reload compares with that.
    next.interface = running.interface.clone();
    for w in &next.warnings {
        tracing::warn!("{w}");
    }
    match dataplane.apply(next.dataplane.clone()) {
        Ok(()) => {
            let mut source = config_source(path, &next);
            source.pending_restart = pending;
            dataplane.set_config_source(source);
            *running = next;
        }
        Err(e) => {
            tracing::error!("reload failed, the running configuration stays: {e:#}");
            dataplane.config_refused(unix_now(), format!("{e:#}"));
        }
    }
}

/// Status's account of a configuration just loaded from `path`.
fn config_source(path: &Path, config: &StaticConfig) -> ConfigSource {
    ConfigSource {
        file: path.display().to_string(),
        policy_file: config.policy_file.as_ref().map(|p| p.display().to_string()),
        loaded_at: unix_now(),
        refused: None,
        pending_restart: Vec::new(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What differs between the running interface settings and a reloaded file's, named as in
/// `node.toml` with both values (the key by its public half).
fn restart_only_changes(old: &InterfaceConfig, new: &InterfaceConfig) -> Vec<String> {
    let mut changes = Vec::new();
    if old.name != new.name {
        changes.push(format!("interface name {} -> {}", old.name, new.name));
    }
    if old.listen_port != new.listen_port {
        changes.push(format!(
            "listen_port {} -> {}",
            old.listen_port, new.listen_port
        ));
    }
    if old.mtu != new.mtu {
        changes.push(format!("mtu {} -> {}", old.mtu, new.mtu));
    }
    let (a, b) = (old.private_key.public_key(), new.private_key.public_key());
    if a != b {
        changes.push(format!("private key (public key {a} -> {b})"));
    }
    changes
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_passes_a_real_token_shape_through_the_environment() {
        let help = Cli::command().render_long_help().to_string();

        assert!(help.contains("ZTNET_TOKEN=ztjoin1_"), "{help}");
        assert!(!help.contains("ztj_"), "{help}");
        assert!(!help.contains("--token ztj"), "{help}");
    }

    #[test]
    fn a_reload_names_each_setting_that_waits_for_a_restart() {
        let old = InterfaceConfig {
            name: "ztnet0".into(),
            mtu: 1420,
            listen_port: 51820,
            private_key: PrivateKey::generate(),
            mode: "static".into(),
        };
        assert!(restart_only_changes(&old, &old.clone()).is_empty());

        let mut new = old.clone();
        new.mtu = 1380;
        new.listen_port = 51821;
        let changes = restart_only_changes(&old, &new);

        assert_eq!(changes, ["listen_port 51820 -> 51821", "mtu 1420 -> 1380"]);
        new.private_key = PrivateKey::generate();
        let key = restart_only_changes(&old, &new).pop().expect("the key");
        assert!(key.starts_with("private key (public key "), "{key}");
        assert!(
            !key.contains(old.private_key.to_base64_secret().as_str()),
            "{key}"
        );
    }
}
