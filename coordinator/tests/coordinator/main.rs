//! Coordinator tests: the real `ztnet-coordinator` binary on 127.0.0.1 with a fresh data
//! directory each, driven through its admin API (HTTPS) and its control channel (QUIC), as
//! the CLI and the node do. All in one test binary.

mod common;

mod admin;
mod ca;
mod control;
mod datadir;
mod enforcement;
mod expired;
mod inprocess;
mod migrate;
mod netmaps;
mod policy;
mod preview;
mod revoke;
mod session;
mod workload;
