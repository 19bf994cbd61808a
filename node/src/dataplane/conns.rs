//! Connected UDP sockets, one per peer with a session: the fast send path.
//!
//! Linux looks up the route of every datagram sent from an unconnected socket; for the
//! node's dual-stack socket sending to an IPv4-mapped address with its source in
//! `IPV6_PKTINFO`, that is the longest path the kernel has. A socket connected to the peer's
//! endpoint keeps its route cached. Measured here, a 128-byte datagram between two network
//! namespaces, one send every 20 ms so that caches are as cold as for a ping: 65 µs median
//! from the dual-stack socket with a source, 51 µs from a connected IPv4 socket (`bench/`
//! keeps the ping comparison that this is for).
//!
//! How it fits:
//! - The main socket is bound first without `SO_REUSEPORT`, so that a second daemon on the
//!   port is refused as before, and gets the option afterwards. That lets the node bind more
//!   sockets to its own port.
//! - Each [`Conn`] is bound to the local address the peer reaches the node at (its sticky
//!   source) and the listen port, and connected to the peer's endpoint. The kernel then
//!   delivers that endpoint's datagrams to it rather than to the main socket, so the UDP
//!   thread waits on all of them in one `epoll` set ([`Conns::epoll`]). A datagram is handled
//!   the same whichever socket it came in on: its source address is read from the message.
//! - The timer thread makes the set follow the peer table ([`Conns::reconcile`]) on every
//!   tick: a peer with a session and an endpoint gets a socket; one whose endpoint, source,
//!   port or mark changed gets a new one. A socket no longer wanted retires for one tick
//!   before it closes, so that what is already queued on it is still read.
//! - Senders look a socket up by destination ([`SendCache`]); without one (no session yet,
//!   a cookie reply to a stranger, the socket not made yet) the main socket sends as before.
//!   Nothing in the packet path makes or closes a socket.
//!
//! `unsafe` is allowed for the same reason as in `sys`.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::{source, sys};

/// Whether per-peer sockets are wanted: on unless the environment says
/// `ZTNET_PEER_SOCKETS=0`. (They were off by default in sessions 6 to 8, while an end-to-end
/// stall was blamed on them; it came without them too, see docs/node.md.)
pub fn wanted_by_environment() -> bool {
    std::env::var_os("ZTNET_PEER_SOCKETS").is_none_or(|v| v != "0")
}

/// Most connected sockets at once; peers beyond it send from the main socket.
pub const MAX_CONNS: usize = 512;

/// Tokens below this are the UDP thread's own descriptors; a [`Conn`]'s id is its token.
pub const FIRST_ID: u64 = 16;

/// How long a socket that could not be made (its source address gone, no descriptors left)
/// is not tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One socket connected to a peer's endpoint.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    socket: UdpSocket,
    to: SocketAddr,
    /// The local address it is bound to (the peer's sticky source, or the kernel's choice
    /// for the endpoint when the peer has none yet).
    bound: IpAddr,
    /// The source the peer table asked for; `None` when the kernel chose `bound`.
    wanted: Option<IpAddr>,
    port: u16,
    mark: u32,
    /// A send was refused for its source address (gone from the host): senders pass it by,
    /// and the next reconcile replaces it.
    broken: AtomicBool,
}

impl Conn {
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Its token in the UDP thread's `epoll` set.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a datagram that should leave from `from` can go through this socket.
    fn serves(&self, from: Option<IpAddr>) -> bool {
        from.is_none_or(|f| f == self.bound) && !self.broken.load(Ordering::Relaxed)
    }

    /// Sends one datagram. A connected socket reports an earlier ICMP error (the peer's port
    /// was closed for a moment) on the next send, which is then lost: it goes again once.
    pub fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        let sent = match self.socket.send(datagram) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.socket.send(datagram),
            other => other,
        };
        self.check(sent, true)
    }

    /// Sends `data` as datagrams of `segment` bytes in one call (UDP GSO), like [`Conn::send`].
    pub fn send_segments(&self, data: &[u8], segment: u16) -> io::Result<usize> {
        let sent = match sys::send_segments(self.fd(), None, data, segment) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                sys::send_segments(self.fd(), None, data, segment)
            }
            other => other,
        };
        self.check(sent, false)
    }

    /// Marks the socket broken when its source address was refused. A GSO batch also gets
    /// EINVAL when its segments are larger than the path allows, which says nothing about the
    /// address: only a single datagram's EINVAL counts (`single`).
    fn check(&self, sent: io::Result<usize>, single: bool) -> io::Result<usize> {
        if let Err(e) = &sent
            && source::source_refused(e)
            && (single || e.raw_os_error() != Some(libc::EINVAL))
        {
            self.broken.store(true, Ordering::Relaxed);
        }
        sent
    }
}

