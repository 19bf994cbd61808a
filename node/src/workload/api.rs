//! The workload API: a Unix socket, mode 0666 because the kernel identifies every caller
//! (SO_PEERCRED: uid, gid, pid; the executable from `/proc/PID/exe`). One JSON request line,
//! one JSON answer. A caller gets exactly the SVIDs of the registrations for this node whose
//! selectors it meets, each with a key made here for it; a caller that meets none is refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};
use ztnet_proto::status::STATUS_DIR;
use ztnet_proto::workload::{
    Caller, SpiffeId, WorkloadEntry, WorkloadReply, WorkloadRequest, X509Svid, matches_all,
};

use super::Broker;

/// How long a caller may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read.
const MAX_REQUEST: u64 = 4096;
/// Callers served at once; more are refused as busy, so a local flood cannot queue without end.
const MAX_CALLERS: usize = 32;

/// The workload socket of an interface: `/var/run/ztnet/IFACE.workload.sock`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(STATUS_DIR).join(format!("{iface}.workload.sock"))
}

/// Binds the socket (replacing a stale one, refusing one a live daemon answers on).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
    let callers = Arc::new(tokio::sync::Semaphore::new(MAX_CALLERS));
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Ok(permit) = callers.clone().try_acquire_owned() else {
                    let busy = refused("busy", "the workload API is busy; retry".into());
                    tokio::spawn(async move { reply(&mut stream, &busy).await });
                    continue;
                };
                let broker = broker.clone();
                tokio::spawn(async move {
                    handle(stream, &broker).await;
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

async fn handle(mut stream: UnixStream, broker: &Broker) {
    let answer = match answer(&mut stream, broker).await {
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

async fn answer(stream: &mut UnixStream, broker: &Broker) -> anyhow::Result<WorkloadReply> {
    let caller = caller(stream)?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| anyhow!("no request line within {}s", REQUEST_TIMEOUT.as_secs()))?
        .context("reading the request")?;
    let request: WorkloadRequest = serde_json::from_str(line.trim())
        .context("the request is not a workload API request (send {\"op\":\"fetch_x509\"})")?;
    let WorkloadRequest::FetchX509 = request;
    Ok(fetch_x509(broker, &caller).await)
}

fn caller(stream: &UnixStream) -> anyhow::Result<Caller> {
    let cred = stream
        .peer_cred()
        .context("reading the caller's credentials")?;
    // Read once, while the caller is connected: a caller that exec()s another program or hands
    // the connection on afterwards is judged by what /proc showed here (docs/identity.md).
    let path = cred.pid().and_then(|pid| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    });
    Ok(Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        path,
    })
}

/// Issues every SVID the caller is entitled to, or refuses.
async fn fetch_x509(broker: &Broker, caller: &Caller) -> WorkloadReply {
    let entries = match broker.list().await {
        Ok(e) => e,
        Err(e) => return refused(&e.code, e.message),
    };
    let matched: Vec<&WorkloadEntry> = entries
        .iter()
        .filter(|e| matches_all(&e.selectors, caller))
        .collect();
    if matched.is_empty() {
        info!(
            uid = caller.uid,
            gid = caller.gid,
            path = caller.path.as_deref().unwrap_or("?"),
            "workload API caller matches no registration"
        );
        return refused(
            "no-match",
            format!(
                "no workload registration on this node matches this caller (uid {}, gid {}, \
                 executable {}); register one with `ztnet workload register`",
                caller.uid,
                caller.gid,
                caller.path.as_deref().unwrap_or("unknown")
            ),
        );
    }
    let mut svids = Vec::with_capacity(matched.len());
    for entry in matched {
        match issue(broker, &entry.spiffe_id).await {
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
async fn issue(broker: &Broker, spiffe_id: &SpiffeId) -> anyhow::Result<X509Svid> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("making the workload key")?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let signed = broker
        .sign(spiffe_id.as_str(), csr_pem)
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
