//! The data plane: TUN <-> filter <-> boringtun <-> UDP.
//!
//! This module is the I/O shell: it owns the TUN device, the UDP socket and the threads, and
//! drives the socket-free [`peers::PeerTable`]. Three OS threads with blocking I/O:
//!
//! - TUN reader: read a packet, [`peers::PeerTable::handle_tun_packet`], send the datagram.
//! - UDP reader: receive a datagram, [`peers::PeerTable::handle_datagram`], write to the TUN.
//! - timers: every 100 ms, [`peers::PeerTable::handle_timers`]; logs sessions going up and down.
//!
//! The TUN has two queues when the kernel allows (`IFF_MULTI_QUEUE`; `ZTNET_TUN_QUEUES=1`
//! keeps one). The TUN thread reads the first; the UDP thread writes every received packet
//! other than TCP through the second and reads that queue too, waiting in `poll` for it or its
//! socket. The kernel steers a packet it sends into the TUN to the queue that last wrote a
//! packet of the same flow, so an echo reply or a UDP answer comes back to the UDP thread,
//! which is already awake or is woken alone: a request and its reply cost one thread wake-up
//! on the responder, not two. TCP stays on the first queue so that a bulk sender's segments
//! (steered where its ACKs were written) are encrypted by the TUN thread, beside the receive
//! path; after writing TCP the UDP thread still takes up to [`TUN_ASSIST`] packets from the
//! first queue when the TUN thread is not reading it.
//!
//! Each packet holds a read lock on the current table while it is handled; `apply` builds the
//! next table beside it and swaps it under the write lock, so once `apply` returns no packet is
//! still being handled by a removed peer. Until the first `apply` the table is empty: every
//! packet is dropped (default deny).
//!
//! The hot path does not allocate or log above trace. Datagrams are received with `recvmmsg`
//! and sent with UDP segmentation offload. The TUN is opened with `IFF_VNET_HDR` and TCP/UDP
//! segmentation offloads when the kernel allows ([`offload`]): the TUN thread reads super-packets
//! of up to 64 KiB and splits them into MTU-sized packets, each handed to the table (route,
//! filter, encrypt) on its own; the UDP thread hands every decrypted packet to the table
//! (anti-spoofing, filter) on its own and joins the consecutive TCP segments that passed into
//! one super-packet per flow and batch before it writes them to the TUN. `ZTNET_TUN_OFFLOAD=off`
//! in the environment opens the TUN without them.

pub mod api;
mod conns;
pub mod counters;
mod fragment;
pub mod iface;
pub mod offload;
pub mod peers;
mod plain;
pub mod pmtu;
mod rekey;
pub mod routes;
mod source;
mod sys;
pub mod uapi;

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use netpolicy::{ConntrackConfig, Filter, FilterSpec};
use socket2::{Domain, Protocol, Socket, Type};
use ztnet_proto::status::{PeerStatus, StatusReport};
use ztnet_proto::{PrivateKey, WgKey};

use crate::netconfig::{DataplaneConfig, InterfaceConfig};
use counters::Counters;
use peers::{PeerTable, SessionEvent, Transmit, lock};

/// Socket buffer size the node asks for, each way (SO_RCVBUFFORCE as root).
const SOCKET_BUFFER: usize = 8 << 20;

/// How often the timer thread runs boringtun's timers.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// A running data plane. Until the first `apply` it has no peers and passes nothing.
pub struct Dataplane {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What the threads share.
struct Shared {
    iface: InterfaceConfig,
    /// The key in force and its public half; `apply` may replace them.
    keys: Mutex<(PrivateKey, WgKey)>,
    /// The port the socket is bound to; plain WireGuard mode may move it (`plain::rebind`).
    listen_port: AtomicU16,
    tun: File,
    /// The TUN's second queue, read by the UDP thread only (see [`udp_loop`]); `None` when
    /// the kernel gave one queue.
    tun_reply: Option<File>,
    /// The TUN carries a virtio-net header before every packet (offloads on).
    vnet: bool,
    socket: UdpSocket,
    socket_v6: bool,
    /// Sockets connected to the peers' endpoints, and the UDP thread's wait set.
    conns: conns::Conns,
    table: RwLock<PeerTable>,
    /// Held by whichever thread reads the TUN, so that packets are sent in the order read.
    tun_turn: Mutex<()>,
    /// Serialises `apply` calls; holds the configuration in force.
    config: Mutex<DataplaneConfig>,
    filter: Arc<Mutex<Filter>>,
    counters: Arc<Counters>,
    warnings: Mutex<Vec<String>>,
    /// Static mode: where the configuration in force came from (set by the caller).
    config_source: Mutex<Option<ztnet_proto::status::ConfigSource>>,
    /// Routes of the configuration in force that were not installed, with why.
    skipped_routes: Mutex<std::collections::BTreeMap<ipnet::IpNet, String>>,
    /// 0 unknown, 1 down, 2 up.
    control: AtomicU8,
    stop: AtomicBool,
    /// Signalled once, at stop: every waiting thread has it in its poll set.
    stop_event: sys::Event,
    /// Signalled when the UDP socket was replaced (`plain::rebind`): the UDP thread's poll
    /// must take up the new one. Cleared by that thread.
    udp_wake: sys::Event,
    api_paths: Mutex<Vec<api::Bound>>,
    /// Plain WireGuard mode only: the device as `wg` configured it. `None` in the zero-trust
    /// modes, where `set=1` is refused and the filter always runs.
    plain: Option<Mutex<uapi::Device>>,
    /// Set when the TUN thread lost the interface (deleted with `ip link del`).
    tun_lost: AtomicBool,
    /// Woken when `tun_lost` is set.
    tun_lost_notify: tokio::sync::Notify,
}

impl Dataplane {
    /// Creates the TUN interface and the UDP socket and starts the packet threads.
    pub fn start(iface: InterfaceConfig) -> anyhow::Result<Dataplane> {
        Self::start_mode(iface, false)
    }

    /// Starts the data plane in plain WireGuard mode: peers come from `wg` over the UAPI
    /// socket (`set=1`), and are trusted as WireGuard trusts them: cryptokey routing and
    /// anti-spoofing decide, no identity filter runs. Used by `ztnet-node wg IFACE` only.
    pub fn start_plain_wireguard(iface: InterfaceConfig) -> anyhow::Result<Dataplane> {
        Self::start_mode(iface, true)
    }

