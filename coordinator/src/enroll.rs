//! Enrollment: a join token's secret, a node name, a WireGuard public key and a certificate
//! request in; a node record, its addresses and a signed node certificate out. The token use,
//! the node row, its certificate record, its TLS key on record (the SHA-256 of the certificate's
//! SubjectPublicKeyInfo) and the audit entry commit in one transaction, so a refused enrollment
//! stores nothing and leaves the token's uses as they were.

use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::info;
use ztnet_proto::control::{ControlError, EnrollRequest, EnrollResponse};
use ztnet_proto::token::secret_hash;

use crate::hub::Hub;
use crate::store::nodes::{InsertError, NewNode};
use crate::store::tokens::Refusal;
use crate::store::{StoreError, audit, networks, nodes, tokens, unix_now};
use crate::{names, netmap};

/// Enrolls a node. `observed` is the address its connection came from.
pub async fn enroll(
    hub: &Hub,
    req: &EnrollRequest,
    observed: SocketAddr,
) -> Result<EnrollResponse, ControlError> {
    if req.protocol != ztnet_proto::PROTOCOL_VERSION {
        return Err(refuse(
            "protocol",
            format!(
                "node speaks protocol {}, this coordinator {}",
                req.protocol,
                ztnet_proto::PROTOCOL_VERSION
            ),
        ));
    }
    names::node(&req.name).map_err(|m| refuse("bad-request", m))?;
    if req.token_secret.len() > 256 {
        return Err(refuse("token-invalid", "token secret is malformed".into()));
    }

    let outcome = enroll_tx(hub, req, observed).await;
    match outcome {
        Ok(done) => {
            info!(
                node = %done.response.name,
                network = %done.response.network,
                key = %req.wg_public_key.short(),
                "node enrolled"
            );
            if let Err(e) = hub.recompute(done.network).await {
                tracing::error!(error = %e, "recompute after enrollment failed");
            }
            Ok(done.response)
        }
        Err(EnrollFailure::Refused(e)) => {
            info!(name = %req.name, code = %e.code, "enrollment refused");
            Err(e)
        }
        Err(EnrollFailure::Store(e)) => {
            tracing::error!(error = %e, "enrollment failed on the database");
            Err(refuse(
                "internal",
                "the coordinator could not store the node".into(),
            ))
        }
    }
}

struct Done {
    network: crate::store::NetworkId,
    response: EnrollResponse,
}

enum EnrollFailure {
    Refused(ControlError),
    Store(StoreError),
}

impl From<StoreError> for EnrollFailure {
    fn from(e: StoreError) -> Self {
        EnrollFailure::Store(e)
    }
}

impl From<sqlx::Error> for EnrollFailure {
    fn from(e: sqlx::Error) -> Self {
        EnrollFailure::Store(e.into())
    }
}

async fn enroll_tx(
    hub: &Hub,
    req: &EnrollRequest,
    observed: SocketAddr,
) -> Result<Done, EnrollFailure> {
    let mut tx = hub.store.write().await?;
    let grant = match tokens::consume(&mut tx, &secret_hash(&req.token_secret), unix_now()).await? {
        Ok(g) => g,
        Err(r) => {
            let (code, msg) = match r {
                Refusal::Unknown => ("token-invalid", "the join token is not known here"),
                Refusal::Revoked => ("token-invalid", "the join token was revoked"),
                Refusal::Expired => ("token-expired", "the join token has expired"),
                Refusal::UsedUp => ("token-used-up", "the join token has no uses left"),
            };
            return Err(EnrollFailure::Refused(refuse(code, msg.into())));
        }
    };
    let network = networks::list_in(&mut tx)
        .await?
        .into_iter()
        .find(|n| n.id == grant.network)
        .ok_or_else(|| StoreError::Corrupt(format!("token {} has no network", grant.id)))?;

    let spiffe_id = format!(
        "spiffe://{}/ns/{}/node/{}",
        hub.trust_domain, grant.namespace, req.name
    );
    let cert = hub
        .ca
        .issue_node(&req.csr_pem, &spiffe_id)
        .map_err(|e| EnrollFailure::Refused(refuse("bad-request", e.to_string())))?;

    let offset = nodes::next_offset(&mut tx, network.id).await?;
    let (ipv4, ipv6) =
        netmap::addresses_at(network.cidr, network.cidr6, offset).ok_or_else(|| {
            EnrollFailure::Refused(refuse(
                "bad-request",
                format!("network {} has no free address left", network.name),
            ))
        })?;
    let offset = u32::try_from(offset).map_err(|_| StoreError::Corrupt("offset".into()))?;
    let endpoints = netmap::endpoints(observed.ip(), req.listen_port, &req.endpoints);
    let version: String = req.version.chars().take(64).collect();
    let new = NewNode {
        network: network.id,
        name: &req.name,
        namespace: &grant.namespace,
        tags: &grant.tags,
        spiffe_id: &spiffe_id,
        public_key: req.wg_public_key,
        offset,
        ipv4,
        ipv6,
        token_id: &grant.id,
        listen_port: req.listen_port,
        endpoints: &endpoints,
        version: &version,
    };
    let node = match nodes::insert(&mut tx, &new).await {
        Ok(n) => n,
        Err(InsertError::NameTaken(existing)) => {
            return Err(EnrollFailure::Refused(refuse(
                "name-taken",
                format!(
                    "network {} already has a node named {existing:?} (names ignore case)",
                    network.name
                ),
            )));
        }
        Err(e @ InsertError::KeyInUse(_)) => {
            return Err(EnrollFailure::Refused(refuse("bad-request", e.to_string())));
        }
        Err(e @ InsertError::KeyRevoked(_)) => {
            return Err(EnrollFailure::Refused(refuse("revoked", e.to_string())));
        }
        Err(InsertError::Store(e)) => return Err(e.into()),
    };
    nodes::add_cert(&mut tx, node.id, &cert.serial, cert.not_after).await?;
    let key = nodes::tls_key_hash_pem(&cert.pem)
        .ok_or_else(|| StoreError::Corrupt("the certificate just issued does not parse".into()))?;
    nodes::set_tls_key(&mut tx, node.id, &key).await?;
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &format!("node:{}", node.name),
            action: "node.enroll",
            target: &node.name,
            detail: format!(
                "token {}, key {}, addresses {} {}, from {}",
                grant.id,
                node.public_key.short(),
                ipv4,
                ipv6,
                observed.ip()
            ),
        },
    )
    .await?;
    tx.commit().await?;

    let addresses = vec![
        IpNet::V4(Ipv4Net::new(ipv4, network.cidr.prefix_len()).map_err(prefix)?),
        IpNet::V6(Ipv6Net::new(ipv6, network.cidr6.prefix_len()).map_err(prefix)?),
    ];
    Ok(Done {
        network: network.id,
        response: EnrollResponse {
            name: node.name,
            network: network.name,
            spiffe_id,
            cert_pem: cert.pem,
            ca_pem: hub.ca.ca_pem().to_string(),
            addresses,
        },
    })
}

fn prefix(e: ipnet::PrefixLenError) -> EnrollFailure {
    EnrollFailure::Store(StoreError::Corrupt(format!("network prefix: {e}")))
}

/// A control-channel refusal.
pub fn refuse(code: &str, message: String) -> ControlError {
    ControlError {
        code: code.to_string(),
        message,
    }
}
