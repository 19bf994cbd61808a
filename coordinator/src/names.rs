//! Validation of the names an operator or a node chooses; the rules live in `ztnet_proto` so
//! that a node can check its own name before it makes anything.

pub use ztnet_proto::names::*;