    fn start_mode(iface: InterfaceConfig, plain: bool) -> anyhow::Result<Dataplane> {
        sys::check_interface_name(&iface.name)?;
        claim_name(&iface.name)?;
        let OpenedTun {
            tun,
            reply: tun_reply,
            name,
            vnet,
        } = open_tun(&iface.name)
            .with_context(|| format!("cannot create TUN interface {}", iface.name))?;
        iface::link_up(&name, iface.mtu)?;
        let (socket, socket_v6) = bind_udp(iface.listen_port)?;
        let listen_port = socket.local_addr().context("UDP socket address")?.port();
        let shared_port = match source::share_port(socket.as_raw_fd()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no SO_REUSEPORT; every datagram leaves from one socket");
                false
            }
        };

        let counters = Arc::new(Counters::default());
        let filter = Arc::new(Mutex::new(Filter::new(
            FilterSpec::default(),
            ConntrackConfig::default(),
        )));
        let seed = rand::random::<u32>();
        let table = PeerTable::new(
            &iface.private_key,
            &[],
            None,
            filter.clone(),
            counters.clone(),
            seed,
        );
        let public_key = table.public_key();
        let mut iface = iface;
        iface.name = name;

        let shared = Arc::new(Shared {
            keys: Mutex::new((iface.private_key.clone(), public_key)),
            iface,
            listen_port: AtomicU16::new(listen_port),
            tun,
            tun_reply,
            vnet,
            socket,
            socket_v6,
            conns: conns::Conns::new(shared_port && conns::wanted_by_environment())
                .context("epoll")?,
            table: RwLock::new(table),
            tun_turn: Mutex::new(()),
            config: Mutex::new(DataplaneConfig::default()),
            filter,
            counters,
            warnings: Mutex::new(Vec::new()),
            config_source: Mutex::new(None),
            skipped_routes: Mutex::new(Default::default()),
            control: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            stop_event: sys::Event::new().context("eventfd")?,
            udp_wake: sys::Event::new().context("eventfd")?,
            api_paths: Mutex::new(Vec::new()),
            plain: plain.then(|| Mutex::new(uapi::Device::default())),
            tun_lost: AtomicBool::new(false),
            tun_lost_notify: tokio::sync::Notify::new(),
        });
        let mut threads = Vec::new();
        for (name, run) in [
            ("ztnet-tun", tun_loop as fn(&Shared)),
            ("ztnet-udp", udp_loop),
            ("ztnet-timers", timer_loop),
            ("ztnet-link", link_loop),
        ] {
            let s = shared.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&s))
                .with_context(|| format!("cannot start thread {name}"))?;
            threads.push(handle);
        }
        tracing::info!(
            interface = %shared.iface.name,
            listen_port,
            public_key = %public_key.short(),
            "data plane started"
        );
        Ok(Dataplane {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Applies a new configuration atomically; unchanged peers keep their sessions. A new
    /// `private_key` gives every peer a fresh session on the new key, keeping its endpoint.
    pub fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()> {
        self.shared.apply(config)
    }

    /// Whether the TUN interface is gone (deleted with `ip link del`): the data plane passes
    /// nothing any more and the daemon should stop.
    pub fn interface_gone(&self) -> bool {
        self.shared.tun_lost.load(Ordering::Relaxed)
    }

    /// Completes once the TUN interface is gone (at once if it already is).
    pub async fn interface_lost(&self) {
        loop {
            // Made before the check, so a loss between the two is not missed.
            let woken = self.shared.tun_lost_notify.notified();
            if self.interface_gone() {
                return;
            }
            woken.await;
        }
    }
}

impl Shared {
    /// The warnings shown in status: the peer table's, then the routes left out (every
    /// apply looks at every route again, so this replaces what was there).
    fn set_warnings(&self, table: &[String], left_out: Vec<(ipnet::IpNet, String)>) {
        let route_warnings = {
            let mut skipped = lock(&self.skipped_routes);
            *skipped = left_out.into_iter().collect();
            skipped.values().cloned().collect::<Vec<_>>()
        };
        let mut warnings = table.to_vec();
        warnings.extend(route_warnings);
        *lock(&self.warnings) = warnings;
    }

    /// Puts back the routes of the configuration in force that are missing (the interface
    /// went down and up: the kernel dropped them).
    fn restore_routes(&self) {
        let current = lock(&self.config);
        match iface::sync_addresses(&self.iface.name, &current, &current) {
            Ok(left_out) => {
                for (_, w) in &left_out {
                    tracing::warn!(interface = %self.iface.name, "{w}");
                }
                let table = self.table.read().unwrap_or_else(|p| p.into_inner());
                self.set_warnings(table.warnings(), left_out);
            }
            Err(e) => {
                tracing::warn!(interface = %self.iface.name, error = %e, "cannot restore routes")
            }
        }
    }

    fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()> {
        let s = self;
        let mut current = lock(&s.config);
        validate(&config)?;
        let mut config = config;
        let new_key = config.private_key.take();
        let key = new_key.unwrap_or_else(|| lock(&s.keys).0.clone());

        let left_out = iface::sync_addresses(&s.iface.name, &current, &config)?;
        for (_, w) in &left_out {
            tracing::warn!(interface = %s.iface.name, "{w}");
        }

        let next = {
            let old = s.table.read().unwrap_or_else(|p| p.into_inner());
            PeerTable::new(
                &key,
                &config.peers,
                Some(&old),
                s.filter.clone(),
                s.counters.clone(),
                0,
            )
        };
        let next = if s.plain.is_some() {
            next.plain_wireguard()
        } else {
            next.with_local(&config.addresses, s.iface.mtu)
        };
        for w in next.warnings() {
            tracing::warn!(interface = %s.iface.name, "{w}");
        }
        s.set_warnings(next.warnings(), left_out);

        {
            let mut table = s.table.write().unwrap_or_else(|p| p.into_inner());
            lock(&s.filter).install(config.filter.clone(), Instant::now());
            *lock(&s.keys) = (key, next.public_key());
            *table = next;
        }
        tracing::info!(
            interface = %s.iface.name,
            peers = config.peers.len(),
            version = config.version,
            "configuration applied"
        );
        *current = config;
        Ok(())
    }
}

impl Dataplane {
    /// The UDP port actually bound.
    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port.load(Ordering::Relaxed)
    }

    /// Local addresses worth reporting to the coordinator, with the listen port.
    pub fn local_endpoints(&self) -> Vec<SocketAddr> {
        iface::local_addresses(&self.shared.iface.name)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, self.listen_port()))
            .collect()
    }

    /// Key mismatches seen since the last call (FC-20): handshakes from a peer's address
    /// under a key this node does not hold for it, or for a key this node no longer has.
    pub fn take_key_mismatches(&self) -> Vec<peers::KeyMismatch> {
        self.shared
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .take_mismatches()
    }

    /// At most `limit` of the filter's open flows with the peers of the configuration in force
    /// (a peer left out of the netmap keeps its flows in the filter until they end, but no
    /// packet of them can pass), and whether the filter held more. The filter's lock is held
    /// only while its flows are copied.
    pub fn open_flows(&self, limit: usize) -> (Vec<netpolicy::OpenFlow>, bool) {
        let snapshot = lock(&self.shared.filter).flow_snapshot(Instant::now(), limit);
        let peers: std::collections::HashSet<String> = lock(&self.shared.config)
            .peers
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let mut flows = snapshot.flows();
        flows.retain(|f| peers.contains(&f.peer));
        (flows, snapshot.truncated())
    }

    /// Records whether the control channel is up (shown in status).
    pub fn set_control_connected(&self, connected: bool) {
        let v = if connected { 2 } else { 1 };
        self.shared.control.store(v, Ordering::Relaxed);
    }

    /// A status snapshot.
    pub fn status(&self) -> StatusReport {
        self.shared.status()
    }

    /// Serves `/var/run/ztnet/IFACE.sock` (status) and `/var/run/wireguard/IFACE.sock` (the
    /// WireGuard cross-platform interface, read side) from background threads until the data
    /// plane stops. Returns once both sockets are listening.
    pub fn serve_local_api(&self) -> anyhow::Result<()> {
        let handles = api::spawn(self.shared.clone())?;
        lock(&self.threads).extend(handles);
        Ok(())
    }

    /// The interface name the kernel gave the TUN device.
    pub fn interface(&self) -> &str {
        &self.shared.iface.name
    }

    /// Records where the configuration in force came from, or (with `refused`) a reload
    /// that was refused; shown in status.
    pub fn set_config_source(&self, source: ztnet_proto::status::ConfigSource) {
        *lock(&self.shared.config_source) = Some(source);
    }

    /// Records a refused reload against the source in force (no-op without one).
    pub fn config_refused(&self, at: u64, error: String) {
        if let Some(s) = lock(&self.shared.config_source).as_mut() {
            s.refused = Some(ztnet_proto::status::RefusedReload { at, error });
        }
    }

    /// Problems found in the configuration in force (overlapping allowed IPs, ...).
    pub fn warnings(&self) -> Vec<String> {
        lock(&self.shared.warnings).clone()
    }

    /// Stops the threads and removes the interface and sockets.
    pub fn shutdown(self) {}
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stop_event.signal();
        // The paths go first: a successor for the same interface waits for them to go.
        for p in lock(&self.shared.api_paths).drain(..) {
            p.remove();
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        tracing::info!(interface = %self.shared.iface.name, "data plane stopped");
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn status(&self) -> StatusReport {
        let config = lock(&self.config).clone();
        let snapshot = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let now = SystemTime::now();
        let mut peers: Vec<PeerStatus> = snapshot
            .into_iter()
            .map(|p| PeerStatus {
                name: p.config.name.clone(),
                identity: p.config.identity.clone(),
                public_key: p.config.public_key,
                endpoint: p.endpoint,
                allowed_ips: p.config.allowed_ips.clone(),
                last_handshake: p.since_handshake.and_then(|d| {
                    let at = now.checked_sub(d)?;
                    Some(at.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs())
                }),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                initiations_sent: p.initiations_sent,
                initiations_received: p.initiations_received,
                initiations_held: p.initiations_held,
                path_mtu: p.path_mtu,
                path_mtu_state: p.path_mtu_state,
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        StatusReport {
            interface: self.iface.name.clone(),
            node: config.node_name.clone(),
            mode: self.iface.mode.clone(),
            public_key: lock(&self.keys).1,
            listen_port: self.listen_port.load(Ordering::Relaxed),
            addresses: config.addresses.clone(),
            netmap_version: config.version,
            control_connected: match self.control.load(Ordering::Relaxed) {
                0 => None,
                v => Some(v == 2),
            },
            peers,
            drops: self.counters.snapshot(),
            warnings: {
                let mut w = lock(&self.warnings).clone();
                w.extend(
                    self.table
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .mismatch_warnings(),
                );
                w
            },
            config_source: lock(&self.config_source).clone(),
            socket_drops: self.conns.with_fds(|fds| {
                let mut all = vec![self.socket.as_raw_fd()];
                all.extend_from_slice(fds);
                sys::socket_drops(&all)
            }),
        }
    }
}

/// The shell's outputs: datagrams to the UDP socket, packets to the TUN.
struct Io<'a> {
    socket: &'a UdpSocket,
    conns: &'a conns::Conns,
    /// The connected socket last used, see [`conns::SendCache`].
    cache: conns::SendCache,
    /// The port the socket is bound to (see `Shared::listen_port`).
    listen_port: &'a AtomicU16,
    socket_v6: bool,
    tun: &'a File,
    vnet: bool,
    counters: &'a Counters,
}

impl<'a> Io<'a> {
    fn new(s: &'a Shared) -> Io<'a> {
        Io {
            counters: &s.counters,
            socket: &s.socket,
            conns: &s.conns,
            cache: conns::SendCache::default(),
            listen_port: &s.listen_port,
            socket_v6: s.socket_v6,
            tun: &s.tun,
            vnet: s.vnet,
        }
    }

    /// Writes one packet to the TUN after its virtio-net header `hdr` (left out when the TUN
    /// has none).
    fn write_tun_with(&self, hdr: &[u8], packet: &[u8]) {
        let mut tun = self.tun;
        let written = if self.vnet {
            tun.write_vectored(&[IoSlice::new(hdr), IoSlice::new(packet)])
        } else {
            tun.write(packet)
        };
        if let Err(e) = written {
            self.tun_write_failed(&e);
        }
    }

    /// Counts a packet the TUN refused.
    #[cold]
    #[inline(never)]
    fn tun_write_failed(&self, e: &io::Error) {
        tracing::trace!(error = %e, "TUN write failed");
        self.counters
            .drop_packet(counters::DropReason::TunWriteFailed);
    }

    /// Counts a datagram the socket refused.
    #[cold]
    #[inline(never)]
    fn send_failed(&self, to: SocketAddr, e: &io::Error) {
        tracing::trace!(%to, error = %e, "send failed");
        self.counters.drop_packet(counters::DropReason::SendFailed);
    }

    /// An IPv4 destination as the dual-stack socket wants it (IPv4-mapped IPv6).
    fn map(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(a) if self.socket_v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => other,
        }
    }
}

impl Io<'_> {
    /// Sends through the peer's connected socket when there is one for `to` and `from`.
    /// Returns false when the datagram is still to be sent from the main socket: no such
    /// socket, or its source address was refused (gone from the host).
    fn send_connected(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) -> bool {
        let Some(conn) = self.cache.lookup(self.conns, to, from) else {
            return false;
        };
        match conn.send(datagram) {
            Ok(_) => true,
            Err(e) if source::source_refused(&e) => false,
            Err(e) => {
                self.send_failed(to, &e);
                true
            }
        }
    }

    /// Sends from the main socket, with the kernel's choice of source.
    fn send_unconnected(&mut self, to: SocketAddr, datagram: &[u8]) {
        let to = self.map(to);
        if let Err(e) = self.socket.send_to(datagram, to) {
            self.send_failed(to, &e);
        }
    }
}

