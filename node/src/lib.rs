//! ztnet-node: the daemon on every machine of a ztnet network.
//!
//! - [`dataplane`]: TUN device, UDP socket, one boringtun session per peer, the netpolicy filter
//!   on every packet (I/O shell around the peer table).
//! - [`netconfig`]: the configuration the data plane runs from, whichever mode produced it.
//! - [`static_config`]: static mode, `ztnet-node --config node.toml`.
//! - [`up`], [`control`], [`state`]: coordinator mode: enrollment, the QUIC control channel and
//!   the state directory.
//! - [`workload`]: the workload API that hands SPIFFE X.509-SVIDs to local processes.

pub mod control;
pub mod dataplane;
pub mod netconfig;
pub mod posture;
pub mod state;
pub mod static_config;
pub mod up;
pub mod workload;
