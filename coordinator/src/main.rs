//! `ztnet-coordinator`: starts the coordinator (see the `ztnet_coordinator` library) and runs
//! it until SIGINT or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The ztnet coordinator: identity, enrollment, policy and netmaps for ztnet nodes.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  ztnet-coordinator --data-dir /var/lib/ztnet --trust-domain corp.example \
                  --listen 192.0.2.10:7443\n\nThe first admin API key is written to \
                  DATA_DIR/admin.key and the CA certificate to DATA_DIR/ca.pem."
)]
struct Args {
    /// Data directory: CA, database, admin key (created 0700 when missing).
    #[arg(long, env = "ZTNET_DATA_DIR")]
    data_dir: PathBuf,
    /// Trust domain of SPIFFE IDs.
    #[arg(long, env = "ZTNET_TRUST_DOMAIN")]
    trust_domain: String,
    /// Address for the control channel (QUIC, UDP) and the admin API (HTTPS, TCP).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Address nodes dial, written into join tokens (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = real_main().await {
        let text = ztnet_proto::report::chain(e.as_ref());
        // Nothing is left to report a failed write of the last message to.
        let _ = writeln!(std::io::stderr(), "ztnet-coordinator: error: {text}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let running = ztnet_coordinator::run(ztnet_coordinator::Config {
        data_dir: args.data_dir.clone(),
        trust_domain: args.trust_domain,
        listen: args.listen,
        advertise: args.advertise,
    })
    .await
    .with_context(|| format!("starting with data directory {}", args.data_dir.display()))?;
    let ca = args.data_dir.join("ca.pem");
    match &running.admin_key {
        Some(key) => tracing::info!(admin_key = %key.display(), ca = %ca.display(), "ready"),
        None => tracing::info!(ca = %ca.display(), "ready (no admin key file)"),
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