/// What a peer wants a socket for: its endpoint and the source its replies leave from.
pub type Wanted = (SocketAddr, Option<IpAddr>);

#[derive(Default)]
struct Inner {
    by_to: HashMap<SocketAddr, Arc<Conn>>,
    /// Every open socket by id, the retiring ones too: the UDP thread reads them all.
    by_id: HashMap<u64, Arc<Conn>>,
    /// Replaced or no longer wanted; closed at the next reconcile.
    retiring: Vec<Arc<Conn>>,
    /// Sockets that could not be made, and when to try again.
    failed: HashMap<Wanted, Instant>,
}

/// The node's connected sockets and the UDP thread's `epoll` set.
pub struct Conns {
    epoll: sys::Epoll,
    inner: RwLock<Inner>,
    /// Bumped at every change, so that a [`SendCache`] knows to look again.
    generation: AtomicU64,
    /// Bumped by [`Conns::clear`]: a reconcile that began before it (with the old port) keeps
    /// none of the sockets it made.
    epoch: AtomicU64,
    next_id: AtomicU64,
    /// SO_MARK for new sockets (plain WireGuard mode's `fwmark`).
    mark: AtomicU32,
    /// Off when the main socket could not be shared (no SO_REUSEPORT).
    enabled: bool,
}

impl Conns {
    pub fn new(enabled: bool) -> io::Result<Conns> {
        Ok(Conns {
            epoll: sys::Epoll::new()?,
            inner: RwLock::new(Inner::default()),
            generation: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            next_id: AtomicU64::new(FIRST_ID),
            mark: AtomicU32::new(0),
            enabled,
        })
    }

