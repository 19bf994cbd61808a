//! Workload identity on the control channel: a node asks for its registrations and for
//! X.509-SVIDs for keys it made. Only a SPIFFE ID registered for the asking node is signed,
//! with the registration's lifetime; the trust bundle is the CA's `ca.pem`.

use std::time::Duration;

use tracing::{debug, info, warn};
use ztnet_proto::control::{ControlError, ServerMsg};

use crate::enroll::refuse;
use crate::hub::Hub;
use crate::store::nodes::Node;
use crate::store::workloads;

/// Answers [`ztnet_proto::control::NodeMsg::WorkloadList`].
pub async fn list(hub: &Hub, node: &Node, request_id: u64) -> ServerMsg {
    match workloads::for_node(&hub.store, node.id).await {
        Ok(entries) => {
            debug!(entries = entries.len(), "workload registrations sent");
            ServerMsg::Workloads {
                request_id,
                entries,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "workload lookup failed");
            refused(
                request_id,
                refuse("internal", "workload lookup failed".into()),
            )
        }
    }
}

/// Answers [`ztnet_proto::control::NodeMsg::SignSvid`].
pub async fn sign(
    hub: &Hub,
    node: &Node,
    request_id: u64,
    spiffe_id: &str,
    csr_pem: &str,
) -> ServerMsg {
    let registration = match workloads::for_node_and_id(&hub.store, node.id, spiffe_id).await {
        Ok(Some(w)) => w,
        Ok(None) => {
            warn!(%spiffe_id, "SVID asked for an identity not registered for this node");
            let err = refuse(
                "not-registered",
                format!("{spiffe_id} is not registered for node {}", node.name),
            );
            return refused(request_id, err);
        }
        Err(e) => {
            tracing::error!(error = %e, "workload lookup failed");
            return refused(
                request_id,
                refuse("internal", "workload lookup failed".into()),
            );
        }
    };
    let lifetime = Duration::from_secs(registration.ttl_secs);
    match hub
        .ca
        .issue_svid(csr_pem, registration.spiffe_id.as_str(), lifetime)
    {
        Ok(cert) => {
            info!(%spiffe_id, serial = %cert.serial, not_after = cert.not_after, "SVID issued");
            ServerMsg::Svid {
                request_id,
                cert_pem: cert.pem,
                bundle_pem: hub.ca.ca_pem().to_string(),
            }
        }
        Err(e) => refused(request_id, refuse("bad-request", e.to_string())),
    }
}

fn refused(request_id: u64, error: ControlError) -> ServerMsg {
    ServerMsg::WorkloadRefused { request_id, error }
}
