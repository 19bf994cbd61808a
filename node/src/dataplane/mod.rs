//! The data plane: TUN <-> filter <-> boringtun <-> UDP.
//!
//! CONTRACT (issue 3 fills this in; keep the signatures, add freely).

use std::net::SocketAddr;

use ztnet_proto::status::StatusReport;

use crate::netconfig::{DataplaneConfig, InterfaceConfig};

/// A running data plane. Until the first `apply` it has no peers and passes nothing.
pub struct Dataplane {
    _private: (),
}

impl Dataplane {
    /// Creates the TUN interface and the UDP socket and starts the packet threads.
    pub fn start(iface: InterfaceConfig) -> anyhow::Result<Dataplane> {
        let _ = iface;
        unimplemented!("dataplane: start")
    }

    /// Applies a new configuration atomically; unchanged peers keep their sessions.
    pub fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()> {
        let _ = config;
        unimplemented!("dataplane: apply")
    }

    /// The UDP port actually bound.
    pub fn listen_port(&self) -> u16 {
        unimplemented!("dataplane: listen_port")
    }

    /// Local addresses worth reporting to the coordinator, with the listen port.
    pub fn local_endpoints(&self) -> Vec<SocketAddr> {
        unimplemented!("dataplane: local_endpoints")
    }

    /// Records whether the control channel is up (shown in status).
    pub fn set_control_connected(&self, connected: bool) {
        let _ = connected;
        unimplemented!("dataplane: set_control_connected")
    }

    /// A status snapshot.
    pub fn status(&self) -> StatusReport {
        unimplemented!("dataplane: status")
    }

    /// Serves `/var/run/ztnet/IFACE.sock` (status) and `/var/run/wireguard/IFACE.sock` (the
    /// WireGuard cross-platform interface, read side) until the data plane stops.
    pub fn serve_local_api(&self) -> anyhow::Result<()> {
        unimplemented!("dataplane: serve_local_api")
    }

    /// Stops the threads and removes the interface and sockets.
    pub fn shutdown(self) {}
}