impl Transmit for Io<'_> {
    fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]) {
        if !self.send_connected(to, None, datagram) {
            self.send_unconnected(to, datagram);
        }
    }

    fn write_tun(&mut self, packet: &[u8]) {
        self.write_tun_with(&offload::VnetHdr::default().encode(), packet);
    }

    fn send_udp_from(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        let from = same_family(to, from);
        if self.send_connected(to, from, datagram) {
            return;
        }
        let Some(src) = from else {
            return self.send_unconnected(to, datagram);
        };
        let addr = socket2::SockAddr::from(self.map(to));
        let fd = self.socket.as_raw_fd();
        match source::send_from(fd, &addr, src, self.socket_v6, datagram, None) {
            Ok(_) => {}
            // The address is gone from the host: not too sticky, the kernel picks one.
            Err(e) if source::source_refused(&e) => self.send_unconnected(to, datagram),
            Err(e) => self.send_failed(to, &e),
        }
    }

    fn send_udp_fragmenting(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        if let SocketAddr::V6(v6) = to {
            let port = self.listen_port.load(Ordering::Relaxed);
            match fragment::send(v6, from, port, datagram) {
                Ok(()) => return,
                Err(e) => tracing::trace!(%to, error = %e, "fragmented send failed"),
            }
        }
        self.send_udp_from(to, from, datagram);
    }
}

