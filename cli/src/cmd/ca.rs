//! `ztnet ca ...`: the coordinator's CA rotation through the admin API: status, list, rotate
//! (optionally waiting until the new CA signs), activate, and the bundle to refresh a pinned
//! `ca.pem` with.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ztnet_proto::ca::{ActivateRequest, CaStatus};

use crate::args::OutputFormat;
use crate::client::{ApiClient, parse_ca};
use crate::output::{Table, emit, fields, noteln, opt_time, time};

/// `ztnet ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Where a rotation stands: the CAs, and the nodes a staged CA still waits for.
    #[command(after_help = "Example:\n  ztnet ca status")]
    Status,
    /// The CAs in the trust bundle, oldest first.
    #[command(after_help = "Example:\n  ztnet ca list --output json")]
    List,
    /// Starts a rotation: a new CA joins the trust bundle and is pushed to every node; it
    /// signs once every active node has acknowledged it and the SVIDs issued before have
    /// expired. The old CA stays trusted until what it signed has expired.
    #[command(after_help = "\
Examples:
  ztnet ca rotate
  ztnet ca rotate --wait --timeout 30m")]
    Rotate(RotateArgs),
    /// Makes the staged CA sign now, without waiting (--force when nodes still lag).
    #[command(after_help = "Example:\n  ztnet ca activate --force")]
    Activate(ActivateArgs),
    /// Writes the current trust bundle (every trusted CA): the file to pin as ZTNET_CA_CERT.
    #[command(after_help = "\
Examples:
  ztnet ca bundle --file /secure/ca.pem
  ztnet ca bundle > ca.pem")]
    Bundle(BundleArgs),
}

/// `ztnet ca rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Wait until the new CA signs, printing what the rotation waits for.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

/// `ztnet ca activate`.
#[derive(Debug, Args)]
pub struct ActivateArgs {
    /// Activate although nodes have not acknowledged the bundle or old SVIDs are still valid.
    #[arg(long)]
    pub force: bool,
}

/// `ztnet ca bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// Replace this file atomically instead of printing the bundle (not `--output`, which
    /// is the output format).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// Runs one `ztnet ca` command.
pub fn run(client: &ApiClient, fmt: OutputFormat, cmd: &CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Status => {
            let s: CaStatus = client.get("/v1/ca")?;
            emit(fmt, &s, render_status)
        }
        CaCmd::List => {
            let s: CaStatus = client.get("/v1/ca")?;
            emit(fmt, &s.authorities, |_| render_authorities(&s))
        }
        CaCmd::Rotate(a) => {
            let s: CaStatus = client.post("/v1/ca/rotate", &serde_json::json!({}))?;
            noteln!("new CA staged; {}", s.summary);
            if !a.wait {
                return emit(fmt, &s, render_status);
            }
            let s = wait_until_signing(client, a.timeout)?;
            emit(fmt, &s, render_status)
        }
        CaCmd::Activate(a) => {
            let body = ActivateRequest { force: a.force };
            let s: CaStatus = client.post("/v1/ca/activate", &body)?;
            emit(fmt, &s, render_status)
        }
        CaCmd::Bundle(a) => {
            let s: CaStatus = client.get("/v1/ca")?;
            parse_ca(s.bundle_pem.as_bytes()).context("the coordinator's bundle")?;
            match &a.file {
                Some(path) => {
                    replace_file(path, s.bundle_pem.as_bytes())?;
                    noteln!(
                        "wrote {} CA certificate(s) to {}",
                        s.authorities.len(),
                        path.display()
                    );
                    Ok(())
                }
                None => crate::output::write_stdout(&s.bundle_pem),
            }
        }
    }
}

/// Polls the status until the staged CA signs, saying on stderr what changed.
fn wait_until_signing(client: &ApiClient, timeout: Duration) -> Result<CaStatus> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let s: CaStatus = client.get("/v1/ca")?;
        if s.phase != "staged" {
            noteln!("the new CA signs");
            return Ok(s);
        }
        if s.summary != last {
            noteln!("waiting: {}", s.summary);
            last.clone_from(&s.summary);
        }
        if Instant::now() >= deadline {
            bail!(
                "the new CA does not sign yet after {}: {}; bring the nodes named online, or \
                 `ztnet ca activate --force`",
                humantime::format_duration(timeout),
                s.summary
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn render_status(s: &CaStatus) -> String {
    let mut out = fields(&[
        ("phase", s.phase.clone()),
        ("summary", s.summary.clone()),
        ("activate after", opt_time(s.activate_after)),
    ]);
    out.push('\n');
    out.push_str(&render_authorities(s));
    if !s.pending.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["NETWORK", "NODE", "STATE"]);
        for p in &s.pending {
            let state = if p.online { "online" } else { "offline" };
            t.row(vec![p.network.clone(), p.node.clone(), state.into()]);
        }
        out.push_str("nodes that have not acknowledged the new bundle:\n");
        out.push_str(&t.render(""));
    }
    out
}

fn render_authorities(s: &CaStatus) -> String {
    let mut t = Table::new(&[
        "GEN",
        "ROLE",
        "FINGERPRINT",
        "SUBJECT",
        "VALID UNTIL",
        "RETIRES",
    ]);
    for a in &s.authorities {
        t.row(vec![
            a.generation.to_string(),
            a.role.clone(),
            a.fingerprint.chars().take(16).collect(),
            a.subject.clone(),
            time(a.not_after),
            opt_time(a.retire_at),
        ]);
    }
    t.render("no CA")
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it over `path`.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::args::{Cli, Command};

    use super::*;

    #[test]
    fn ca_commands_parse_beside_the_global_output_format() {
        let cli =
            Cli::try_parse_from(["ztnet", "ca", "bundle", "--file", "/s/ca.pem"]).expect("parses");
        let Command::Ca(CaCmd::Bundle(a)) = cli.command else {
            panic!("not ca bundle");
        };
        assert_eq!(a.file.as_deref(), Some(Path::new("/s/ca.pem")));
        let cli =
            Cli::try_parse_from(["ztnet", "ca", "rotate", "--wait", "-o", "json"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Ca(CaCmd::Rotate(RotateArgs { wait: true, .. }))
        ));
        assert!(Cli::try_parse_from(["ztnet", "ca", "activate", "--force"]).is_ok());
        assert!(Cli::try_parse_from(["ztnet", "ca", "status"]).is_ok());
    }
}
