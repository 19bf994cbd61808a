//! Source addresses and a UDP socket that can move to another port, for the shell:
//!
//! - [`enable_pktinfo`] makes the kernel tell, for each datagram, the local address it was
//!   sent to (IP_PKTINFO / IPV6_RECVPKTINFO); [`local_address`] reads it from a received
//!   message. The peer table keeps it per peer, so replies leave from the address the peer
//!   used, as kernel WireGuard does, and a node with several addresses on one link answers
//!   from the right one.
//! - [`send_from`] sends (optionally as a GSO batch) from such an address. When the address
//!   is gone (removed from the host) the kernel refuses it; the caller then sends without it,
//!   so the source is sticky but not too sticky.
//! - [`replace_socket`] puts a freshly bound socket under the same file descriptor number
//!   (`dup2`), so the threads that hold the fd go on with the new port without a restart.
//!
//! `unsafe` is allowed here for the same reason as in `sys`: each call passes pointers to
//! values that live on the stack (or in the caller's buffers) for the whole call, with the
//! sizes the kernel expects.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{IntoRawFd, RawFd};

/// `UDP_SEGMENT` from `linux/udp.h` (the libc crate defines it for uclibc only).
const UDP_SEGMENT: libc::c_int = 103;

/// Room for a pktinfo cmsg and a UDP_SEGMENT cmsg, aligned as cmsghdr requires.
pub const CONTROL_WORDS: usize = 12;

/// Asks the kernel to report each datagram's local destination address.
pub fn enable_pktinfo(fd: RawFd, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    set_int(fd, level, name, 1)
}

/// Sets SO_REUSEPORT on a socket already bound: sockets made later with the option may bind
/// the same port (the node's connected sockets, see `conns`), while one without it, a second
/// daemon's, is still refused.
pub fn share_port(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
}

/// Sets SO_MARK (0 clears it) on the socket, as `wg set fwmark` asks.
pub fn set_fwmark(fd: RawFd, mark: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a c_int on the stack with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The local address a received message was sent to, from its pktinfo cmsg. An IPv4-mapped
/// address (a dual-stack socket) comes back as IPv4.
pub fn local_address(msg: &libc::msghdr) -> Option<IpAddr> {
    if msg.msg_control.is_null() || msg.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: the kernel wrote `msg_controllen` bytes of cmsgs into `msg_control`; the CMSG
    // macros walk only within that length, and each payload is read unaligned with its size
    // checked against cmsg_len first.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let len = c.cmsg_len as usize;
            if c.cmsg_level == libc::IPPROTO_IPV6
                && c.cmsg_type == libc::IPV6_PKTINFO
                && len >= libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize
            {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::in6_pktinfo);
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                return Some(match ip.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(ip),
                });
            }
            if c.cmsg_level == libc::IPPROTO_IP
                && c.cmsg_type == libc::IP_PKTINFO
                && len >= libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize
            {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::in_pktinfo);
                return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// Whether a send error means the source address is not usable (gone from the host, or not
/// valid for that destination), so the datagram should go again without it.
pub fn source_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

/// Sends `data` to `to` from the local address `from`: as one datagram, or with `segment`
/// as datagrams of that size in one call (UDP GSO). `v6_socket` says how `from` is passed
/// (IPV6_PKTINFO, IPv4-mapped for IPv4 on a dual-stack socket, or IP_PKTINFO).
pub fn send_from(
    fd: RawFd,
    to: &socket2::SockAddr,
    from: IpAddr,
    v6_socket: bool,
    data: &[u8],
    segment: Option<u16>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: CMSG_SPACE only computes sizes.
    let (info_space, seg_space) = unsafe {
        let info = if v6_socket {
            libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32)
        } else {
            libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32)
        };
        (
            info as usize,
            libc::CMSG_SPACE(size_of::<u16>() as u32) as usize,
        )
    };
    let total = info_space + if segment.is_some() { seg_space } else { 0 };
    debug_assert!(total <= size_of_val(&control));
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = total;
    // SAFETY: msg_control points at `control`, large enough for both cmsgs (checked above);
    // CMSG_FIRSTHDR, CMSG_NXTHDR and CMSG_DATA stay inside it, payloads are written
    // unaligned with their exact types.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if v6_socket {
            let addr = match from {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
            (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: addr.octets(),
                },
                ipi6_ifindex: 0,
            };
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in6_pktinfo, info);
        } else {
            let IpAddr::V4(v4) = from else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            (*cmsg).cmsg_level = libc::IPPROTO_IP;
            (*cmsg).cmsg_type = libc::IP_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo, info);
        }
        if let Some(seg) = segment {
            let next = libc::CMSG_NXTHDR(&msg, cmsg);
            (*next).cmsg_level = libc::SOL_UDP;
            (*next).cmsg_type = UDP_SEGMENT;
            (*next).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(next) as *mut u16, seg);
        }
        libc::sendmsg(fd, &msg, 0)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Puts `fresh` under the descriptor number `fd` (atomically, with `dup2`) and closes the
/// socket that was there. A thread waiting on the old socket is not woken by this: the caller
/// signals the UDP thread's wake event so that it waits on the new one.
pub fn replace_socket(fd: RawFd, fresh: impl IntoRawFd) -> io::Result<()> {
    let new_fd = fresh.into_raw_fd();
    // SAFETY: both are open descriptors this process owns; dup2 closes the old file behind
    // `fd` and makes `fd` refer to the new one. `new_fd` is closed right after.
    let rc = unsafe { libc::dup2(new_fd, fd) };
    let err = io::Error::last_os_error();
    // SAFETY: `new_fd` came from into_raw_fd and is closed exactly once here.
    unsafe { libc::close(new_fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}