    /// The UDP thread's wait set; the sockets made here are in it.
    pub fn epoll(&self) -> &sys::Epoll {
        &self.epoll
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The open socket with this id (a token from the `epoll` set).
    pub fn by_id(&self, id: u64) -> Option<Arc<Conn>> {
        self.read().by_id.get(&id).cloned()
    }

    /// The socket for `to`, if there is one.
    fn get(&self, to: SocketAddr) -> Option<Arc<Conn>> {
        self.read().by_to.get(&to).cloned()
    }

    /// Number of sockets open (retiring ones included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Runs `f` with the descriptors of every open socket (they stay open meanwhile).
    pub fn with_fds<R>(&self, f: impl FnOnce(&[RawFd]) -> R) -> R {
        let inner = self.read();
        let fds: Vec<RawFd> = inner.by_id.values().map(|c| c.fd()).collect();
        f(&fds)
    }

    /// Sets the mark new sockets get; the sockets open now are replaced at the next
    /// reconcile.
    pub fn set_mark(&self, mark: u32) {
        self.mark.store(mark, Ordering::Relaxed);
    }

    /// Marks the sockets bound to `ip` broken (the address went away): senders pass them by
    /// at once, and the next reconcile retires them.
    pub fn address_gone(&self, ip: IpAddr) {
        let inner = self.read();
        let mut any = false;
        for c in inner.by_to.values().filter(|c| c.bound == ip) {
            c.broken.store(true, Ordering::Relaxed);
            any = true;
        }
        if any {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Retires every socket (the listen port moved): senders use the main socket until the
    /// next reconcile makes new ones.
    pub fn clear(&self) {
        let mut inner = self.write();
        let old: Vec<Arc<Conn>> = inner.by_to.drain().map(|(_, c)| c).collect();
        inner.retiring.extend(old);
        inner.failed.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Makes the open sockets match `wanted` (at most [`MAX_CONNS`] of it) for the listen
    /// `port`: closes those retired at the last call, makes the missing ones, retires those
    /// no longer wanted. `ipv6` says whether the node's main socket takes IPv6.
    pub fn reconcile(&self, wanted: &[Wanted], port: u16, ipv6: bool, now: Instant) {
        if !self.enabled {
            return;
        }
        let mark = self.mark.load(Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Acquire);
        // One socket per endpoint: two peers that claim one endpoint (a stale roam, peers
        // behind one NAT mapping) share the first one's.
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<Wanted> = wanted
            .iter()
            .filter(|(to, _)| seen.insert(*to))
            .take(MAX_CONNS)
            .copied()
            .collect();
        let wanted = &unique[..];
        let current = |c: &Conn, local: Option<IpAddr>| {
            c.wanted == local
                && c.port == port
                && c.mark == mark
                && !c.broken.load(Ordering::Relaxed)
        };
        // The common case, nothing to do, under the read lock only.
        {
            let inner = self.read();
            let unchanged = inner.retiring.is_empty()
                && inner.by_to.len() == wanted.len()
                && wanted
                    .iter()
                    .all(|(to, local)| inner.by_to.get(to).is_some_and(|c| current(c, *local)));
            if unchanged {
                return;
            }
        }
        let keep: std::collections::HashSet<SocketAddr> = wanted.iter().map(|w| w.0).collect();
        // A socket goes when no peer wants its endpoint any more, or when it must not send:
        // with a stale port (the peer would see another port) or mark, or broken (its source
        // address is gone), whether or not a replacement can be made.
        let drops = |c: &Conn| {
            !keep.contains(&c.to)
                || c.port != port
                || c.mark != mark
                || c.broken.load(Ordering::Relaxed)
        };
        let (missing, dropping): (Vec<Wanted>, bool) = {
            let inner = self.read();
            let missing = wanted
                .iter()
                .filter(|(to, local)| !inner.by_to.get(to).is_some_and(|c| current(c, *local)))
                .filter(|w| inner.failed.get(*w).is_none_or(|&t| now >= t))
                .filter(|(to, _)| to.is_ipv4() || ipv6)
                .copied()
                .collect();
            let dropping = !inner.retiring.is_empty() || inner.by_to.values().any(|c| drops(c));
            (missing, dropping)
        };
        // Waiting to retry sockets that could not be made: nothing to change yet.
        if missing.is_empty() && !dropping {
            return;
        }
        let mut made = Vec::new();
        let mut failed = Vec::new();
        for (to, local) in missing {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            match open(id, to, local, port, mark) {
                Ok(conn) => match self.epoll.add(conn.fd(), id) {
                    Ok(()) => {
                        tracing::debug!(%to, bound = %conn.bound, port, id, "connected socket made");
                        made.push(Arc::new(conn))
                    }
                    Err(e) => tracing::debug!(%to, error = %e, "cannot watch connected socket"),
                },
                Err(e) => {
                    tracing::debug!(%to, ?local, error = %e, "no connected socket; main socket sends");
                    failed.push((to, local));
                }
            }
        }
        let mut inner = self.write();
        if self.epoch.load(Ordering::Acquire) != epoch {
            // Cleared meanwhile: what was made here may hold the old port.
            drop(inner);
            for c in made {
                let _ = self.epoll.delete(c.fd());
            }
            return;
        }
        let closing = std::mem::take(&mut inner.retiring);
        for c in &closing {
            inner.by_id.remove(&c.id);
            // Closing the socket drops it from the set too; removing it first says so.
            let _ = self.epoll.delete(c.fd());
        }
        for conn in made {
            inner.by_id.insert(conn.id, conn.clone());
            if let Some(old) = inner.by_to.insert(conn.to, conn) {
                inner.retiring.push(old);
            }
        }
        let gone: Vec<SocketAddr> = inner
            .by_to
            .values()
            .filter(|c| drops(c))
            .map(|c| c.to)
            .collect();
        for to in gone {
            if let Some(old) = inner.by_to.remove(&to) {
                tracing::debug!(%to, id = old.id, "connected socket retired");
                inner.retiring.push(old);
            }
        }
        inner.failed.retain(|_, t| now < *t);
        for w in failed {
            inner.failed.insert(w, now + RETRY_AFTER);
        }
        self.generation.fetch_add(1, Ordering::Release);
        drop(inner);
        drop(closing);
    }
}

/// Makes a socket bound to (`local` or the kernel's source for `to`, `port`) and connected
/// to `to`, set up as the main socket is.
fn open(id: u64, to: SocketAddr, local: Option<IpAddr>, port: u16, mark: u32) -> io::Result<Conn> {
    let bound = match local {
        Some(ip) if ip.is_ipv4() == to.is_ipv4() => ip,
        _ => source_for(to)?,
    };
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if to.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    source::share_port(socket.as_raw_fd())?;
    if mark != 0 {
        source::set_fwmark(socket.as_raw_fd(), mark)?;
    }
    let v6 = to.is_ipv6();
    if sys::force_buffers(socket.as_raw_fd(), super::SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(super::SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(super::SOCKET_BUFFER);
    }
    sys::allow_fragments(socket.as_raw_fd(), v6)?;
    source::enable_pktinfo(socket.as_raw_fd(), v6)?;
    let mut at = SocketAddr::new(bound, port);
    if let (SocketAddr::V6(a), SocketAddr::V6(t)) = (&mut at, to) {
        // A link-local source needs the endpoint's link.
        a.set_scope_id(t.scope_id());
    }
    socket.bind(&at.into())?;
    socket.connect(&to.into())?;
    socket.set_nonblocking(true)?;
    Ok(Conn {
        id,
        socket: socket.into(),
        to,
        bound,
        wanted: local,
        port,
        mark,
        broken: AtomicBool::new(false),
    })
}

/// The source address the kernel picks for `to` (a route lookup; nothing is sent).
fn source_for(to: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = UdpSocket::bind(any)?;
    probe.connect(to)?;
    Ok(probe.local_addr()?.ip())
}

/// One sender's last lookup, checked against [`Conns`]'s generation: a sender that keeps
/// sending to one peer takes no lock. It holds the socket weakly: a socket [`Conns`] closed
/// must close for good, whatever a sender that went quiet still remembers, or it would stay
/// connected to the endpoint and take its datagrams, unread.
#[derive(Default)]
pub struct SendCache {
    generation: u64,
    conn: Weak<Conn>,
    to: Option<SocketAddr>,
}

impl SendCache {
    /// The socket that sends to `to` from `from`, if there is one.
    pub fn lookup(
        &mut self,
        conns: &Conns,
        to: SocketAddr,
        from: Option<IpAddr>,
    ) -> Option<Arc<Conn>> {
        // Off (`ZTNET_PEER_SOCKETS=0`): no lock, no lookup on the packet path.
        if !conns.enabled {
            return None;
        }
        let generation = conns.generation.load(Ordering::Acquire);
        if generation != self.generation || self.to != Some(to) {
            self.conn = conns
                .get(to)
                .as_ref()
                .map_or_else(Weak::new, Arc::downgrade);
            self.to = Some(to);
            self.generation = generation;
        }
        self.conn.upgrade().filter(|c| c.serves(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A main socket on loopback, shared as the data plane shares it.
    fn main_socket() -> UdpSocket {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        source::share_port(s.as_raw_fd()).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    fn recv_from(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(5);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while Instant::now() < deadline {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                s.set_nonblocking(true).unwrap();
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    }

    /// A main socket, its port, one peer's socket and address, and the sockets' set.
    struct Fixture {
        main: UdpSocket,
        port: u16,
        peer: UdpSocket,
        to: SocketAddr,
        conns: Conns,
    }

    fn fixture() -> Fixture {
        let main = main_socket();
        let port = main.local_addr().unwrap().port();
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = peer.local_addr().unwrap();
        let conns = Conns::new(true).unwrap();
        Fixture {
            main,
            port,
            peer,
            to,
            conns,
        }
    }

    fn nothing_on(s: &UdpSocket) -> bool {
        let mut buf = [0u8; 64];
        s.set_nonblocking(true).unwrap();
        s.recv_from(&mut buf).is_err()
    }

    #[test]
    fn a_peer_s_datagrams_arrive_on_its_socket_and_replies_leave_from_the_listen_port() {
        let main = main_socket();
        let port = main.local_addr().unwrap().port();
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let stranger = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = peer.local_addr().unwrap();
        let conns = Conns::new(true).unwrap();
        conns.reconcile(&[(to, None)], port, false, Instant::now());
        assert_eq!(conns.len(), 1);

        let mut cache = SendCache::default();
        let conn = cache
            .lookup(&conns, to, None)
            .expect("a socket for the peer");
        conn.send(b"hello").unwrap();
        let (data, from) = recv_from(&peer).expect("the peer receives");
        assert_eq!(data, b"hello");
        assert_eq!(from, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));

        // The peer's datagram goes to its socket; a stranger's to the main socket.
        peer.send_to(b"from peer", ("127.0.0.1", port)).unwrap();
        stranger
            .send_to(b"from stranger", ("127.0.0.1", port))
            .unwrap();
        let conn = conns.by_id(FIRST_ID).unwrap();
        let (data, from) = recv_from(&conn.socket).expect("on the connected socket");
        assert_eq!((data.as_slice(), from), (&b"from peer"[..], to));
        let (data, _) = recv_from(&main).expect("on the main socket");
        assert_eq!(data, b"from stranger");
        assert!(nothing_on(&main));
    }

    #[test]
    fn a_second_daemon_on_the_port_is_still_refused() {
        let main = main_socket();
        let port = main.local_addr().unwrap().port();
        let second = UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            second.unwrap_err().kind(),
            io::ErrorKind::AddrInUse,
            "a socket without SO_REUSEPORT must not share the port"
        );
    }

    #[test]
    fn sockets_follow_the_wanted_set_and_retire_for_one_round() {
        let main = main_socket();
        let port = main.local_addr().unwrap().port();
        let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (ta, tb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let conns = Conns::new(true).unwrap();
        let now = Instant::now();
        conns.reconcile(&[(ta, None), (tb, None)], port, false, now);
        assert_eq!(conns.len(), 2);
        let mut cache = SendCache::default();
        assert!(cache.lookup(&conns, tb, None).is_some());

        // b goes: it is not used for sending at once, but stays readable for one round.
        conns.reconcile(&[(ta, None)], port, false, now);
        assert!(
            cache.lookup(&conns, tb, None).is_none(),
            "the cache saw the change"
        );
        assert_eq!(conns.len(), 2);
        conns.reconcile(&[(ta, None)], port, false, now);
        assert_eq!(conns.len(), 1);

        // A new sticky source for a: a socket bound to it replaces the old one.
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        conns.reconcile(&[(ta, local)], port, false, now);
        let c = cache.lookup(&conns, ta, local).expect("the new socket");
        assert_eq!(c.wanted, local);
        assert!(
            cache
                .lookup(&conns, ta, Some("127.0.0.2".parse().unwrap()))
                .is_none()
        );

        // The port moved: every socket is replaced.
        let other = main_socket();
        let port2 = other.local_addr().unwrap().port();
        conns.reconcile(&[(ta, local)], port2, false, now);
        assert_eq!(cache.lookup(&conns, ta, local).unwrap().port, port2);
        conns.clear();
        assert!(cache.lookup(&conns, ta, local).is_none());
    }

    #[test]
    fn a_closed_socket_is_closed_although_a_quiet_sender_remembers_it() {
        let Fixture {
            main,
            port,
            peer,
            to,
            conns,
        } = fixture();
        let now = Instant::now();
        conns.reconcile(&[(to, None)], port, false, now);
        let mut cache = SendCache::default();
        cache
            .lookup(&conns, to, None)
            .expect("a socket")
            .send(b"x")
            .unwrap();
        // The peer's session lapses: the socket retires, then closes; the cache is not asked.
        conns.reconcile(&[], port, false, now);
        conns.reconcile(&[], port, false, now);
        peer.send_to(b"after", ("127.0.0.1", port)).unwrap();
        let (data, _) = recv_from(&main).expect("the peer's datagram reaches the main socket");
        assert_eq!(data, b"after");
        assert!(cache.lookup(&conns, to, None).is_none());
    }

    #[test]
    fn two_peers_on_one_endpoint_share_a_socket_and_nothing_churns() {
        let Fixture {
            main: _main,
            port,
            peer: _peer,
            to,
            conns,
        } = fixture();
        let now = Instant::now();
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let wanted = [(to, local), (to, None)];
        conns.reconcile(&wanted, port, false, now);
        let generation = conns.generation.load(Ordering::Relaxed);
        conns.reconcile(&wanted, port, false, now);
        conns.reconcile(&wanted, port, false, now);
        assert_eq!(
            conns.generation.load(Ordering::Relaxed),
            generation,
            "no change, no churn"
        );
        assert_eq!(conns.len(), 1);
    }

    #[test]
    fn a_socket_whose_source_was_refused_is_passed_by_and_replaced() {
        let Fixture {
            main: _main,
            port,
            peer: _peer,
            to,
            conns,
        } = fixture();
        let now = Instant::now();
        conns.reconcile(&[(to, None)], port, false, now);
        let mut cache = SendCache::default();
        let conn = cache.lookup(&conns, to, None).unwrap();
        // What a send from an address gone from the host gets back.
        // A GSO batch's EINVAL (segments above the path's size) is not about the address.
        let _ = conn.check(Err(io::Error::from_raw_os_error(libc::EINVAL)), false);
        assert!(
            cache.lookup(&conns, to, None).is_some(),
            "kept after a batch's EINVAL"
        );
        let refused = conn.check(Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)), true);
        assert!(refused.is_err());
        assert!(
            cache.lookup(&conns, to, None).is_none(),
            "senders use the main socket"
        );
        conns.reconcile(&[(to, None)], port, false, now);
        let fresh = cache.lookup(&conns, to, None).expect("a new socket");
        assert_ne!(fresh.id, conn.id);
    }

    #[test]
    fn a_socket_bound_to_an_address_that_went_away_is_passed_by_at_once() {
        let Fixture {
            main: _main,
            port,
            peer: _peer,
            to,
            conns,
        } = fixture();
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        conns.reconcile(&[(to, local)], port, false, Instant::now());
        let mut cache = SendCache::default();
        assert!(cache.lookup(&conns, to, local).is_some());
        conns.address_gone(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(
            cache.lookup(&conns, to, local).is_some(),
            "another address: kept"
        );
        conns.address_gone(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(cache.lookup(&conns, to, local).is_none());
    }

    #[test]
    fn a_broken_socket_goes_although_no_replacement_can_be_made_and_nothing_churns() {
        let Fixture {
            main: _main,
            port,
            peer: _peer,
            to,
            conns,
        } = fixture();
        let now = Instant::now();
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        conns.reconcile(&[(to, local)], port, false, now);
        let conn = conns.by_id(FIRST_ID).unwrap();
        let _ = conn.check(Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)), true);
        drop(conn);
        // Its replacement cannot be made (marked failed, as a bind to a gone address would be).
        conns.write().failed.insert((to, local), now + RETRY_AFTER);
        conns.reconcile(&[(to, local)], port, false, now);
        conns.reconcile(&[(to, local)], port, false, now);
        assert_eq!(conns.len(), 0, "retired, then closed");
        let generation = conns.generation.load(Ordering::Relaxed);
        conns.reconcile(&[(to, local)], port, false, now);
        conns.reconcile(&[(to, local)], port, false, now);
        assert_eq!(
            conns.generation.load(Ordering::Relaxed),
            generation,
            "waiting changes nothing"
        );
        // After the wait it is tried again and made.
        conns.reconcile(&[(to, local)], port, false, now + RETRY_AFTER);
        assert_eq!(conns.len(), 1);
    }

    #[test]
    fn a_source_that_cannot_be_bound_is_not_retried_at_once() {
        let main = main_socket();
        let port = main.local_addr().unwrap().port();
        let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let ta = a.local_addr().unwrap();
        let conns = Conns::new(true).unwrap();
        // Not an address of this host: bind fails.
        let gone = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        let now = Instant::now();
        conns.reconcile(&[(ta, gone)], port, false, now);
        assert_eq!(conns.len(), 0);
        assert!(conns.read().failed.contains_key(&(ta, gone)));
        conns.reconcile(&[(ta, gone)], port, false, now + RETRY_AFTER);
        assert_eq!(conns.len(), 0);
        // And more than MAX_CONNS wanted makes MAX_CONNS at most.
        let many: Vec<Wanted> = (0..MAX_CONNS as u16 + 3)
            .map(|i| (SocketAddr::from((Ipv4Addr::LOCALHOST, 20_000 + i)), None))
            .collect();
        conns.reconcile(&many, port, false, now);
        assert_eq!(conns.len(), MAX_CONNS);
    }

    #[test]
    fn a_send_after_the_peer_s_port_was_closed_is_not_lost() {
        let Fixture {
            main,
            port,
            peer,
            to,
            conns,
        } = fixture();
        conns.reconcile(&[(to, None)], port, false, Instant::now());
        let conn = conns.by_id(FIRST_ID).unwrap();
        drop(peer);
        // The port unreachable error for this one is held on the socket for the next send.
        conn.send(b"one").unwrap();
        let mut pfd = libc::pollfd {
            fd: conn.fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5_000) };
        assert!(
            rc == 1 && pfd.revents & libc::POLLERR != 0,
            "no ICMP error came back"
        );
        let back = UdpSocket::bind(to).unwrap();
        conn.send(b"two").expect("sent again after the held error");
        assert_eq!(recv_from(&back).expect("the peer is back").0, b"two");
        drop(main);
    }
}
