//! `ztnet workload ...`: register, list, show and delete the SPIFFE IDs that a node may hand
//! to its local workloads, through the coordinator's admin API.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use ztnet_proto::workload::{RegisterWorkload, Selector, SpiffeId, WorkloadInfo};

use super::admin::segment;
use crate::args::OutputFormat;
use crate::client::ApiClient;
use crate::output::{self, Table, emit, fields, noteln, time};

/// `ztnet workload ...`.
#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Registers a SPIFFE ID for the processes on one node that match every selector.
    #[command(after_help = "\
Example:
  ztnet workload register --network prod-vpc \\
      --spiffe-id spiffe://corp.example/ns/production/sa/api-service \\
      --node web1 --selector unix:uid:1001 --selector unix:path:/usr/bin/api --ttl 1h")]
    Register(RegisterArgs),
    /// Lists a network's workload registrations.
    #[command(after_help = "Example:\n  ztnet workload list --network prod-vpc")]
    List(WorkloadNetworkArg),
    /// Shows one registration.
    #[command(after_help = "Example:\n  ztnet workload show --network prod-vpc 3")]
    Show(WorkloadIdArgs),
    /// Deletes a registration: its SPIFFE ID is not issued again (issued SVIDs run out).
    #[command(after_help = "Example:\n  ztnet workload delete --network prod-vpc 3")]
    Delete(WorkloadIdArgs),
}

/// `ztnet workload register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// The SPIFFE ID, in the coordinator's trust domain: spiffe://TD/ns/NS/sa/NAME.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    /// The node on which the workload runs.
    #[arg(long)]
    pub node: String,
    /// A condition on the caller: unix:uid:N, unix:gid:N or unix:path:/abs/exe; repeat for
    /// more, all must hold.
    #[arg(long = "selector", value_name = "SELECTOR", required = true)]
    pub selectors: Vec<String>,
    /// SVID lifetime, 10s to 24h; renewed at half of it.
    #[arg(long, value_parser = parse_ttl, default_value = "1h")]
    pub ttl: Duration,
}

/// `--network N`.
#[derive(Debug, Args)]
pub struct WorkloadNetworkArg {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
}

/// `--network N ID`.
#[derive(Debug, Args)]
pub struct WorkloadIdArgs {
    /// Network name.
    #[arg(long, short = 'n')]
    pub network: String,
    /// Registration id, as `workload list` shows it.
    pub id: u64,
}

/// Runs one `ztnet workload` command.
pub fn run(client: &ApiClient, fmt: OutputFormat, cmd: &WorkloadCmd) -> Result<()> {
    match cmd {
        WorkloadCmd::Register(a) => {
            // Checked here too, so a typo is named before anything is sent.
            SpiffeId::parse(&a.spiffe_id)?;
            Selector::parse_all(&a.selectors)?;
            let body = RegisterWorkload {
                spiffe_id: a.spiffe_id.clone(),
                node: a.node.clone(),
                selectors: a.selectors.clone(),
                ttl_secs: Some(a.ttl.as_secs()),
            };
            let path = format!("/v1/networks/{}/workloads", segment(&a.network)?);
            let w: WorkloadInfo = client.post(&path, &body)?;
            emit(fmt, &w, workload_fields)
        }
        WorkloadCmd::List(a) => {
            let path = format!("/v1/networks/{}/workloads", segment(&a.network)?);
            let all: Vec<WorkloadInfo> = client.get(&path)?;
            emit(fmt, &all, |all| {
                let mut t = Table::new(&["ID", "SPIFFE ID", "NODE", "SELECTORS", "TTL", "STATE"]);
                for w in all {
                    t.row(vec![
                        w.id.to_string(),
                        w.spiffe_id.to_string(),
                        w.node.clone(),
                        selectors(&w.selectors),
                        ttl(w.ttl_secs),
                        state(w),
                    ]);
                }
                t.render("no workload registrations")
            })
        }
        WorkloadCmd::Show(a) => {
            let path = format!("/v1/networks/{}/workloads/{}", segment(&a.network)?, a.id);
            let w: WorkloadInfo = client.get(&path)?;
            emit(fmt, &w, workload_fields)
        }
        WorkloadCmd::Delete(a) => {
            let path = format!("/v1/networks/{}/workloads/{}", segment(&a.network)?, a.id);
            let w: WorkloadInfo = client.delete(&path)?;
            noteln!(
                "deleted registration {} ({} on {})",
                w.id,
                w.spiffe_id,
                w.node
            );
            emit(fmt, &w, workload_fields)
        }
    }
}

fn workload_fields(w: &WorkloadInfo) -> String {
    fields(&[
        ("id", w.id.to_string()),
        ("network", w.network.clone()),
        ("spiffe id", w.spiffe_id.to_string()),
        ("node", w.node.clone()),
        ("selectors", selectors(&w.selectors)),
        ("ttl", ttl(w.ttl_secs)),
        ("created by", w.created_by.clone()),
        ("created", time(w.created_at)),
        ("state", state(w)),
        ("revoked", output::opt_time(w.revoked_at)),
    ])
}

/// `active`, or `revoked (node db1 was revoked: stolen; SVIDs issued before stay valid until
/// they expire)`.
fn state(w: &WorkloadInfo) -> String {
    match &w.revoked_reason {
        Some(why) if w.state != "active" => format!(
            "{} ({why}; SVIDs issued before stay valid until they expire)",
            w.state
        ),
        _ => w.state.clone(),
    }
}

fn selectors(s: &[Selector]) -> String {
    s.iter()
        .map(Selector::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ttl(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 10s, 15m, 1h)"))?;
    if d < Duration::from_secs(10) || d > Duration::from_secs(24 * 3600) {
        return Err("must be between 10s and 24h".into());
    }
    if d.subsec_nanos() != 0 {
        return Err("must be whole seconds".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds_are_enforced() {
        assert_eq!(parse_ttl("10s"), Ok(Duration::from_secs(10)));
        assert!(parse_ttl("9s").is_err());
        assert!(parse_ttl("25h").is_err());
        let e = parse_ttl("soon").expect_err("a non-duration is refused");
        assert!(e.contains("try"), "{e}");
    }
}
