//! `ztnet identity fetch`: asks the local node's workload API for this process's X.509-SVID
//! and writes the certificate chain, the private key (0600) and the trust bundle beside each
//! other. By default ([`Layout::Swap`], see [`layout`]) the three names are symlinks into
//! `..data`, and one rename of `..data` switches all three at once, so a reader sees the old
//! pair or the new pair and never a mix; a workload reloads on `IN_MOVED_TO` of `..data`.
//! `--layout flat` keeps the older three regular files, replaced one rename at a time (not
//! atomic as a pair). `--watch` rewrites them at half of each SVID's life.
//!
//! Its `--output PATH` would clash with the global `--output FORMAT`, so `ztnet identity ...`
//! is parsed by its own parser ([`run_if_identity`], called before the main one).

pub mod layout;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ztnet_proto::status::STATUS_DIR;
use ztnet_proto::workload::{WorkloadReply, WorkloadRequest, X509Svid};

use crate::output::{noteln, time, write_stdout};
use layout::{Contents, Layout, SvidDir};

/// How long to wait for the node's answer (it may wait 10 s on the coordinator).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest answer read.
const MAX_ANSWER: u64 = 1 << 20;

/// `ztnet identity ...`, parsed on its own.
#[derive(Debug, Parser)]
#[command(name = "ztnet identity", version)]
pub struct IdentityCli {
    #[command(subcommand)]
    pub command: IdentityCmd,
}

/// `ztnet identity` in the main command line, for its help only; the arguments are parsed by
/// [`IdentityCli`].
#[derive(Debug, Args)]
pub struct IdentityStub {
    /// `fetch` and its options (see `ztnet identity fetch --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `ztnet identity ...` when that is the command line; `None` for any other command.
pub fn run_if_identity() -> Option<std::process::ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).and_then(|a| a.to_str()) != Some("identity") {
        return None;
    }
    let cli = IdentityCli::parse_from(args.into_iter().skip(1));
    let IdentityCmd::Fetch(a) = &cli.command;
    Some(match fetch(a) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            noteln!("error: {}", ztnet_proto::report::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    })
}

/// `ztnet identity ...`.
#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Fetches this process's SVID from the local node and writes it to files.
    #[command(after_help = "\
Examples:
  ztnet identity fetch --format x509 --output /run/certs/svid.pem
  ztnet identity fetch --output /run/certs/svid.pem --watch")]
    Fetch(FetchArgs),
}

/// SVID formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SvidFormat {
    /// X.509-SVID: PEM certificate chain, PKCS#8 key, PEM bundle.
    X509,
}

/// `ztnet identity fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// SVID format.
    #[arg(long, value_enum, default_value_t = SvidFormat::X509)]
    pub format: SvidFormat,
    /// Where the certificate chain goes; svid.key and bundle.pem are written beside it.
    #[arg(long = "output", value_name = "PATH")]
    pub output: PathBuf,
    /// Interface name of the node.
    #[arg(long, short = 'i', default_value = "ztnet0")]
    pub interface: String,
    /// Workload socket (default /var/run/ztnet/INTERFACE.workload.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Which SPIFFE ID to write when the caller holds several (default: the first).
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// Keep running: rewrite the files at half of each SVID's life.
    #[arg(long)]
    pub watch: bool,
    /// How the files are laid out on disk (docs/identity.md, "Files and rotation").
    #[arg(long, value_enum, default_value_t = Layout::Swap)]
    pub layout: Layout,
}

