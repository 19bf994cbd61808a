//! The workload API: a Unix socket, mode 0666 because the kernel identifies every caller
//! (SO_PEERCRED: uid, gid, pid; the executable from `/proc/PID/exe`). One JSON request line,
//! one JSON answer. A caller gets exactly the SVIDs of the registrations for this node whose
//! selectors it meets, each with a key made here for it; a caller that meets none is refused.
//!
//! Reading `/proc/PID/exe` of a process of another uid (or one with more capabilities) takes
//! `CAP_SYS_PTRACE`. Without it the executable is unknown, so `unix:path:` selectors cannot
//! match: the node says so once at start ([`check_capabilities`]), WARNs once per cause when a
//! read fails, and the refusal to the caller names the error.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};
use ztnet_proto::status::STATUS_DIR;
use ztnet_proto::workload::{
    Caller, SpiffeId, WorkloadEntry, WorkloadReply, WorkloadRequest, X509Svid, matches_all,
};

use super::{Broker, COORDINATOR_DEADLINE};

/// How long a caller may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read.
const MAX_REQUEST: u64 = 4096;
/// Callers served at once; more are refused as busy, so a local flood cannot queue without end.
const MAX_CALLERS: usize = 32;
/// The bit of `CAP_SYS_PTRACE` in `/proc/PID/status` `CapEff`.
const CAP_SYS_PTRACE: u32 = 19;

/// The workload socket of an interface: `/var/run/ztnet/IFACE.workload.sock`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(STATUS_DIR).join(format!("{iface}.workload.sock"))
}

/// Binds the socket (replacing a stale one, refusing one a live daemon answers on).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has a directory")?;
    crate::dataplane::api::runtime_dir(dir)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket; remove it", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another running daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set mode 0666 on {}", path.display()))?;
    Ok(listener)
}

/// Serves callers until the task is dropped.
pub async fn serve(listener: UnixListener, broker: Arc<Broker>) {
    check_capabilities();
    let callers = Arc::new(tokio::sync::Semaphore::new(MAX_CALLERS));
    let warned = Arc::new(Warned::default());
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Ok(permit) = callers.clone().try_acquire_owned() else {
                    let busy = refused("busy", "the workload API is busy; retry".into());
                    tokio::spawn(async move { reply(&mut stream, &busy).await });
                    continue;
                };
                let broker = broker.clone();
                let warned = warned.clone();
                tokio::spawn(async move {
                    handle(stream, &broker, &warned).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "workload API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: UnixStream, broker: &Broker, warned: &Warned) {
    let answer = match answer(&mut stream, broker, warned).await {
        Ok(r) => r,
        Err(e) => refused("bad-request", format!("{e:#}")),
    };
    reply(&mut stream, &answer).await;
}

async fn reply(stream: &mut UnixStream, answer: &WorkloadReply) {
    let mut body = serde_json::to_vec(answer).unwrap_or_default();
    body.push(b'\n');
    if let Err(e) = stream.write_all(&body).await {
        debug!(error = %e, "workload API answer not delivered");
    }
    let _ = stream.shutdown().await;
}

async fn answer(
    stream: &mut UnixStream,
    broker: &Broker,
    warned: &Warned,
) -> anyhow::Result<WorkloadReply> {
    let (caller, exe_error) = caller(stream)?;
    if let Some(e) = &exe_error {
        warned.once(e);
    }
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| anyhow!("no request line within {}s", REQUEST_TIMEOUT.as_secs()))?
        .context("reading the request")?;
    let request: WorkloadRequest = serde_json::from_str(line.trim())
        .context("the request is not a workload API request (send {\"op\":\"fetch_x509\"})")?;
    let WorkloadRequest::FetchX509 = request;
    Ok(fetch_x509(broker, &caller, exe_error.as_ref()).await)
}

/// Why the executable of a caller is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExeError {
    /// The caller's pid, when the kernel gave one.
    pub pid: Option<i32>,
    /// The error of the read, when there was one.
    pub kind: Option<std::io::ErrorKind>,
    /// One sentence: what failed and what to do.
    pub message: String,
}