/// The UDP thread's output: decrypted packets wait in a [`offload::Coalescer`] until the end
/// of the batch (or until something that cannot join arrives), so that consecutive TCP
/// segments of a flow reach the TUN in one write. Without offloads they go out one by one.
///
/// With a second TUN queue, packets other than TCP are written through it, so that the
/// kernel steers their replies (an echo reply, a DNS answer) back to that queue, which this
/// thread also waits on and reads after every received batch (an echo reply the kernel made
/// during the write is there already): a reply leaves without waking the TUN thread. TCP
/// goes through the first queue: a bulk sender's segments, steered to the queue its ACKs
/// were written through, stay with the TUN thread and are encrypted beside the receive path,
/// not on it.
struct RxOut<'a> {
    io: Io<'a>,
    coalescer: offload::Coalescer,
    /// The second TUN queue.
    reply: Option<&'a File>,
    wrote: Wrote,
}

impl RxOut<'_> {
    fn flush(&mut self) {
        let (io, reply, wrote) = (&self.io, self.reply, &mut self.wrote);
        self.coalescer
            .flush(&mut |hdr: &[u8], p: &[u8]| write_rx(io, reply, wrote, hdr, p));
    }

    fn take_wrote_first(&mut self) -> bool {
        std::mem::take(&mut self.wrote.first)
    }
}

/// What [`write_rx`] wrote since the flags were last taken (see [`RxOut`]).
#[derive(Default)]
struct Wrote {
    /// Something went through the first queue.
    first: bool,
}

/// Writes one received packet to the queue [`RxOut`] picks for it.
fn write_rx(io: &Io<'_>, reply: Option<&File>, wrote: &mut Wrote, hdr: &[u8], packet: &[u8]) {
    match reply {
        Some(queue) if !offload::carries_tcp(packet) => {
            let mut q = queue;
            let written = if io.vnet {
                q.write_vectored(&[IoSlice::new(hdr), IoSlice::new(packet)])
            } else {
                q.write(packet)
            };
            if let Err(e) = written {
                io.tun_write_failed(&e);
            }
        }
        _ => {
            wrote.first = true;
            io.write_tun_with(hdr, packet);
        }
    }
}

impl Transmit for RxOut<'_> {
    fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.io.send_udp(to, datagram);
    }

    fn write_tun(&mut self, packet: &[u8]) {
        let (io, reply, wrote) = (&self.io, self.reply, &mut self.wrote);
        if !io.vnet {
            write_rx(io, reply, wrote, &[], packet);
            return;
        }
        self.coalescer.push(packet, &mut |hdr: &[u8], p: &[u8]| {
            write_rx(io, reply, wrote, hdr, p)
        });
    }

    fn send_udp_from(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        self.io.send_udp_from(to, from, datagram);
    }

    fn send_udp_fragmenting(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        self.io.send_udp_fragmenting(to, from, datagram);
    }
}

/// `from` when it can be the source of a datagram to `to` (the same address family).
fn same_family(to: SocketAddr, from: Option<IpAddr>) -> Option<IpAddr> {
    from.filter(|f| f.is_ipv4() == to.is_ipv4())
}

fn tun_loop(s: &Shared) {
    let mut reader = TunReader::new(s, &s.tun);
    let mut slept = false;
    while !s.stopping() {
        let drained = {
            let _turn = lock(&s.tun_turn);
            let one = slept && reader.sparse;
            reader.drain(s, usize::MAX, one)
        };
        match drained {
            Ok(_) => {
                let waiting = Instant::now();
                if let Err(e) = sys::wait_readable([s.tun.as_raw_fd(), s.stop_event.fd()]) {
                    tracing::error!(error = %e, "TUN poll failed; data plane stops");
                    return;
                }
                slept = waiting.elapsed() >= SLEPT;
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EBADFD) {
                    tracing::info!(interface = %s.iface.name, "TUN interface deleted");
                } else {
                    tracing::error!(interface = %s.iface.name, error = %e, "TUN lost");
                }
                s.tun_lost.store(true, Ordering::Relaxed);
                s.tun_lost_notify.notify_waiters();
                return;
            }
        }
    }
}

/// Reads packets from one TUN queue, hands them to the table, and sends what comes out in
/// bursts. Whoever holds `Shared::tun_turn` reads the first queue, so packets leave in the
/// order they were read; only the UDP thread reads the second.
struct TunReader<'a> {
    queue: &'a File,
    packet: Vec<u8>,
    /// One segment of a super-packet being split.
    scratch: Vec<u8>,
    buf: Vec<u8>,
    out: Batched<'a>,
    /// The last drain took one packet at most: the traffic is request and reply, not a burst,
    /// so the next drain sends its first packet at once rather than after the read that finds
    /// the queue empty.
    sparse: bool,
    /// Packets the last drain read, also when it then ended on an error.
    handled: usize,
}

