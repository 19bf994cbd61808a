//! The node's local API on Unix sockets (root only, mode 0600):
//!
//! - `/var/run/ztnet/IFACE.sock`: read the line `status`, answer one JSON [`StatusReport`].
//! - `/var/run/wireguard/IFACE.sock`: WireGuard's configuration protocol, see [`super::uapi`].
//!
//! Each socket has one thread that accepts and answers one connection at a time.
//!
//! [`StatusReport`]: ztnet_proto::status::StatusReport

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use ztnet_proto::status::STATUS_DIR;

use super::peers::lock;
use super::{STOP_POLL, Shared, sys, uapi};

/// Directory of WireGuard's configuration sockets.
pub const WIREGUARD_DIR: &str = "/var/run/wireguard";

/// The status socket path of an interface.
pub fn status_path(iface: &str) -> PathBuf {
    Path::new(STATUS_DIR).join(format!("{iface}.sock"))
}

/// The WireGuard configuration socket path of an interface.
pub fn wireguard_path(iface: &str) -> PathBuf {
    Path::new(WIREGUARD_DIR).join(format!("{iface}.sock"))
}

/// Binds both sockets and starts their threads.
pub(super) fn spawn(shared: Arc<Shared>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let name = shared.iface.name.clone();
    let mut handles = Vec::new();
    for (path, handler) in [
        (status_path(&name), serve_status as fn(&Shared, UnixStream)),
        (wireguard_path(&name), serve_uapi),
    ] {
        let listener = bind(&path)?;
        lock(&shared.api_paths).push(path.clone());
        let s = shared.clone();
        let h = std::thread::Builder::new()
            .name("ztnet-api".into())
            .spawn(move || accept_loop(&s, &listener, handler))
            .context("cannot start local API thread")?;
        handles.push(h);
        tracing::debug!(path = %path.display(), "local API listening");
    }
    Ok(handles)
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if path.exists() {
        // A live daemon on this interface would answer; a stale socket from a crash does not.
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another running daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
    listener
        .set_nonblocking(true)
        .context("non-blocking listener")?;
    Ok(listener)
}

fn accept_loop(s: &Shared, listener: &UnixListener, handler: fn(&Shared, UnixStream)) {
    while !s.stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                handler(s, stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = sys::wait_readable(listener.as_raw_fd(), STOP_POLL);
            }
            Err(e) => {
                tracing::debug!(error = %e, "local API accept failed");
                let _ = sys::wait_readable(listener.as_raw_fd(), STOP_POLL);
            }
        }
    }
}

fn serve_status(s: &Shared, stream: UnixStream) {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut w = &stream;
    let answer = if line.trim() == "status" {
        serde_json::to_string(&s.status()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    } else {
        r#"{"error":"unknown request; send the line `status`"}"#.to_string()
    };
    let _ = w.write_all(answer.as_bytes());
    let _ = w.write_all(b"\n");
}

fn serve_uapi(s: &Shared, stream: UnixStream) {
    let mut reader = BufReader::new(&stream);
    let mut w = &stream;
    loop {
        let mut first = String::new();
        match reader.read_line(&mut first) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = uapi::parse_request(&first);
        // Read up to the blank line that ends the request.
        if first.trim() != "" {
            loop {
                let mut l = String::new();
                match reader.read_line(&mut l) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if l.trim().is_empty() => break,
                    Ok(_) => {}
                }
            }
        } else {
            continue;
        }
        let answer = match request {
            uapi::Request::Get => {
                let peers = s.table.read().unwrap_or_else(|p| p.into_inner()).snapshot();
                let key = lock(&s.keys).0.clone();
                uapi::format_get(&key, s.listen_port, &peers, SystemTime::now())
            }
            uapi::Request::Set => uapi::format_error(uapi::SET_REFUSED_ERRNO),
            uapi::Request::Unknown(_) => uapi::format_error(libc::EINVAL),
        };
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
