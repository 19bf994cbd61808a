//! Sends a WireGuard datagram to an IPv6 endpoint as IPv6 fragments of at most 1280 bytes
//! (FC-23): for the datagrams that must arrive although they are larger than the learned path
//! MTU (inner IPv6 packets of at most 1280 bytes, which IPv6 must carry, and inner IPv4
//! without DF).
//!
//! The kernel fragments an IPv6 datagram only to the MTU it knows (the local link, or a path
//! MTU an ICMPv6 error taught it), never to one the node measured, and setting `IPV6_MTU` on
//! the shared UDP socket around one send would race the other threads' GSO sends (a GSO
//! segment above the socket's fragment size fails with EINVAL). So the node builds the
//! fragments itself ([`super::pmtu::fragments`]: IPv6 header, fragment header, a slice of the
//! UDP datagram with its checksum) and sends them whole through a raw `IPPROTO_RAW` socket,
//! which includes the header as given and receives nothing. The socket is opened on the first
//! such send (it needs CAP_NET_RAW); without it the datagram goes through the UDP socket as
//! before, which a narrower hop then drops.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::pmtu;

static RAW: OnceLock<Option<Socket>> = OnceLock::new();
static NEXT_ID: OnceLock<AtomicU32> = OnceLock::new();

fn raw() -> Option<&'static Socket> {
    RAW.get_or_init(|| {
        match Socket::new(
            Domain::IPV6,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no raw IPv6 socket (CAP_NET_RAW?): datagrams above the learned path MTU \
                     go unfragmented and a narrower hop may drop them"
                );
                None
            }
        }
    })
    .as_ref()
}

/// The local address the kernel would send to `to` from.
fn route_source(to: Ipv6Addr) -> io::Result<Ipv6Addr> {
    let probe = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))?;
    probe.connect(SocketAddr::from((to, 9)))?;
    match probe.local_addr()?.ip() {
        IpAddr::V6(a) => Ok(a),
        IpAddr::V4(_) => Err(io::Error::other("IPv4 source for an IPv6 peer")),
    }
}

/// Sends `datagram` from `from` (the source the peer last reached this node at, or the
/// kernel's choice) and UDP port `sport` to `to` as fragments. `Err` when it could not, so
/// that the caller sends it the ordinary way.
pub fn send(to: SocketAddrV6, from: Option<IpAddr>, sport: u16, datagram: &[u8]) -> io::Result<()> {
    let socket = raw().ok_or_else(|| io::Error::other("no raw socket"))?;
    let src = match from {
        Some(IpAddr::V6(a)) if a.to_ipv4_mapped().is_none() => a,
        _ => route_source(*to.ip())?,
    };
    let id = NEXT_ID
        .get_or_init(|| AtomicU32::new(rand::random()))
        .fetch_add(1, Ordering::Relaxed);
    let dest = SockAddr::from(SocketAddrV6::new(*to.ip(), 0, 0, to.scope_id()));
    let mut result = Ok(());
    let mut scratch = Vec::with_capacity(pmtu::FRAGMENT_MTU);
    pmtu::fragments(
        (src, sport),
        (*to.ip(), to.port()),
        datagram,
        id,
        &mut scratch,
        |frag| {
            if result.is_ok()
                && let Err(e) = socket.send_to(frag, &dest)
            {
                result = Err(e);
            }
        },
    );
    result
}