/// Runs `ztnet identity fetch`.
pub fn fetch(args: &FetchArgs) -> Result<()> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| Path::new(STATUS_DIR).join(format!("{}.workload.sock", args.interface)));
    let files = SvidDir::beside(&args.output, args.layout)?;
    let cert = files.cert_path();
    if !args.watch {
        let svid = fetch_one(&socket, args.spiffe_id.as_deref())?;
        files.write(contents(&svid))?;
        return write_stdout(&format!(
            "{} written to {} (valid until {})\n",
            svid.spiffe_id,
            cert.display(),
            time(svid.not_after)
        ));
    }

    // FC-22: say what is on disk before replacing it, in plain words.
    let mut valid_until = match OnDisk::read(&cert) {
        Some(disk) => {
            noteln!("{}", disk.describe(now_unix()));
            Some(disk.not_after)
        }
        None => None,
    };
    let mut retry = Duration::from_secs(1);
    loop {
        match fetch_one(&socket, args.spiffe_id.as_deref()).and_then(|s| {
            files.write(contents(&s))?;
            Ok(s)
        }) {
            Ok(svid) => {
                noteln!(
                    "{} written to {} (valid until {})",
                    svid.spiffe_id,
                    cert.display(),
                    time(svid.not_after)
                );
                retry = Duration::from_secs(1);
                let now = now_unix();
                let half = svid.not_after.saturating_sub(now) / 2;
                valid_until = Some(svid.not_after);
                std::thread::sleep(Duration::from_secs(half.max(1)));
            }
            Err(e) => {
                noteln!(
                    "error: renewal failed: {}; {}; retrying in {}s",
                    ztnet_proto::report::chain(e.as_ref()),
                    kept(valid_until, now_unix()),
                    retry.as_secs()
                );
                std::thread::sleep(retry);
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// What a failed renewal leaves on disk, in one clause (FC-17: nothing is replaced).
fn kept(valid_until: Option<u64>, now: u64) -> String {
    match valid_until {
        None => "no SVID is on disk yet".into(),
        Some(t) if now < t => format!(
            "the SVID on disk stays in place, valid until {} ({} s left)",
            rfc3339(t),
            t - now
        ),
        Some(t) => format!(
            "the SVID on disk expired at {} ({} s ago) and is left in place; TLS peers refuse \
             it until a renewal succeeds",
            rfc3339(t),
            now - t
        ),
    }
}

/// The validity window of the SVID an earlier run left on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OnDisk {
    not_before: u64,
    not_after: u64,
}

impl OnDisk {
    /// Reads the first certificate of `path`; `None` when there is no file or no certificate.
    fn read(path: &Path) -> Option<OnDisk> {
        let pem = fs::read_to_string(path).ok()?;
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let v = cert.validity();
        Some(OnDisk {
            not_before: v.not_before.timestamp().max(0).unsigned_abs(),
            not_after: v.not_after.timestamp().max(0).unsigned_abs(),
        })
    }

    /// One sentence for the operator at start: expired, clock skew, or still valid.
    fn describe(&self, now: u64) -> String {
        if now >= self.not_after {
            format!(
                "the SVID on disk expired at {} ({} s ago): fetching a new one",
                rfc3339(self.not_after),
                now - self.not_after
            )
        } else if now < self.not_before {
            format!(
                "clock skew: the SVID on disk is valid only from {}, {} s after this machine's \
                 clock ({}); fetching a new one, but fix this machine's clock",
                rfc3339(self.not_before),
                self.not_before - now,
                rfc3339(now)
            )
        } else {
            format!(
                "the SVID on disk is valid until {}; replacing it with a fresh one",
                rfc3339(self.not_after)
            )
        }
    }
}

/// Asks the node once.
fn fetch_one(socket: &Path, want: Option<&str>) -> Result<X509Svid> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the node's workload API at {} (is ztnet-node running in coordinator \
             mode on this machine?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .context("setting socket timeouts")?;
    let mut line = serde_json::to_vec(&WorkloadRequest::FetchX509).context("encoding")?;
    line.push(b'\n');
    s.write_all(&line)
        .with_context(|| format!("writing to {}", socket.display()))?;
    let mut body = Vec::new();
    s.take(MAX_ANSWER)
        .read_to_end(&mut body)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    let reply: WorkloadReply = serde_json::from_slice(&body)
        .with_context(|| format!("the answer from {} does not parse", socket.display()))?;
    let svids = match reply {
        WorkloadReply::Svids { svids } => svids,
        WorkloadReply::Refused { code, message } => {
            bail!("the node refused to issue an identity: {message} ({code})")
        }
    };
    let available: Vec<String> = svids.iter().map(|s| s.spiffe_id.to_string()).collect();
    let chosen = match want {
        Some(id) => svids.into_iter().find(|s| s.spiffe_id.as_str() == id),
        None => svids.into_iter().next(),
    };
    let svid = chosen.with_context(|| {
        format!(
            "this caller holds no SVID for {}; it holds: {}",
            want.unwrap_or("any SPIFFE ID"),
            available.join(", ")
        )
    })?;
    check_answer(&svid)
        .context("the node's answer is not a usable SVID; the files on disk are kept")?;
    if let Some(problem) = clock_problem(svid.not_before, svid.not_after, now_unix()) {
        noteln!("warning: {problem}");
    }
    Ok(svid)
}

/// Refuses an answer that would leave an unusable pair on disk: the certificate must parse,
/// carry the SPIFFE ID asked for, and be for the key that came with it.
fn check_answer(svid: &X509Svid) -> Result<()> {
    let der = rustls_pemfile::certs(&mut svid.cert_chain_pem.as_bytes())
        .next()
        .context("no certificate in the chain")?
        .context("the certificate chain is not PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .context("the certificate does not parse")?;
    let key = rcgen::KeyPair::from_pem(&svid.key_pem).context("the private key does not parse")?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("the certificate is not for the private key that came with it");
    }
    let uri = svid.spiffe_id.as_str();
    let names_it = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == uri))
        });
    if !names_it {
        bail!("the certificate does not carry {uri}");
    }
    if rustls_pemfile::certs(&mut svid.bundle_pem.as_bytes())
        .next()
        .is_none()
    {
        bail!("the trust bundle holds no certificate");
    }
    Ok(())
}

