//! The UAPI requests as the shell carries them out: `get=1` in every mode, `set=1` in plain
//! WireGuard mode only (see [`super::uapi`] for the protocol and the device model).
//!
//! A `set=1` is parsed and applied to a copy of the device first; then, in order, the listen
//! port is moved (a new socket under the same descriptor), the fwmark set, and the peers
//! applied through the same `apply` as every mode. The first failure answers its errno and
//! leaves the device as it was.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::peers::lock;
use super::{Shared, bind_udp_family, source, uapi};
use crate::netconfig::DataplaneConfig;

/// errno when a new socket cannot be had and the error does not say why: EADDRINUSE.
const EADDRINUSE: i32 = 98;

/// How long a listen-port change waits for a port that is in use to be freed.
const PORT_WAIT: Duration = Duration::from_secs(3);

impl Shared {
    /// The answer to `get=1`.
    pub(super) fn uapi_get(&self) -> String {
        let peers = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let port = self.listen_port.load(Ordering::Relaxed);
        match &self.plain {
            Some(device) => lock(device).format_get(port, &peers, SystemTime::now()),
            None => {
                let key = lock(&self.keys).0.clone();
                uapi::format_get(&key, port, &peers, SystemTime::now())
            }
        }
    }

    /// The answer to `set=1` with `lines` (the request without its first and last lines).
    pub(super) fn uapi_set(&self, lines: &[String]) -> String {
        let Some(device) = &self.plain else {
            tracing::warn!(
                interface = %self.iface.name,
                "`wg set` refused: this node's peers come from its configuration or the \
                 coordinator (plain WireGuard mode is `ztnet-node wg IFACE`)"
            );
            return uapi::format_error(uapi::SET_REFUSED_ERRNO);
        };
        let mut device = lock(device);
        let mut next = device.clone();
        let outcome = match next.apply_set(lines.iter().map(String::as_str)) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(interface = %self.iface.name, "`wg set` refused: {e}");
                return uapi::format_error(e.errno);
            }
        };
        let port = self.listen_port.load(Ordering::Relaxed);
        if let Some(wanted) = outcome.listen_port.filter(|&p| p == 0 || p != port)
            && let Err(e) = self.rebind(wanted, next.fwmark)
        {
            tracing::warn!(interface = %self.iface.name, "`wg set` refused: {e:#}");
            return uapi::format_error(errno_of(&e));
        }
        if let Some(mark) = outcome.fwmark {
            if let Err(e) = source::set_fwmark(self.socket.as_raw_fd(), mark) {
                tracing::warn!(interface = %self.iface.name, error = %e, "cannot set fwmark");
                return uapi::format_error(e.raw_os_error().unwrap_or(uapi::EINVAL));
            }
            // The connected sockets are made again with it at the next timer tick.
            self.conns.set_mark(mark);
        }
        let config = DataplaneConfig {
            peers: next.peer_configs(),
            private_key: next.private_key.clone(),
            ..DataplaneConfig::default()
        };
        if let Err(e) = self.apply(config) {
            tracing::warn!(interface = %self.iface.name, "`wg set` refused: {e:#}");
            return uapi::format_error(uapi::EINVAL);
        }
        {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            for (key, endpoint) in &outcome.endpoints {
                table.set_endpoint(key, *endpoint);
            }
        }
        *device = next;
        uapi::format_error(0)
    }

    /// Moves the socket to `port` (0: any free port): a new socket of the same family, bound
    /// and set up like the first, takes the old one's descriptor number.
    fn rebind(&self, port: u16, fwmark: u32) -> anyhow::Result<()> {
        // The port may still be held by the daemon of an interface just deleted (it is
        // stopping): wait a little for it, as for the socket paths.
        let deadline = Instant::now() + PORT_WAIT;
        let fresh = loop {
            match bind_udp_family(port, Some(self.socket_v6)) {
                Ok((s, _)) => break s,
                Err(e) if errno_of(&e) == EADDRINUSE && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        if fwmark != 0 {
            source::set_fwmark(fresh.as_raw_fd(), fwmark)?;
        }
        let bound = fresh.local_addr()?.port();
        if let Err(e) = source::share_port(fresh.as_raw_fd()) {
            tracing::warn!(error = %e, "no SO_REUSEPORT; every datagram leaves from one socket");
        }
        source::replace_socket(self.socket.as_raw_fd(), fresh)?;
        // The port first: a reconcile that starts after `clear` makes sockets on the new one.
        self.listen_port.store(bound, Ordering::Relaxed);
        // The connected sockets hold the old port: senders go back to the main socket, and
        // the next timer tick makes them again on the new port (one made meanwhile on the
        // old port is thrown away, see `Conns::clear`).
        self.conns.clear();
        // The UDP thread may be waiting on the old socket, which nothing will wake now.
        self.udp_wake.signal();
        tracing::info!(interface = %self.iface.name, listen_port = bound, "listen port moved");
        Ok(())
    }
}

fn errno_of(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
        .unwrap_or(EADDRINUSE)
}
