//! Networks and join tokens.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};
use ztnet_proto::JoinToken;
use ztnet_proto::admin::{CreateNetwork, CreateToken, Network, TokenCreated, TokenInfo};
use ztnet_proto::token::secret_hash;

use super::Actor;
use super::error::{ApiErr, ApiJson};
use crate::hub::Hub;
use crate::names;
use crate::store::{self, audit, networks, nodes, tokens, unix_now};

/// The shared address space every network's IPv4 prefix must sit in (RFC 6598).
const SHARED_SPACE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(n) => n,
    Err(_) => panic!("100.64.0.0/10 is a valid prefix"),
};
/// Most uses a token may carry.
const MAX_USES: u32 = 10_000;
/// Longest token lifetime: 30 days.
const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Most tags on a token.
const MAX_TAGS: usize = 32;

/// `POST /v1/networks`.
pub async fn create(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    ApiJson(req): ApiJson<CreateNetwork>,
) -> Result<Json<Network>, ApiErr> {
    names::network(&req.name).map_err(ApiErr::BadRequest)?;
    let requested = req.cidr.map(check_cidr).transpose()?;

    let mut tx = hub.store.write().await?;
    let existing = networks::list_in(&mut tx).await?;
    if existing.iter().any(|n| n.name == req.name) {
        return Err(ApiErr::Conflict(format!(
            "network {} already exists",
            req.name
        )));
    }
    let cidr = match requested {
        Some(c) => {
            if let Some(other) = existing.iter().find(|n| overlaps(n.cidr, c)) {
                return Err(ApiErr::Conflict(format!(
                    "cidr {c} overlaps network {} ({})",
                    other.name, other.cidr
                )));
            }
            c
        }
        None => free_slash16(&existing).ok_or_else(|| {
            ApiErr::Conflict("no free /16 left in 100.64.0.0/10; pass --cidr".into())
        })?,
    };
    let cidr6 = ula_for(&req.name);
    let network = networks::insert(&mut tx, &req.name, cidr, cidr6, req.zero_trust).await?;
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "network.create",
            target: &network.name,
            detail: format!("cidr {cidr}, cidr6 {cidr6}, zero_trust {}", req.zero_trust),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(network = %network.name, %cidr, "network created");
    Ok(Json(describe(&hub, network).await?))
}

/// `GET /v1/networks`.
pub async fn list(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
) -> Result<Json<Vec<Network>>, ApiErr> {
    let mut out = Vec::new();
    for n in networks::list(&hub.store).await? {
        out.push(describe(&hub, n).await?);
    }
    Ok(Json(out))
}

/// `GET /v1/networks/{net}`.
pub async fn show(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Network>, ApiErr> {
    let network = find(&hub, &net).await?;
    Ok(Json(describe(&hub, network).await?))
}

/// `POST /v1/networks/{net}/tokens`.
pub async fn create_token(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path(net): Path<String>,
    ApiJson(req): ApiJson<CreateToken>,
) -> Result<Json<TokenCreated>, ApiErr> {
    let network = find(&hub, &net).await?;
    names::namespace(&req.namespace).map_err(ApiErr::BadRequest)?;
    let mut tags = req.tags.clone();
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(ApiErr::BadRequest(format!(
            "at most {MAX_TAGS} tags are allowed"
        )));
    }
    for t in &tags {
        names::tag(t).map_err(ApiErr::BadRequest)?;
    }
    if req.uses == 0 || req.uses > MAX_USES {
        return Err(ApiErr::BadRequest(format!(
            "uses must be between 1 and {MAX_USES}, not {}",
            req.uses
        )));
    }
    if req.ttl_secs == 0 || req.ttl_secs > MAX_TTL_SECS {
        return Err(ApiErr::BadRequest(format!(
            "ttl must be between 1 second and 30 days, not {} seconds",
            req.ttl_secs
        )));
    }

    let token = JoinToken::generate(hub.advertise.clone(), hub.ca.fingerprint());
    let hash = secret_hash(&token.secret);
    let id = hash[..12].to_string();
    let now = unix_now();
    let expires_at = now + req.ttl_secs;
    let mut tx = hub.store.write().await?;
    tokens::insert(
        &mut tx,
        &tokens::NewToken {
            id: &id,
            secret_hash: &hash,
            network: network.id,
            namespace: &req.namespace,
            tags: &tags,
            uses: req.uses,
            expires_at,
            created_by: &actor.0,
            created_at: now,
        },
    )
    .await?;
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "token.create",
            target: &id,
            detail: format!(
                "namespace {}, tags [{}], uses {}, expires at {}",
                req.namespace,
                tags.join(","),
                req.uses,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at)
                )
            ),
        },
    )
    .await?;
    let info = tokens::find(&mut tx, network.id, &id)
        .await?
        .ok_or_else(|| ApiErr::Internal(store::StoreError::Corrupt("token vanished".into())))?;
    tx.commit().await?;
    Ok(Json(TokenCreated {
        info,
        token: token.encode().to_string(),
    }))
}