impl<'a> TunReader<'a> {
    fn new(s: &'a Shared, queue: &'a File) -> TunReader<'a> {
        TunReader {
            queue,
            sparse: true,
            handled: 0,
            packet: vec![0u8; offload::VNET_HDR_LEN + 65_535],
            scratch: Vec::with_capacity(65_535),
            buf: vec![0u8; peers::MIN_BUFFER],
            out: Batched {
                io: Io::new(s),
                batch: Vec::with_capacity(GSO_MAX_BYTES),
                to: None,
                from: None,
                segment: 0,
                count: 0,
                closed: false,
                gso: true,
                direct: false,
            },
        }
    }

    /// Handles up to `limit` packets, until the TUN queue is empty; sends everything before it
    /// returns. Returns whether the queue ran empty. With `one` (the thread slept until this
    /// packet came, and the last drain found one at most) it stops after the first packet
    /// rather than read again to learn that the queue is empty: it says so, and the caller's
    /// level-triggered wait returns at once if more came. An error is fatal for the TUN.
    fn drain(&mut self, s: &Shared, limit: usize, one: bool) -> io::Result<bool> {
        let mut tun = self.queue;
        let mut burst = 0;
        let mut handled = 0;
        let result = loop {
            if handled >= limit {
                break Ok(false);
            }
            match tun.read(&mut self.packet) {
                Ok(n) => {
                    let table = s.table.read().unwrap_or_else(|p| p.into_inner());
                    let now = Instant::now();
                    let (buf, out) = (&mut self.buf, &mut self.out);
                    if s.vnet {
                        let hdr = offload::VnetHdr::parse(&self.packet[..n]);
                        out.direct = one && hdr.as_ref().is_some_and(|h| !h.is_gso());
                        let split = hdr.ok_or(offload::SplitError::Truncated);
                        let packet = &mut self.packet[offload::VNET_HDR_LEN.min(n)..n];
                        let split = split.and_then(|hdr| {
                            offload::split(&hdr, packet, &mut self.scratch, |p| {
                                table.handle_tun_packet(p, now, buf, out)
                            })
                        });
                        match split {
                            Ok(segments) => burst += segments,
                            Err(e) => {
                                tracing::trace!(error = %e, "TUN packet dropped");
                                s.counters
                                    .drop_packet(counters::DropReason::MalformedPacket);
                            }
                        }
                    } else {
                        out.direct = one;
                        table.handle_tun_packet(&self.packet[..n], now, buf, out);
                        burst += 1;
                    }
                    drop(table);
                    handled += 1;
                    if one {
                        break Ok(true);
                    }
                    if burst >= GSO_MAX_SEGMENTS || (handled == 1 && self.sparse) {
                        self.out.flush();
                        burst = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.out.flush();
        self.sparse = handled <= 1;
        self.handled = handled;
        result
    }
}

/// A wait that lasted this long slept: the traffic is sparse, and the packet that ended it is
/// likely alone (see [`TunReader::drain`]). A wait that finds work already there returns in
/// a few microseconds; one that sleeps takes two context switches at least.
const SLEPT: Duration = Duration::from_micros(50);

/// Packets the UDP thread takes from the TUN right after writing to it: a reply the kernel
/// made at once (a ping's echo reply, a TCP ACK) leaves without waking the TUN thread.
const TUN_ASSIST: usize = 8;

/// Most datagrams sent in one GSO call (the kernel allows 64).
const GSO_MAX_SEGMENTS: usize = 64;

/// Most bytes in one GSO call (one UDP payload at most).
const GSO_MAX_BYTES: usize = 65_000;

/// The TUN thread's output: datagrams of one burst that go to the same endpoint with the same
/// size are sent in one system call with UDP segmentation offload.
struct Batched<'a> {
    io: Io<'a>,
    batch: Vec<u8>,
    to: Option<SocketAddr>,
    /// The local address the batch leaves from (see `source`).
    from: Option<IpAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the batch; the next one starts a new batch.
    closed: bool,
    /// Cleared when the kernel refuses UDP_SEGMENT; then every datagram goes alone.
    gso: bool,
    /// The packet being handled is alone (sparse traffic, not a super-packet): its datagram
    /// goes out at once, without a copy into the batch.
    direct: bool,
}

impl Batched<'_> {
    fn flush(&mut self) {
        let Some(to) = self.to.take() else {
            return;
        };
        let from = self.from.take();
        if self.count == 1 || !self.gso {
            for d in self.batch.chunks(self.segment.max(1)) {
                self.io.send_udp_from(to, from, d);
            }
        } else {
            let addr = socket2::SockAddr::from(self.io.map(to));
            let seg = u16::try_from(self.segment).unwrap_or(u16::MAX);
            let fd = self.io.socket.as_raw_fd();
            let v6 = self.io.socket_v6;
            let connected = match self.io.cache.lookup(self.io.conns, to, from) {
                Some(conn) => match conn.send_segments(&self.batch, seg) {
                    Err(e) if source::source_refused(&e) => None,
                    sent => Some(sent),
                },
                None => None,
            };
            let sent = match (connected, from) {
                (Some(sent), _) => sent,
                (None, Some(src)) => source::send_from(fd, &addr, src, v6, &self.batch, Some(seg))
                    .or_else(|e| {
                        if source::source_refused(&e) {
                            sys::send_segments(fd, Some(&addr), &self.batch, seg)
                        } else {
                            Err(e)
                        }
                    }),
                (None, None) => sys::send_segments(fd, Some(&addr), &self.batch, seg),
            };
            if let Err(e) = sent {
                if matches!(e.raw_os_error(), Some(libc::EIO | libc::ENOPROTOOPT)) {
                    tracing::debug!(error = %e, "no UDP segmentation offload; sending singly");
                    self.gso = false;
                    for d in self.batch.chunks(self.segment.max(1)) {
                        self.io.send_udp_from(to, from, d);
                    }
                } else if matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::EINVAL)) {
                    // Segments larger than the MTU the kernel knows for this destination (a
                    // raised TUN MTU, or a narrower local link: EINVAL when a segment exceeds
                    // the fragment size): the kernel fragments single datagrams but not a GSO
                    // batch. Only this batch goes singly; other peers keep GSO.
                    for d in self.batch.chunks(self.segment.max(1)) {
                        self.io.send_udp_from(to, from, d);
                    }
                } else {
                    // The whole batch is lost: one count per datagram in it.
                    for _ in self.batch.chunks(self.segment.max(1)) {
                        self.io.send_failed(to, &e);
                    }
                }
            }
        }
        self.batch.clear();
        self.count = 0;
        self.closed = false;
    }
}

