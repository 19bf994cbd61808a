//! The node's local API on Unix sockets (root only, mode 0600):
//!
//! - `/var/run/ztnet/IFACE.sock`: read the line `status`, answer one JSON [`StatusReport`].
//! - `/var/run/wireguard/IFACE.sock`: WireGuard's configuration protocol, see [`super::uapi`].
//!
//! Each socket has one thread that accepts connections and answers each on a thread of its own
//! (at most 16 at once), so that an idle client does not hold up `ztnet status`.
//!
//! [`StatusReport`]: ztnet_proto::status::StatusReport

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use ztnet_proto::status::STATUS_DIR;

use super::peers::lock;
use super::{Shared, sys, uapi};

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
        lock(&shared.api_paths).push(Bound::new(&path));
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

/// How long `bind` waits for a daemon that still answers on the path to go away: the
/// daemon of an interface just deleted (and created again by this one) is stopping.
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

/// A socket path this data plane bound, with the file's identity: on shutdown it is removed
/// only if it is still this one (a successor may have bound the same path since, and a file
/// system may give the new file the old one's inode number, so its change time counts too).
pub(super) struct Bound {
    path: PathBuf,
    id: Option<(u64, u64, i64, i64)>,
}

impl Bound {
    fn new(path: &Path) -> Bound {
        Bound {
            path: path.to_path_buf(),
            id: file_id(path),
        }
    }

    /// Removes the socket file if it is still the one bound.
    pub(super) fn remove(&self) {
        let now = file_id(&self.path);
        if now.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Makes the directory of the node's sockets (`/var/run/ztnet`, `/var/run/wireguard`) with mode
/// 0755 whatever the umask, and opens an existing one to 0755 if it is closed to others: the
/// workload socket in it must be reachable by every user, and the `wg` tool looks in the other.
/// Each socket in it carries its own mode.
pub fn runtime_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o055 != 0o055 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set mode 0755 on {}", dir.display()))?;
    }
    Ok(())
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has a directory")?;
    runtime_dir(dir)?;
    if path.exists() {
        // A live daemon on this interface would answer; a stale socket from a crash does not.
        let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
        while UnixStream::connect(path).is_ok() {
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("{} is in use by another running daemon", path.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !path.exists() {
            return bind_new(path);
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    bind_new(path)
}

fn bind_new(path: &Path) -> anyhow::Result<UnixListener> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
    listener
        .set_nonblocking(true)
        .context("non-blocking listener")?;
    Ok(listener)
}

/// How long the accept loop pauses after an accept error other than "nothing to accept".
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Most connections one socket serves at once; one more is closed unanswered.
const MAX_CLIENTS: usize = 16;

/// Accepts connections and answers each on a thread of its own, so that a client that
/// connects and sends nothing (it is cut off after 2 s) does not hold up the others.
fn accept_loop(s: &Shared, listener: &UnixListener, handler: fn(&Shared, UnixStream)) {
    let busy = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        while !s.stopping() {
            match listener.accept() {
                Ok((stream, _)) => {
                    if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
                        tracing::debug!("local API: {MAX_CLIENTS} clients at once; one refused");
                        continue;
                    }
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                    busy.fetch_add(1, Ordering::Relaxed);
                    let busy = &busy;
                    let spawned = std::thread::Builder::new()
                        .name("ztnet-api-conn".into())
                        .spawn_scoped(scope, move || {
                            handler(s, stream);
                            busy.fetch_sub(1, Ordering::Relaxed);
                        });
                    if let Err(e) = spawned {
                        busy.fetch_sub(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "local API: cannot start a thread");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let _ = sys::wait_readable([listener.as_raw_fd(), s.stop_event.fd()]);
                }
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so wait a little
                    // instead of spinning on it.
                    tracing::debug!(error = %e, "local API accept failed");
                    std::thread::sleep(ACCEPT_RETRY);
                }
            }
        }
    });
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

/// Largest `set=1` request read, in bytes (a configuration of a few hundred thousand allowed
/// IPs fits).
const MAX_SET_BYTES: usize = 64 << 20;

fn serve_uapi(s: &Shared, stream: UnixStream) {
    let mut reader = BufReader::new(&stream);
    let mut w = &stream;
    loop {
        let mut first = String::new();
        match reader.read_line(&mut first) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if first.trim().is_empty() {
            continue;
        }
        let request = uapi::parse_request(&first);
        // Read up to the blank line that ends the request, keeping a set request's lines.
        let mut lines = Vec::new();
        let mut size = 0usize;
        loop {
            let mut l = String::new();
            match reader.read_line(&mut l) {
                Ok(0) | Err(_) => return,
                Ok(_) if l.trim().is_empty() => break,
                Ok(n) => {
                    size += n;
                    if request == uapi::Request::Set && size <= MAX_SET_BYTES {
                        l.truncate(l.trim_end().len());
                        lines.push(l);
                    }
                }
            }
        }
        let answer = match request {
            uapi::Request::Get => s.uapi_get(),
            uapi::Request::Set if size > MAX_SET_BYTES => uapi::format_error(libc::E2BIG),
            uapi::Request::Set => s.uapi_set(&lines),
            uapi::Request::Unknown(_) => uapi::format_error(libc::EINVAL),
        };
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn the_socket_directory_is_open_to_others_whatever_made_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Made by a process with umask 077 (a script, a root shell).
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&closed).expect("mkdir");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        runtime_dir(&closed).expect("runtime dir");
        assert_eq!(mode(&closed), 0o755);
        // Made here.
        let fresh = tmp.path().join("a/b");
        runtime_dir(&fresh).expect("runtime dir");
        assert_eq!(mode(&fresh) & 0o055, 0o055, "{:o}", mode(&fresh));
        // One already open is left as it is.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        runtime_dir(&open).expect("runtime dir");
        assert_eq!(mode(&open), 0o775);
    }
}