/// `GET /v1/networks/{net}/tokens`.
pub async fn list_tokens(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Vec<TokenInfo>>, ApiErr> {
    let network = find(&hub, &net).await?;
    Ok(Json(tokens::list(&hub.store, network.id).await?))
}

/// `DELETE /v1/networks/{net}/tokens/{id}`.
pub async fn revoke_token(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, id)): Path<(String, String)>,
) -> Result<Json<TokenInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let mut tx = hub.store.write().await?;
    // Revoking twice changes nothing and writes no second audit entry.
    if let Some(info) = tokens::find(&mut tx, network.id, &id).await?
        && info.revoked
    {
        return Ok(Json(info));
    }
    if !tokens::revoke(&mut tx, network.id, &id).await? {
        return Err(ApiErr::NotFound(format!("network {net} has no token {id}")));
    }
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "token.revoke",
            target: &id,
            detail: String::new(),
        },
    )
    .await?;
    let info = tokens::find(&mut tx, network.id, &id)
        .await?
        .ok_or_else(|| ApiErr::NotFound(format!("network {net} has no token {id}")))?;
    tx.commit().await?;
    Ok(Json(info))
}

/// The network called `name`, or 404.
pub(super) async fn find(hub: &Hub, name: &str) -> Result<networks::Network, ApiErr> {
    networks::by_name(&hub.store, name)
        .await?
        .ok_or_else(|| ApiErr::NotFound(format!("no network named {name:?}")))
}

/// `PATCH /v1/networks/{net}`: a new key life; every netmap is recomputed, so peers drop a
/// key that is older than the new life at once.
pub async fn set(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path(net): Path<String>,
    ApiJson(req): ApiJson<ztnet_proto::admin::NetworkSettings>,
) -> Result<Json<Network>, ApiErr> {
    let network = find(&hub, &net).await?;
    if let Some(ttl) = req.key_ttl_secs {
        crate::rotation::check_ttl(ttl).map_err(ApiErr::BadRequest)?;
        if !network.zero_trust {
            // Stored it would change nothing: keys expire only in a zero-trust network.
            return Err(ApiErr::Conflict(format!(
                "network {:?} is not a --zero-trust network: its node keys do not expire, so a \
                 key life would have no effect (create the network with --zero-trust)",
                network.name
            )));
        }
        let mut tx = hub.store.write().await?;
        crate::rotation::set_key_ttl(&mut tx, network.id, ttl).await?;
        audit::append(
            &mut tx,
            audit::Entry {
                network: Some(network.id),
                actor: &actor.0,
                action: "network.set",
                target: &network.name,
                detail: format!("key_ttl {ttl} s"),
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(network = %network.name, key_ttl = ttl, "network key life set");
        hub.recompute(network.id).await?;
    }
    Ok(Json(describe(&hub, network).await?))
}

async fn describe(hub: &Hub, n: networks::Network) -> Result<Network, ApiErr> {
    let mut conn = hub.store.pool().acquire().await?;
    let key_ttl_secs = crate::rotation::key_ttl(&mut conn, &n).await?;
    drop(conn);
    Ok(Network {
        key_ttl_secs,
        nodes: nodes::count(&hub.store, n.id).await?,
        policy_version: hub.effective(n.id).version,
        name: n.name,
        cidr: IpNet::V4(n.cidr),
        cidr6: IpNet::V6(n.cidr6),
        zero_trust: n.zero_trust,
        created_at: n.created_at,
    })
}

fn check_cidr(cidr: IpNet) -> Result<Ipv4Net, ApiErr> {
    let IpNet::V4(v4) = cidr else {
        return Err(ApiErr::BadRequest(format!(
            "cidr {cidr} is IPv6; give an IPv4 prefix inside 100.64.0.0/10 (the IPv6 prefix is \
             derived from the network name)"
        )));
    };
    if v4.trunc() != v4 {
        return Err(ApiErr::BadRequest(format!(
            "cidr {v4} has host bits set; did you mean {}?",
            v4.trunc()
        )));
    }
    if !SHARED_SPACE.contains(&v4) {
        return Err(ApiErr::BadRequest(format!(
            "cidr {v4} is outside 100.64.0.0/10, the only range overlay networks may use"
        )));
    }
    if v4.prefix_len() > 28 {
        return Err(ApiErr::BadRequest(format!(
            "cidr {v4} is too small; use /28 or larger"
        )));
    }
    Ok(v4)
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn free_slash16(existing: &[networks::Network]) -> Option<Ipv4Net> {
    SHARED_SPACE
        .subnets(16)
        .ok()?
        .find(|c| !existing.iter().any(|n| overlaps(n.cidr, *c)))
}

/// A ULA /64 derived from the network name: `fd` followed by 56 bits of its SHA-256.
fn ula_for(name: &str) -> Ipv6Net {
    let hash = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes[0] = 0xfd;
    bytes[1..8].copy_from_slice(&hash[..7]);
    // 64 is a valid IPv6 prefix length.
    Ipv6Net::new(Ipv6Addr::from(bytes), 64).expect("/64 is a valid prefix length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_outside_shared_space_are_refused() {
        assert!(check_cidr("100.64.0.0/16".parse().unwrap()).is_ok());
        assert!(check_cidr("100.127.0.0/16".parse().unwrap()).is_ok());
        assert!(check_cidr("10.0.0.0/16".parse().unwrap()).is_err());
        assert!(check_cidr("100.64.0.1/16".parse().unwrap()).is_err());
        assert!(check_cidr("100.0.0.0/8".parse().unwrap()).is_err());
        assert!(check_cidr("fd00::/64".parse().unwrap()).is_err());
    }

    #[test]
    fn ula_is_stable_and_in_fd00_8() {
        let a = ula_for("prod-vpc");
        assert_eq!(a, ula_for("prod-vpc"));
        assert_ne!(a, ula_for("dev"));
        assert_eq!(a.addr().octets()[0], 0xfd);
        assert_eq!(a.prefix_len(), 64);
    }
}