impl Transmit for Batched<'_> {
    fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.send_udp_from(to, None, datagram);
    }

    fn send_udp_from(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        if self.direct && self.to.is_none() {
            // Nothing waits in the batch, so nothing is passed.
            return self.io.send_udp_from(to, from, datagram);
        }
        let from = same_family(to, from);
        let fits = self.to == Some(to)
            && self.from == from
            && !self.closed
            && datagram.len() <= self.segment
            && self.batch.len() + datagram.len() <= GSO_MAX_BYTES
            && self.count < GSO_MAX_SEGMENTS;
        if !fits {
            self.flush();
            self.to = Some(to);
            self.from = from;
            self.segment = datagram.len();
        }
        self.batch.extend_from_slice(datagram);
        self.count += 1;
        if datagram.len() < self.segment {
            self.closed = true;
        }
    }

    fn write_tun(&mut self, packet: &[u8]) {
        self.io.write_tun(packet);
    }

    fn send_udp_fragmenting(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        self.flush();
        self.io.send_udp_fragmenting(to, from, datagram);
    }
}

/// Tokens of the UDP thread's own descriptors in its `epoll` set; the connected sockets
/// have theirs from [`conns::FIRST_ID`] on.
const MAIN_SOCKET: u64 = 0;
const REPLY_QUEUE: u64 = 1;
const STOP: u64 = 2;
const WAKE: u64 = 3;

/// Receives datagrams, from the main socket and from every connected socket (see `conns`),
/// and hands them to the table. With a second TUN queue (see [`RxOut`]) the thread also
/// reads that queue: it waits in `epoll` for any of them and receives without waiting. Each
/// ready socket gets one batch in turn; after a wait that slept, one datagram (see
/// [`SLEPT`]).
fn udp_loop(s: &Shared) {
    let mut rx = Receiver {
        // Room for the largest datagram: the MTU may be raised at run time (`ip link set
        // mtu`), and a peer's MTU may be larger than ours.
        batch: sys::RecvBatch::new(RECV_BATCH, MAX_DATAGRAM),
        buf: vec![0u8; peers::MIN_BUFFER],
        out: RxOut {
            io: Io::new(s),
            coalescer: offload::Coalescer::new(),
            reply: s.tun_reply.as_ref(),
            wrote: Wrote::default(),
        },
        assist: TunReader::new(s, &s.tun),
        received: false,
    };
    let fd = s.socket.as_raw_fd();
    let mut replies = s.tun_reply.as_ref().map(|q| TunReader::new(s, q));
    let epoll = s.conns.epoll();
    let mut own = vec![(fd, MAIN_SOCKET), (s.stop_event.fd(), STOP)];
    if let Some(q) = &s.tun_reply {
        own.push((q.as_raw_fd(), REPLY_QUEUE));
    }
    // Only plain WireGuard mode replaces the socket; elsewhere the wake event is left out.
    if s.plain.is_some() {
        own.push((s.udp_wake.fd(), WAKE));
    }
    for (f, token) in own {
        if let Err(e) = epoll.add(f, token) {
            tracing::error!(error = %e, "cannot watch the UDP socket; data plane stops");
            return;
        }
    }
    // What the last wait said (the main socket and the queue assumed ready at the start).
    let (mut socket_ready, mut queue_ready) = (true, true);
    // Reads of the second queue that failed in a row (see below).
    let mut queue_failures = 0u32;
    let mut ready: Vec<Arc<conns::Conn>> = Vec::new();
    let mut tokens = Vec::new();
    // The last wait slept (see [`SLEPT`]): the traffic is sparse, so each socket is asked for
    // one datagram, and the second queue for one packet, without looking for more; the next
    // wait (level-triggered) returns at once if there is more.
    let mut slept = false;
    while !s.stopping() {
        if socket_ready {
            socket_ready = rx.receive(s, fd, slept);
        }
        ready.retain(|conn| rx.receive(s, conn.fd(), slept));
        // After any datagram the queue is read, not left to the wait alone: the answer to a
        // packet just written through it (an echo reply) waits there already, and with only
        // the wait, CI twice saw a flow that the kernel had put on this queue go unread for 30 s
        // (a UDP stream whose first datagram passed; cause not found), which reading after
        // each receive, as before session 7, never showed. It costs one read that finds the
        // queue empty per received batch.
        queue_ready |= std::mem::take(&mut rx.received);
        match replies.as_mut() {
            Some(reader) if queue_ready => {
                match reader.drain(s, REPLY_BURST, slept && reader.sparse) {
                    Ok(empty) => {
                        queue_ready = !empty;
                        queue_failures = 0;
                    }
                    Err(e)
                        if e.raw_os_error() != Some(libc::EBADFD)
                            && (reader.handled > 0 || queue_failures < QUEUE_FAILURES) =>
                    {
                        // One packet that could not be read is a counted drop, not the end
                        // of the queue: the kernel keeps putting flows on it, and a queue no
                        // thread reads drops them where no counter of the node sees it. The
                        // wait (level-triggered) reports the queue again if it holds more.
                        // Only failures with no packet read in between count towards giving
                        // the queue up.
                        if reader.handled > 0 {
                            queue_failures = 0;
                        }
                        queue_failures += 1;
                        tracing::debug!(error = %e, "read from the second TUN queue failed");
                        s.counters.drop_packet(counters::DropReason::TunReadFailed);
                        queue_ready = false;
                    }
                    Err(e) => {
                        // The TUN thread reports a lost interface; this thread stops reading
                        // the queue and waits on the sockets alone. Reads that keep failing
                        // are loud: from here on, flows the kernel puts on this queue go
                        // nowhere.
                        if e.raw_os_error() == Some(libc::EBADFD) {
                            tracing::debug!(error = %e, "second TUN queue lost");
                        } else {
                            s.counters.drop_packet(counters::DropReason::TunReadFailed);
                            tracing::warn!(
                                interface = %s.iface.name, error = %e, failures = queue_failures,
                                "second TUN queue keeps failing; it is no longer read"
                            );
                        }
                        if let Some(q) = &s.tun_reply {
                            let _ = epoll.delete(q.as_raw_fd());
                        }
                        replies = None;
                        rx.out.reply = None;
                        queue_ready = false;
                    }
                }
            }
            Some(_) => {}
            None => queue_ready = false,
        }
        let busy = socket_ready || queue_ready || !ready.is_empty();
        // Busy, the thread looks without waiting for sockets that became ready meanwhile:
        // a flood on the main socket (or one peer's bulk) must not keep the other sockets
        // from their turn. Idle, it sleeps until something comes.
        let waited = if busy {
            slept = false;
            epoll.ready_now(&mut tokens)
        } else {
            let waiting = Instant::now();
            let waited = epoll.wait(&mut tokens);
            slept = waiting.elapsed() >= SLEPT;
            waited
        };
        if let Err(e) = waited {
            tracing::error!(error = %e, "UDP wait failed; data plane stops");
            return;
        }
        for &token in &tokens {
            match token {
                MAIN_SOCKET => socket_ready = true,
                REPLY_QUEUE => queue_ready = replies.is_some(),
                STOP => {}
                WAKE => {
                    // The socket was replaced under the same descriptor: the set lost the
                    // old one with its file; watch the new one.
                    s.udp_wake.clear();
                    if let Err(e) = epoll.add(fd, MAIN_SOCKET) {
                        tracing::error!(error = %e, "cannot watch the new UDP socket");
                    }
                    socket_ready = true;
                }
                id if ready.iter().any(|c| c.id() == id) => {}
                id => ready.extend(s.conns.by_id(id)),
            }
        }
    }
}