impl ExeError {
    /// Describes a failed `read_link` of `/proc/PID/exe`.
    pub fn read_failed(pid: i32, e: &std::io::Error) -> ExeError {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "; the node needs CAP_SYS_PTRACE to see the executable of another user's process \
                 (or of one with more capabilities than the node), see docs/identity.md"
            }
            std::io::ErrorKind::NotFound => "; the caller exited before it was identified",
            _ => "",
        };
        ExeError {
            pid: Some(pid),
            kind: Some(e.kind()),
            message: format!("cannot read /proc/{pid}/exe: {e}{hint}"),
        }
    }

    fn no_pid() -> ExeError {
        ExeError {
            pid: None,
            kind: None,
            message: "the kernel gave no pid for the caller, so its executable is unknown".into(),
        }
    }
}

/// The causes of unknown executables already logged: one WARN per cause, not one per call.
#[derive(Default)]
struct Warned(Mutex<HashSet<Option<std::io::ErrorKind>>>);

impl Warned {
    fn once(&self, e: &ExeError) {
        let first = self
            .0
            .lock()
            .map(|mut seen| seen.insert(e.kind))
            // A panic elsewhere while holding the set: log rather than stay silent.
            .unwrap_or(true);
        if first {
            warn!(
                "{}; unix:path: selectors cannot match such callers (said once per cause)",
                e.message
            );
        } else {
            debug!("{}", e.message);
        }
    }
}

/// The caller's credentials; the executable's path, or why it is unknown.
fn caller(stream: &UnixStream) -> anyhow::Result<(Caller, Option<ExeError>)> {
    let cred = stream
        .peer_cred()
        .context("reading the caller's credentials")?;
    // Read once, while the caller is connected: a caller that exec()s another program or hands
    // the connection on afterwards is judged by what /proc showed here (docs/identity.md).
    let (path, exe_error) = match cred.pid() {
        None => (None, Some(ExeError::no_pid())),
        Some(pid) => match std::fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(p) => (Some(p.to_string_lossy().into_owned()), None),
            Err(e) => (None, Some(ExeError::read_failed(pid, &e))),
        },
    };
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        path,
    };
    Ok((caller, exe_error))
}

/// Whether `CapEff` of a `/proc/PID/status` text holds `CAP_SYS_PTRACE`; `None` when the
/// text has no readable `CapEff` line.
pub fn has_sys_ptrace(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// Says once, at start, when this process lacks `CAP_SYS_PTRACE`: `unix:path:` selectors can
/// then match only callers of the node's own uid with no more capabilities than it has.
pub fn check_capabilities() {
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot read /proc/self/status to check CAP_SYS_PTRACE: {e}");
            return;
        }
    };
    match has_sys_ptrace(&status) {
        Some(true) => debug!("CAP_SYS_PTRACE held: callers' executables can be read"),
        Some(false) => warn!(
            "the node lacks CAP_SYS_PTRACE: it cannot read /proc/PID/exe of another user's \
             process, so unix:path: selectors cannot match callers of other users (add \
             CAP_SYS_PTRACE to the unit's CapabilityBoundingSet, see docs/identity.md)"
        ),
        None => warn!("no CapEff line in /proc/self/status: CAP_SYS_PTRACE not checked"),
    }
}

/// Issues every SVID the caller is entitled to, or refuses. All the requests to the
/// coordinator for one caller share one deadline.
async fn fetch_x509(broker: &Broker, caller: &Caller, exe: Option<&ExeError>) -> WorkloadReply {
    let deadline = tokio::time::Instant::now() + COORDINATOR_DEADLINE;
    let entries = match broker.list(deadline).await {
        Ok(e) => e,
        Err(e) => return refused(&e.code, e.message),
    };
    let matched: Vec<&WorkloadEntry> = entries
        .iter()
        .filter(|e| matches_all(&e.selectors, caller))
        .collect();
    if matched.is_empty() {
        let executable = match (&caller.path, exe) {
            (Some(p), _) => p.clone(),
            (None, Some(e)) => format!("unknown: {}", e.message),
            (None, None) => "unknown".into(),
        };
        info!(
            uid = caller.uid,
            gid = caller.gid,
            executable = %executable,
            "workload API caller matches no registration"
        );
        return refused(
            "no-match",
            format!(
                "no workload registration on this node matches this caller (uid {}, gid {}, \
                 executable {executable}); register one with `ztnet workload register`",
                caller.uid, caller.gid,
            ),
        );
    }
    let mut svids = Vec::with_capacity(matched.len());
    for entry in matched {
        match issue(broker, &entry.spiffe_id, deadline).await {
            Ok(s) => svids.push(s),
            Err(e) => {
                warn!(spiffe_id = %entry.spiffe_id, "SVID not issued: {e:#}");
                return refused("refused", format!("{}: {e:#}", entry.spiffe_id));
            }
        }
    }
    info!(
        uid = caller.uid,
        svids = svids.len(),
        "SVIDs handed to a workload"
    );
    WorkloadReply::Svids { svids }
}

