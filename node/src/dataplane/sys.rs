//! The one place where the node talks to the kernel through raw calls: opening a TUN device
//! (with its offloads), forcing socket buffer sizes as root, batched UDP sends and receives,
//! and waiting for a file descriptor to become readable.
//!
//! `unsafe` is allowed here only: each call passes pointers to values that live on the stack
//! for the whole call, with the sizes the kernel expects. A raw TUN device (rather than the
//! `tun-tap` crate) is what lets the node open it with `IFF_VNET_HDR` and `TUNSETOFFLOAD`.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `IFF_VNET_HDR` from `linux/if_tun.h`: every packet carries a virtio-net header.
const IFF_VNET_HDR: libc::c_int = 0x4000;
/// `IFF_MULTI_QUEUE` from `linux/if_tun.h`: every open of the device is one more queue.
const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
/// `TUNSETOFFLOAD`, `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`, `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `TUN_F_*` offload flags, as `TUNSETOFFLOAD` takes them.
pub mod tun_f {
    /// The device may leave checksums partial (needed by all the others).
    pub const CSUM: u32 = 0x01;
    /// TCP segmentation offload over IPv4.
    pub const TSO4: u32 = 0x02;
    /// TCP segmentation offload over IPv6.
    pub const TSO6: u32 = 0x04;
    /// UDP segmentation offload over IPv4 (Linux 6.2+).
    pub const USO4: u32 = 0x20;
    /// UDP segmentation offload over IPv6 (Linux 6.2+).
    pub const USO6: u32 = 0x40;
}

/// Refuses an interface name the kernel would not take: 1 to 15 bytes, no '/', space or NUL.
pub fn check_interface_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1 to 15 characters without '/' or spaces"),
        ));
    }
    Ok(())
}

/// Whether an interface named `name` exists in this process's network namespace.
/// How many datagrams the kernel dropped on the UDP sockets `fds` because their receive
/// buffers were full: the sum of the `drops` column of their lines in `/proc/net/udp6` and
/// `/proc/net/udp` (this process's network namespace), found by each socket's inode. `None`
/// when the first socket's line cannot be read.
pub fn socket_drops(fds: &[RawFd]) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<u64> = fds
        .iter()
        .filter_map(|fd| std::fs::metadata(format!("/proc/self/fd/{fd}")).ok())
        .map(|m| m.ino())
        .collect();
    let tables: Vec<String> = ["/proc/self/net/udp6", "/proc/self/net/udp"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let drops = |inode: u64| tables.iter().find_map(|t| udp_table_drops(t, inode));
    let first = drops(*inodes.first()?)?;
    Some(first + inodes[1..].iter().filter_map(|&i| drops(i)).sum::<u64>())
}

/// The `drops` column of the line for `inode` in a `/proc/net/udp` table.
fn udp_table_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(9)?.parse::<u64>().ok()? == inode).then(|| cols.get(12)?.parse().ok())?
    })
}

pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated string that lives for the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Opens `/dev/net/tun` as a layer-3 TUN interface named `name` without packet information,
/// in non-blocking mode, with a virtio-net header before every packet when `vnet_hdr` is set.
/// With `multi_queue` the device is made multi-queue and this file is its first queue; a
/// second open of the same name with the same flags ([`open_tun`] again) attaches another.
/// Returns the device and the name the kernel gave it.
pub fn open_tun(name: &str, vnet_hdr: bool, multi_queue: bool) -> io::Result<(File, String)> {
    check_interface_name(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid, initialised ifreq-sized struct that outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if vnet_hdr {
        let size: libc::c_int = super::offload::VNET_HDR_LEN as libc::c_int;
        // SAFETY: a c_int on the stack, read by the kernel during the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size as *const _) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    let actual = String::from_utf8_lossy(&req.name[..end]).into_owned();
    Ok((file, actual))
}

/// Tells the kernel which offloads the reader of a `IFF_VNET_HDR` TUN handles (`TUN_F_*`).
pub fn set_tun_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let rc = unsafe { libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until one of `fds` is readable (or has an error or hang-up), with no timeout: a
/// thread that must also stop puts its [`Event`] among them. Negative entries are skipped.
/// Returns which are ready; all false when a signal interrupted the wait.
pub fn wait_readable<const N: usize>(fds: [RawFd; N]) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: N valid pollfds on the stack, count N.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, -1) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok([false; N])
        } else {
            Err(e)
        };
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

/// An eventfd: one thread signals it, the threads that wait on it in [`wait_readable`] wake.
/// Used so that idle threads sleep until there is work or a reason to stop, instead of
/// waking on a timer to look.
#[derive(Debug)]
pub struct Event(std::os::fd::OwnedFd);

impl Event {
    pub fn new() -> io::Result<Event> {
        // SAFETY: plain syscall; the descriptor returned is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(Event(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// Makes the event readable until [`Event::clear`] (for good if never cleared).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: 8 bytes from a u64 on the stack, as eventfd requires. A full counter
        // (EAGAIN) is still readable, which is all a waiter needs.
        let _ = unsafe { libc::write(self.fd(), (&raw const one).cast(), 8) };
    }

    /// Makes the event unreadable again.
    pub fn clear(&self) {
        let mut n: u64 = 0;
        // SAFETY: 8 bytes into a u64 on the stack; non-blocking, EAGAIN when already clear.
        let _ = unsafe { libc::read(self.fd(), (&raw mut n).cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An `epoll` set of descriptors, each with a token: the UDP thread waits on its sockets,
/// however many, in one call that returns only the ready ones. Level-triggered: a descriptor
/// with data left is reported again.
#[derive(Debug)]
pub struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the descriptor returned is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(Epoll(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input (errors and hang-ups are always reported), as `token`. A
    /// descriptor already in the set gets the new token.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        let epfd = self.0.as_raw_fd();
        // SAFETY: an epoll_event on the stack, valid for the call.
        let mut rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            // SAFETY: as above.
            rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) };
        }
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (closing it does too).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event argument; null is allowed since Linux 2.6.9.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits with no timeout until something in the set is ready, and puts the tokens of
    /// what is ready in `ready` (emptied first; none when a signal interrupted the wait).
    pub fn wait(&self, ready: &mut Vec<u64>) -> io::Result<()> {
        self.wait_for(ready, -1)
    }

    /// Like [`Epoll::wait`], without waiting: what is ready now.
    pub fn ready_now(&self, ready: &mut Vec<u64>) -> io::Result<()> {
        self.wait_for(ready, 0)
    }

    fn wait_for(&self, ready: &mut Vec<u64>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 64;
        // Left unwritten: the kernel fills the first `rc`, and zeroing all 64 would write
        // twelve cache lines of stack on every wait.
        let mut events = [const { MaybeUninit::<libc::epoll_event>::uninit() }; MAX];
        ready.clear();
        // SAFETY: MAX writable epoll_events on the stack.
        let rc = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr().cast(),
                MAX as i32,
                timeout_ms,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let filled = usize::try_from(rc).unwrap_or(0).min(MAX);
        // SAFETY: epoll_wait wrote the first `rc` entries (never more than MAX).
        ready.extend(
            events[..filled]
                .iter()
                .map(|e| unsafe { e.assume_init_ref() }.u64),
        );
        Ok(())
    }
}

/// A netlink socket that hears the kernel announce link and address changes in this network
/// namespace: the node puts its routes back when its interface comes up again, and drops
/// the connected sockets bound to an address that went away.
#[derive(Debug)]
pub struct LinkEvents(std::os::fd::OwnedFd);

/// `RTM_NEWLINK` and `RTM_DELADDR` from `linux/rtnetlink.h`.
const RTM_NEWLINK: u16 = 16;
const RTM_DELADDR: u16 = 21;
/// `RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`.
const GROUPS: u32 = 0x1 | 0x10 | 0x100;
/// `IFA_ADDRESS` and `IFA_LOCAL`.
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// What [`LinkEvents`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    /// `RTM_NEWLINK`: an interface's index and flags.
    Link { index: i32, flags: u32 },
    /// `RTM_DELADDR`: a local address went away.
    AddressGone(std::net::IpAddr),
}

impl LinkEvents {
    pub fn open() -> io::Result<LinkEvents> {
        // SAFETY: plain syscall; the descriptor returned is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let owned: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is valid, then the fields are set.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = GROUPS;
        // SAFETY: a sockaddr_nl on the stack with its exact size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkEvents(owned))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reads what the kernel sent without waiting, and returns the events in it. `Ok(None)`
    /// when nothing is waiting. A lost message (ENOBUFS: the kernel's queue overflowed) is
    /// reported as an error: the caller should treat it as "anything may have changed".
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<Vec<NetEvent>>> {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(net_events(&buf[..n as usize])))
    }
}

/// The events in a netlink datagram: each `RTM_NEWLINK` with its interface index and flags,
/// each `RTM_DELADDR` with its address. A truncated or malformed message ends the walk.
pub fn net_events(mut data: &[u8]) -> Vec<NetEvent> {
    const HDR: usize = 16;
    let mut out = Vec::new();
    while data.len() >= HDR {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < HDR || len > data.len() {
            break;
        }
        let body = &data[HDR..len];
        match kind {
            // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change.
            RTM_NEWLINK if body.len() >= 16 => out.push(NetEvent::Link {
                index: i32::from_ne_bytes([body[4], body[5], body[6], body[7]]),
                flags: u32::from_ne_bytes([body[8], body[9], body[10], body[11]]),
            }),
            RTM_DELADDR => out.extend(gone_address(body).map(NetEvent::AddressGone)),
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or_default();
    }
    out
}

/// The address of an `RTM_DELADDR` body (struct ifaddrmsg, 8 bytes, then attributes):
/// `IFA_LOCAL` for IPv4 (`IFA_ADDRESS` is the peer's on point-to-point links), `IFA_ADDRESS`
/// for IPv6.
fn gone_address(body: &[u8]) -> Option<std::net::IpAddr> {
    let family = i32::from(*body.first()?);
    let mut attrs = body.get(8..)?;
    let (mut address, mut local) = (None, None);
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        let ip = match (family, value.len()) {
            (libc::AF_INET, 4) => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
            (libc::AF_INET6, 16) => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
            _ => None,
        };
        match kind {
            IFA_ADDRESS => address = ip,
            IFA_LOCAL => local = ip,
            _ => {}
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
    }
    if family == libc::AF_INET {
        local.or(address)
    } else {
        address
    }
}

/// The index of the interface `name` in this network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<i32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    i32::try_from(index).ok().filter(|&i| i > 0)
}

/// Sets SO_RCVBUFFORCE and SO_SNDBUFFORCE (root only, above `rmem_max`). Returns an error when
/// the kernel refuses, so the caller can fall back to the ordinary options.
pub fn force_buffers(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a c_int on the stack with its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &value as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `UDP_SEGMENT` from `linux/udp.h` (the libc crate defines it for uclibc only).
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `data` to `to` as datagrams of `segment` bytes each (the last may be shorter) in one
/// system call, with UDP generic segmentation offload (Linux 4.18+). `to` is `None` on a
/// connected socket.
pub fn send_segments(
    fd: RawFd,
    to: Option<&socket2::SockAddr>,
    data: &[u8],
    segment: u16,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one cmsg carrying a u16, aligned as cmsghdr requires.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= size_of_val(&control));
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some(to) = to {
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `control`, large enough for one cmsg of a u16 (checked
    // above); CMSG_FIRSTHDR and CMSG_DATA stay inside it.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
        libc::sendmsg(fd, &msg, 0)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Buffers for receiving up to `count` datagrams in one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Room for each datagram's pktinfo cmsg (its local address, see `source`).
    controls: Vec<[u64; super::source::CONTROL_WORDS]>,
    received: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` point only into this struct's own heap
// buffers, which move with it; nothing else holds them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Room for `count` datagrams of up to `size` bytes each.
    pub fn new(count: usize, size: usize) -> RecvBatch {
        let mut batch = RecvBatch {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            // SAFETY: sockaddr_storage and mmsghdr are plain data; all-zero is valid.
            addrs: (0..count).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: (0..count)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: (0..count).map(|_| unsafe { std::mem::zeroed() }).collect(),
            controls: vec![[0; super::source::CONTROL_WORDS]; count],
            received: 0,
        };
        // The pointers are set once: the vectors never grow, so their heap blocks stay where
        // they are when the struct moves.
        for i in 0..count {
            batch.iovs[i].iov_base = batch.bufs[i].as_mut_ptr() as *mut libc::c_void;
            batch.iovs[i].iov_len = batch.bufs[i].len();
            let h = &mut batch.hdrs[i].msg_hdr;
            h.msg_name = &mut batch.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_iov = &mut batch.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = batch.controls[i].as_mut_ptr() as *mut libc::c_void;
            batch.reset(i);
        }
        batch
    }

    /// Gives slot `i` its full lengths back (the kernel shortens them to what it wrote).
    fn reset(&mut self, i: usize) {
        let h = &mut self.hdrs[i];
        h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_hdr.msg_controllen = size_of_val(&self.controls[i]);
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
    }

    /// Takes the datagrams already queued, up to `max` and the batch size, without waiting
    /// (the caller polls first): `WouldBlock` when nothing is queued. Returns how many
    /// arrived. With `max` 1 the kernel does not look for a second one.
    pub fn recv_now(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        // Only the slots the last call filled were changed by the kernel: a sparse receive
        // touches one header, not all of them (each is a cache line, cold between packets).
        for i in 0..std::mem::take(&mut self.received).max(1) {
            self.reset(i);
        }
        let count =
            libc::c_uint::try_from(self.hdrs.len().min(max.max(1))).unwrap_or(libc::c_uint::MAX);
        // SAFETY: every header points at a live buffer, address, iovec and control buffer of
        // this struct, with their true sizes; the kernel writes only within them.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                count,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = rc as usize;
        Ok(self.received)
    }

    /// The local address datagram `i` of the last `recv` was sent to, when the socket reports
    /// it (see `source::enable_pktinfo`).
    pub fn local(&self, i: usize) -> Option<std::net::IpAddr> {
        if i >= self.received {
            return None;
        }
        super::source::local_address(&self.hdrs[i].msg_hdr)
    }

    /// Datagram `i` of the last `recv` with its sender; `None` when it was truncated (larger
    /// than the buffers) or its address is not IP.
    pub fn get(&self, i: usize) -> Option<(std::net::SocketAddr, &[u8])> {
        if i >= self.received {
            return None;
        }
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        // SAFETY: the kernel filled `addrs[i]` and set its length.
        let addr = unsafe { socket2::SockAddr::new(self.addrs[i], h.msg_hdr.msg_namelen) };
        let from = addr.as_socket()?;
        Some((from, &self.bufs[i][..h.msg_len as usize]))
    }
}

/// Clears the don't-fragment bit on IPv4 datagrams (IP_PMTUDISC_DONT), as kernel WireGuard
/// does, so that a router on a narrower path fragments the outer packet instead of dropping it
/// when its ICMP error never reaches us (FC-23). On an IPv6 socket this also lets the node
/// fragment IPv6 datagrams itself.
pub fn allow_fragments(fd: RawFd, v6: bool) -> io::Result<()> {
    let mut opts = vec![(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )];
    if v6 {
        opts.push((
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        ));
    }
    for (level, name, value) in opts {
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_wakes_a_waiter_until_cleared() {
        let stop = Event::new().expect("eventfd");
        let other = Event::new().expect("eventfd");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| wait_readable([other.fd(), -1, stop.fd()]));
            stop.signal();
            let ready = waiter.join().expect("thread").expect("poll");
            assert_eq!(ready, [false, false, true]);
        });
        // Signalled twice, still one wake-up's worth; cleared, not readable.
        other.signal();
        other.signal();
        assert_eq!(wait_readable([other.fd()]).expect("poll"), [true]);
        other.clear();
        stop.clear();
        other.signal();
        assert_eq!(
            wait_readable([stop.fd(), other.fd()]).expect("poll"),
            [false, true]
        );
    }

    #[test]
    fn a_batch_reused_after_short_and_long_receives_reports_each_datagram_whole() {
        let rx = std::net::UdpSocket::bind("[::1]:0").expect("bind");
        let fd = rx.as_raw_fd();
        let to = rx.local_addr().expect("addr");
        let mut batch = RecvBatch::new(4, 2048);
        assert!(
            batch.recv_now(fd, usize::MAX).is_err(),
            "nothing queued yet"
        );
        let a = std::net::UdpSocket::bind("[::1]:0").expect("bind");
        let b = std::net::UdpSocket::bind("[::1]:0").expect("bind");
        a.send_to(&[1u8; 10], to).expect("send");
        wait_readable([fd]).expect("poll");
        assert_eq!(batch.recv_now(fd, usize::MAX).expect("one"), 1);
        assert_eq!(batch.get(0).expect("datagram").1, &[1u8; 10]);
        // Three larger ones from another socket: every slot, the first included, is whole.
        for n in [1500usize, 900, 1200] {
            b.send_to(&vec![2u8; n], to).expect("send");
        }
        let mut got = Vec::new();
        while got.len() < 3 {
            wait_readable([fd]).expect("poll");
            let n = batch.recv_now(fd, usize::MAX).expect("some");
            for i in 0..n {
                let (from, d) = batch.get(i).expect("datagram");
                assert_eq!(from, b.local_addr().expect("addr"));
                got.push(d.len());
            }
        }
        assert_eq!(got, [1500, 900, 1200]);
        a.send_to(&[3u8; 7], to).expect("send");
        wait_readable([fd]).expect("poll");
        assert_eq!(batch.recv_now(fd, usize::MAX).expect("one"), 1);
        let (from, d) = batch.get(0).expect("datagram");
        assert_eq!((from, d), (a.local_addr().expect("addr"), &[3u8; 7][..]));

        // A receive of one takes one and leaves the rest queued, in order (loopback queues a
        // datagram before its send returns, so all three are there).
        for n in [11usize, 12, 13] {
            a.send_to(&vec![4u8; n], to).expect("send");
        }
        wait_readable([fd]).expect("poll");
        assert_eq!(batch.recv_now(fd, 1).expect("one"), 1);
        assert_eq!(batch.get(0).expect("datagram").1.len(), 11);
        let mut rest = Vec::new();
        while rest.len() < 2 {
            wait_readable([fd]).expect("poll");
            let n = batch.recv_now(fd, usize::MAX).expect("the rest");
            rest.extend((0..n).map(|i| batch.get(i).expect("datagram").1.len()));
        }
        assert_eq!(rest, [12, 13]);
    }

    #[test]
    fn the_drops_column_is_read_for_the_sockets_inode() {
        let table = "   sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
 1234: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n\
 1235: 00000000000000000000000000000000:CA6D 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4343 2 0000000000000000 0\n";
        assert_eq!(udp_table_drops(table, 4242), Some(17));
        assert_eq!(udp_table_drops(table, 4343), Some(0));
        assert_eq!(udp_table_drops(table, 1), None);
        assert_eq!(udp_table_drops("garbage\n1 2 3\n", 3), None);
    }

    #[test]
    fn a_full_receive_buffer_on_loopback_is_counted() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4096)
            .expect("small buffer");
        assert_eq!(socket_drops(&[rx.as_raw_fd()]), Some(0));
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        for _ in 0..200 {
            tx.send_to(&[0u8; 1000], to).expect("send on loopback");
        }
        let drops = socket_drops(&[rx.as_raw_fd()]).expect("read");
        assert!(drops > 0, "200 datagrams into a 4 KiB buffer dropped none");
    }

    #[test]
    fn net_events_are_read_and_garbage_ends_the_walk() {
        fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
            let len = 16 + body.len();
            let mut m = Vec::new();
            m.extend_from_slice(&(len as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0u8; 10]);
            m.extend_from_slice(body);
            // Aligned to 4 bytes.
            m.resize((len + 3) & !3, 0);
            m
        }
        fn link(index: i32, flags: u32) -> Vec<u8> {
            let mut b = vec![0u8; 4];
            b.extend_from_slice(&index.to_ne_bytes());
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&[1, 2, 3]); // an attribute's worth, unaligned
            b
        }
        fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
            let mut a = Vec::new();
            a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            a.extend_from_slice(&kind.to_ne_bytes());
            a.extend_from_slice(value);
            a.resize((a.len() + 3) & !3, 0);
            a
        }
        fn deladdr(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
            let mut b = vec![family, 24, 0, 0, 5, 0, 0, 0];
            for a in attrs {
                b.extend_from_slice(a);
            }
            b
        }
        let v4 = deladdr(
            libc::AF_INET as u8,
            &[
                attr(IFA_ADDRESS, &[10, 0, 0, 9]),
                attr(IFA_LOCAL, &[10, 0, 0, 1]),
            ],
        );
        let v6addr: std::net::Ipv6Addr = "fd77::1".parse().unwrap();
        let v6 = deladdr(libc::AF_INET6 as u8, &[attr(IFA_ADDRESS, &v6addr.octets())]);
        let mut all = msg(RTM_NEWLINK, &link(7, 1));
        all.extend(msg(17, &link(8, 0))); // RTM_DELLINK: not reported
        all.extend(msg(RTM_DELADDR, &v4));
        all.extend(msg(RTM_DELADDR, &v6));
        all.extend(msg(RTM_NEWLINK, &link(9, 0)));
        assert_eq!(
            net_events(&all),
            vec![
                NetEvent::Link { index: 7, flags: 1 },
                NetEvent::AddressGone("10.0.0.1".parse().unwrap()),
                NetEvent::AddressGone(v6addr.into()),
                NetEvent::Link { index: 9, flags: 0 },
            ]
        );
        // A length past the end, a length below the header, a short tail: the walk ends.
        let mut bad = msg(RTM_NEWLINK, &link(7, 1));
        bad[0] = 200;
        assert!(net_events(&bad).is_empty());
        let mut tiny = msg(RTM_NEWLINK, &link(7, 1));
        tiny[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(net_events(&tiny).is_empty());
        // A garbled attribute or a wrong-sized address gives no address.
        let mut garbled = deladdr(libc::AF_INET as u8, &[attr(IFA_LOCAL, &[10, 0, 0, 1])]);
        garbled[8] = 0xff;
        assert!(net_events(&msg(RTM_DELADDR, &garbled)).is_empty());
        let short = deladdr(libc::AF_INET6 as u8, &[attr(IFA_ADDRESS, &[1, 2, 3, 4])]);
        assert!(net_events(&msg(RTM_DELADDR, &short)).is_empty());
        for n in 0..all.len() {
            let _ = net_events(&all[..n]);
        }
    }

    #[test]
    fn loopback_has_an_index() {
        assert!(interface_index("lo").is_some());
        assert!(interface_index("no-such-if-9").is_none());
        LinkEvents::open().expect("a netlink socket");
    }
}