/// The UDP thread's receive side: one batch from a socket at a time.
struct Receiver<'a> {
    batch: sys::RecvBatch,
    buf: Vec<u8>,
    out: RxOut<'a>,
    /// Reads the first TUN queue after a write to it (see [`TUN_ASSIST`]).
    assist: TunReader<'a>,
    /// A datagram came since the flag was last taken.
    received: bool,
}

impl Receiver<'_> {
    /// Receives one batch from `fd` without waiting and handles it; with `one`, a single
    /// datagram. Returns whether the socket may hold more (the batch was full, or it was
    /// interrupted); after a single datagram it says no, and leaves it to the wait.
    fn receive(&mut self, s: &Shared, fd: RawFd, one: bool) -> bool {
        let n = match self.batch.recv_now(fd, if one { 1 } else { RECV_BATCH }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            // ICMP errors from earlier sends surface here on Linux; they are not fatal, and
            // the datagrams behind them are still to be read.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                // Not busy: a persistent error waits for the next wake-up.
                tracing::debug!(error = %e, "UDP receive failed");
                return false;
            }
        };
        self.received |= n > 0;
        let table = s.table.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for i in 0..n {
            match self.batch.get(i) {
                Some((from, d)) => {
                    let local = self.batch.local(i);
                    table.handle_datagram_at(from, local, d, now, &mut self.buf, &mut self.out)
                }
                None => s
                    .counters
                    .drop_packet(counters::DropReason::MalformedDatagram),
            }
        }
        drop(table);
        self.out.flush();
        if self.out.take_wrote_first()
            && let Ok(_turn) = s.tun_turn.try_lock()
        {
            // A lost interface is left for the TUN thread to report; a failed read took its
            // packet with it, and is counted.
            if let Err(e) = self.assist.drain(s, TUN_ASSIST, false)
                && e.raw_os_error() != Some(libc::EBADFD)
            {
                tracing::debug!(error = %e, "read from the first TUN queue failed");
                s.counters.drop_packet(counters::DropReason::TunReadFailed);
            }
        }
        // A short batch emptied the socket; the next wait says when more came.
        !one && n == RECV_BATCH
    }
}

/// Most packets the UDP thread takes from the second TUN queue before it looks at the socket
/// again (one GSO batch).
const REPLY_BURST: usize = GSO_MAX_SEGMENTS;

/// Reads of the second TUN queue that may fail in a row with no packet read in between, each
/// a counted drop, before the UDP thread gives the queue up (a queue that is ready but cannot
/// be read would keep the thread spinning).
const QUEUE_FAILURES: u32 = 64;

/// Most datagrams taken from the socket in one `recvmmsg` call.
const RECV_BATCH: usize = 32;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Puts the node's routes back when its interface comes up again. The kernel drops a link's
/// IPv4 routes when it goes down (`ip link set down`, a tool that bounces interfaces), and
/// nothing else would add them until the next configuration. Also tells the connected
/// sockets when a local address goes away. Sleeps on a netlink socket that hears link and
/// address changes; costs nothing while they stay as they are.
fn link_loop(s: &Shared) {
    let events = match sys::LinkEvents::open() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "no link events; routes lost on link down come back at the next reload only");
            return;
        }
    };
    let Some(index) = sys::interface_index(&s.iface.name) else {
        return;
    };
    let mut up = true;
    let mut buf = vec![0u8; 32 << 10];
    while !s.stopping() {
        if let Err(e) = sys::wait_readable([events.fd(), s.stop_event.fd()]) {
            tracing::warn!(error = %e, "link events lost");
            return;
        }
        let mut came_up = false;
        loop {
            match events.read(&mut buf) {
                Ok(None) => break,
                Ok(Some(found)) => {
                    for event in found {
                        match event {
                            sys::NetEvent::Link { index: i, flags } if i == index => {
                                let now_up = flags & libc::IFF_UP as u32 != 0;
                                came_up |= now_up && !up;
                                up = now_up;
                            }
                            sys::NetEvent::Link { .. } => {}
                            // A socket bound to it would go on sending from it (IPv6 does
                            // not check a bound source again), into a black hole.
                            sys::NetEvent::AddressGone(ip) => s.conns.address_gone(ip),
                        }
                    }
                }
                Err(e) => {
                    // Messages were lost (the kernel's queue overflowed): whatever happened,
                    // putting back missing routes is safe.
                    tracing::debug!(error = %e, "link events overflowed");
                    came_up = true;
                    // An address may have gone among the lost messages.
                    s.conns.clear();
                    break;
                }
            }
        }
        if came_up && !s.stopping() {
            tracing::info!(interface = %s.iface.name, "interface up again; restoring its routes");
            s.restore_routes();
        }
    }
}