/// Makes a key, has it signed, and checks the answer before handing it out.
async fn issue(
    broker: &Broker,
    spiffe_id: &SpiffeId,
    deadline: tokio::time::Instant,
) -> anyhow::Result<X509Svid> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("making the workload key")?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let signed = broker
        .sign(spiffe_id.as_str(), csr_pem, deadline)
        .await
        .map_err(|e| anyhow!("{} ({})", e.message, e.code))?;

    let der = rustls_pemfile::certs(&mut signed.cert_pem.as_bytes())
        .next()
        .context("the coordinator sent no certificate")?
        .context("the coordinator's certificate is not PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow!("the coordinator's certificate does not parse: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        anyhow::bail!("the signed certificate is not for the key made here");
    }
    let uris = svid_uris(&cert);
    if uris != [spiffe_id.as_str()] {
        anyhow::bail!("the signed certificate names {uris:?}, not {spiffe_id}");
    }
    let validity = cert.validity();
    Ok(X509Svid {
        spiffe_id: spiffe_id.clone(),
        cert_chain_pem: signed.cert_pem,
        key_pem: key.serialize_pem(),
        bundle_pem: signed.bundle_pem,
        not_after: u64::try_from(validity.not_after.timestamp()).unwrap_or(0),
        not_before: u64::try_from(validity.not_before.timestamp()).unwrap_or(0),
    })
}

fn svid_uris<'a>(cert: &'a x509_parser::certificate::X509Certificate<'_>) -> Vec<&'a str> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect()
}

fn refused(code: &str, message: String) -> WorkloadReply {
    WorkloadReply::Refused {
        code: code.into(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_sys_ptrace_is_read_from_cap_eff() {
        let status =
            |eff: &str| format!("Name:\tztnet-node\nCapPrm:\t000001ffffffffff\nCapEff:\t{eff}\n");
        // The shipped unit before the fix: CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10).
        assert_eq!(has_sys_ptrace(&status("0000000000001400")), Some(false));
        assert_eq!(has_sys_ptrace(&status("0000000000081400")), Some(true));
        assert_eq!(has_sys_ptrace(&status("000001ffffffffff")), Some(true));
        assert_eq!(has_sys_ptrace("Name:\tx\n"), None);
        assert_eq!(has_sys_ptrace(&status("zz")), None);
    }

    #[test]
    fn a_failed_exe_read_says_what_failed_and_what_to_do() {
        let denied = std::io::Error::from_raw_os_error(13);
        let e = ExeError::read_failed(42, &denied);
        assert!(
            e.message
                .starts_with("cannot read /proc/42/exe: Permission denied")
                && e.message.contains("the node needs CAP_SYS_PTRACE"),
            "{}",
            e.message
        );
        let gone = std::io::Error::from_raw_os_error(2);
        let e = ExeError::read_failed(42, &gone);
        assert!(
            e.message.contains("exited") && !e.message.contains("CAP_SYS_PTRACE"),
            "{}",
            e.message
        );
    }

    #[test]
    fn each_cause_is_warned_once() {
        let warned = Warned::default();
        let denied = ExeError::read_failed(1, &std::io::Error::from_raw_os_error(13));
        let again = ExeError::read_failed(2, &std::io::Error::from_raw_os_error(13));
        let gone = ExeError::read_failed(3, &std::io::Error::from_raw_os_error(2));
        for e in [&denied, &again, &gone, &denied] {
            warned.once(e);
        }
        let seen = warned.0.lock().expect("not poisoned");
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
}