/// A plain sentence when a freshly issued SVID is not valid by this machine's clock (FC-22):
/// the coordinator back-dates by 60 s, so anything beyond that is clock skew.
fn clock_problem(not_before: u64, not_after: u64, now: u64) -> Option<String> {
    if now < not_before {
        return Some(format!(
            "clock skew: the SVID just issued is valid from {} but this machine's clock says \
             {}, {} s earlier (more than the 60 s back-dating); TLS peers on this machine \
             will call it not yet valid: fix this machine's clock",
            rfc3339(not_before),
            rfc3339(now),
            not_before - now
        ));
    }
    if now >= not_after {
        return Some(format!(
            "clock skew: the SVID just issued expired at {} by this machine's clock, which \
             says {} ({} s later); fix this machine's clock",
            rfc3339(not_after),
            rfc3339(now),
            now - not_after
        ));
    }
    None
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The bytes of `svid` as they go to disk.
fn contents(svid: &X509Svid) -> Contents<'_> {
    Contents {
        cert: svid.cert_chain_pem.as_bytes(),
        key: svid.key_pem.as_bytes(),
        bundle: svid.bundle_pem.as_bytes(),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_takes_output_as_a_path() {
        use clap::CommandFactory;
        IdentityCli::command().debug_assert();
        let cli = IdentityCli::try_parse_from([
            "identity",
            "fetch",
            "--format",
            "x509",
            "--output",
            "/run/c/svid.pem",
            "--watch",
        ])
        .expect("parses");
        let IdentityCmd::Fetch(a) = cli.command;
        assert_eq!(a.output, Path::new("/run/c/svid.pem"));
        assert!(a.watch);
        assert_eq!(a.layout, Layout::Swap, "the atomic swap is the default");
        let flat =
            IdentityCli::try_parse_from(["identity", "fetch", "--output", "x", "--layout", "flat"])
                .expect("parses");
        let IdentityCmd::Fetch(a) = flat.command;
        assert_eq!(a.layout, Layout::Flat);
    }

    #[test]
    fn a_fresh_svid_outside_the_local_clock_is_called_clock_skew() {
        assert_eq!(clock_problem(100, 200, 150), None);
        let early = clock_problem(1000, 2000, 700).expect("not yet valid");
        assert!(
            early.contains("clock skew") && early.contains("300 s earlier"),
            "{early}"
        );
        let late = clock_problem(1000, 2000, 2500).expect("expired");
        assert!(
            late.contains("clock skew") && late.contains("expired"),
            "{late}"
        );
    }

    /// An SVID made here with rcgen: a CA, a leaf for `id` valid in `window`, its key.
    fn made(id: &str, window: (i64, i64)) -> (X509Svid, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::Ia5String::try_from(id.to_string()).expect("ascii"),
        )];
        let now = time::OffsetDateTime::now_utc();
        leaf.not_before = now + time::Duration::seconds(window.0);
        leaf.not_after = now + time::Duration::seconds(window.1);
        let leaf = leaf.signed_by(&key, &ca, &ca_key).expect("leaf");
        let svid = X509Svid {
            spiffe_id: ztnet_proto::workload::SpiffeId::parse(id).expect("id"),
            cert_chain_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: ca.pem(),
            not_after: 0,
            not_before: 0,
        };
        (
            svid,
            rcgen::KeyPair::generate().expect("key").serialize_pem(),
        )
    }

    #[test]
    fn an_answer_whose_key_or_id_does_not_match_is_not_written() {
        let id = "spiffe://corp.example/ns/p/sa/api";
        let (good, other_key) = made(id, (-60, 3600));
        check_answer(&good).expect("a matching pair is accepted");
        let mut wrong_key = good.clone();
        wrong_key.key_pem = other_key;
        let e = check_answer(&wrong_key).expect_err("mismatched key");
        assert!(e.to_string().contains("not for the private key"), "{e}");
        let mut wrong_id = good.clone();
        wrong_id.spiffe_id =
            ztnet_proto::workload::SpiffeId::parse("spiffe://corp.example/ns/p/sa/other")
                .expect("id");
        let e = check_answer(&wrong_id).expect_err("another id");
        assert!(e.to_string().contains("does not carry"), "{e}");
        let mut no_bundle = good;
        no_bundle.bundle_pem = String::new();
        assert!(check_answer(&no_bundle).is_err());
    }

    #[test]
    fn an_svid_left_on_disk_is_called_expired_or_clock_skew() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("svid.pem");
        assert_eq!(OnDisk::read(&path), None, "no file, nothing to say");
        let id = "spiffe://corp.example/ns/p/sa/api";

        let (expired, _) = made(id, (-7200, -3600));
        fs::write(&path, &expired.cert_chain_pem).expect("write");
        let disk = OnDisk::read(&path).expect("parses");
        let text = disk.describe(now_unix());
        assert!(
            text.contains("expired at") && text.contains("fetching a new one"),
            "{text}"
        );

        let (future, _) = made(id, (300, 3600));
        fs::write(&path, &future.cert_chain_pem).expect("write");
        let text = OnDisk::read(&path).expect("parses").describe(now_unix());
        assert!(
            text.starts_with("clock skew") && text.contains("fix this machine"),
            "{text}"
        );

        let (fresh, _) = made(id, (-60, 3600));
        fs::write(&path, &fresh.cert_chain_pem).expect("write");
        let text = OnDisk::read(&path).expect("parses").describe(now_unix());
        assert!(text.contains("valid until"), "{text}");

        fs::write(&path, "not a certificate").expect("write");
        assert_eq!(OnDisk::read(&path), None);
    }

    #[test]
    fn a_failed_renewal_says_how_long_the_svid_on_disk_lasts() {
        assert_eq!(kept(None, 10), "no SVID is on disk yet");
        let left = kept(Some(1_000), 900);
        assert!(
            left.contains("stays in place") && left.contains("100 s left"),
            "{left}"
        );
        let gone = kept(Some(1_000), 1_030);
        assert!(
            gone.contains("expired at") && gone.contains("30 s ago"),
            "{gone}"
        );
    }
}