fn timer_loop(s: &Shared) {
    let mut buf = vec![0u8; peers::MIN_BUFFER];
    let mut io = Io::new(s);
    let mut next = Instant::now();
    let mut wanted = Vec::new();
    while !s.stopping() {
        let events = {
            let table = s.table.read().unwrap_or_else(|p| p.into_inner());
            let events = table.handle_timers(Instant::now(), &mut buf, &mut io);
            table.connected_endpoints(&mut wanted);
            events
        };
        let port = s.listen_port.load(Ordering::Relaxed);
        s.conns
            .reconcile(&wanted, port, s.socket_v6, Instant::now());
        for e in events {
            match e {
                SessionEvent::SessionUp { peer } => {
                    tracing::info!(interface = %s.iface.name, %peer, "peer session up")
                }
                SessionEvent::SessionDown { peer } => {
                    tracing::info!(interface = %s.iface.name, %peer, "peer session down")
                }
            }
        }
        next += TIMER_TICK;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// Waits until no interface of this name exists in this network namespace and no daemon
/// answers on its local API sockets (those are host-wide, so a node in another namespace
/// counts), for at most [`api::TAKEOVER_WAIT`]: a predecessor may still be stopping. Refuses
/// after that, before anything is made: opening the name again would attach this node to the
/// other's multi-queue TUN as one more queue, or share its sockets.
fn claim_name(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + api::TAKEOVER_WAIT;
    loop {
        let answering = [api::status_path(name), api::wireguard_path(name)]
            .into_iter()
            .find(|p| std::os::unix::net::UnixStream::connect(p).is_ok());
        let exists = sys::interface_exists(name);
        if !exists && answering.is_none() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if let Some(path) = answering {
                anyhow::bail!(
                    "another ztnet-node serves interface {name} ({} answers; it may run in \
                     another network namespace: socket paths are host-wide); stop it or use \
                     another interface name",
                    path.display()
                );
            }
            anyhow::bail!(
                "interface {name} already exists; ztnet-node makes its own (delete it with `ip \
                 link del {name}` or use another name)"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The TUN as [`open_tun`] made it.
struct OpenedTun {
    /// The first queue, read by the TUN thread.
    tun: File,
    /// The second queue, read by the UDP thread; `None` when the kernel gave only one, or
    /// `ZTNET_TUN_QUEUES=1` is set.
    reply: Option<File>,
    /// The name the kernel gave the interface.
    name: String,
    /// Whether packets carry a virtio-net header.
    vnet: bool,
}

/// Opens the TUN with two queues when the kernel allows (`IFF_MULTI_QUEUE`), else one. The
/// kernel steers a packet it sends into the TUN to the queue that last wrote a packet of the
/// same flow (its symmetric flow hash), so the reply to a packet the UDP thread wrote through
/// the second queue comes back on that queue, to the thread that is already awake.
fn open_tun(name: &str) -> anyhow::Result<OpenedTun> {
    let multi = !std::env::var("ZTNET_TUN_QUEUES").is_ok_and(|v| v == "1");
    let (tun, name, vnet) = match open_first_queue(name, multi) {
        Ok(t) => t,
        Err(e) if multi => {
            tracing::info!(interface = name, error = %e, "no multi-queue TUN; one queue");
            open_first_queue(name, false)?
        }
        Err(e) => return Err(e),
    };
    let reply = if multi {
        match sys::open_tun(&name, vnet, true) {
            Ok((q, _)) => Some(q),
            Err(e) => {
                tracing::info!(interface = %name, error = %e, "no second TUN queue; one queue");
                None
            }
        }
    } else {
        None
    };
    Ok(OpenedTun {
        tun,
        reply,
        name,
        vnet,
    })
}

/// Opens the TUN's first queue with a virtio-net header and as many offloads as the kernel
/// grants, or plainly when it refuses the header or `ZTNET_TUN_OFFLOAD=off` is set. Returns
/// the device, its name and whether packets carry the header.
fn open_first_queue(name: &str, multi: bool) -> anyhow::Result<(File, String, bool)> {
    use sys::tun_f::{CSUM, TSO4, TSO6, USO4, USO6};
    if std::env::var("ZTNET_TUN_OFFLOAD").is_ok_and(|v| v == "off") {
        tracing::info!(interface = name, "TUN offloads off (ZTNET_TUN_OFFLOAD=off)");
        let (tun, name) = sys::open_tun(name, false, multi)?;
        return Ok((tun, name, false));
    }
    let (tun, actual) = match sys::open_tun(name, true, multi) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(interface = name, error = %e, "TUN refuses IFF_VNET_HDR; no offloads");
            let (tun, name) = sys::open_tun(name, false, multi)?;
            return Ok((tun, name, false));
        }
    };
    let choices = [
        (CSUM | TSO4 | TSO6 | USO4 | USO6, "csum tso4 tso6 uso4 uso6"),
        (CSUM | TSO4 | TSO6, "csum tso4 tso6"),
        (CSUM, "csum"),
        (0, "none"),
    ];
    for (flags, names) in choices {
        match sys::set_tun_offload(tun.as_raw_fd(), flags) {
            Ok(()) => {
                tracing::info!(interface = %actual, offloads = names, "TUN offloads enabled");
                return Ok((tun, actual, true));
            }
            Err(e) => tracing::debug!(interface = %actual, offloads = names, error = %e,
                "TUN offloads refused"),
        }
    }
    // Even "none" refused: the header stays, every packet simply arrives whole.
    tracing::info!(interface = %actual, "TUN offloads refused; header kept, none enabled");
    Ok((tun, actual, true))
}

/// Binds the UDP socket: IPv6 dual-stack when the host has IPv6, IPv4 otherwise.
fn bind_udp(port: u16) -> anyhow::Result<(UdpSocket, bool)> {
    bind_udp_family(port, None)
}

/// Like [`bind_udp`]; `family` Some(true) insists on IPv6, Some(false) on IPv4 (a rebind keeps
/// the family the threads were started with).
fn bind_udp_family(port: u16, family: Option<bool>) -> anyhow::Result<(UdpSocket, bool)> {
    let v6 = match family {
        Some(false) => Err(io::Error::other("IPv4 asked for")),
        _ => Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
            Ok(s)
        }),
    };
    let (socket, is_v6) = match v6 {
        Ok(s) => (s, true),
        Err(e) if family == Some(true) => {
            return Err(e).with_context(|| format!("cannot bind UDP port {port}"));
        }
        Err(e) => {
            tracing::debug!(error = %e, "no IPv6 socket; using IPv4 only");
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                .context("cannot create UDP socket")?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .with_context(|| format!("cannot bind UDP port {port}"))?;
            (s, false)
        }
    };
    if sys::force_buffers(socket.as_raw_fd(), SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        tracing::warn!("cannot force UDP socket buffers (not root?); packets may be lost");
    }
    if let Err(e) = sys::allow_fragments(socket.as_raw_fd(), is_v6) {
        tracing::warn!(error = %e, "cannot clear don't-fragment; narrow paths may drop packets");
    }
    if let Err(e) = source::enable_pktinfo(socket.as_raw_fd(), is_v6) {
        tracing::warn!(error = %e, "no IP_PKTINFO; replies leave from the kernel's choice");
    }
    Ok((socket.into(), is_v6))
}

/// Refuses configurations the table cannot represent.
fn validate(config: &DataplaneConfig) -> anyhow::Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for p in &config.peers {
        if !names.insert(p.name.as_str()) {
            anyhow::bail!("peer name {} appears twice", p.name);
        }
    }
    Ok(())
}
