//! The admin API: HTTP/1.1 and JSON over TLS on the coordinator's TCP port, authenticated by
//! bearer API keys. The routes are the table in `ztnet_proto::admin`; errors are mapped to
//! status codes in [`error`] only. Every change runs in one transaction with its audit entry.

mod ca;
pub mod error;
mod keys;
mod networks;
mod nodes;
mod policy;
mod workloads;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::{delete, get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::hub::Hub;
use crate::store::keys as key_store;
use error::ApiErr;

/// The routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/v1/health", get(policy::health))
        .route("/v1/ca", get(ca::show))
        .route("/v1/ca/rotate", post(ca::rotate))
        .route("/v1/ca/activate", post(ca::activate))
        .route("/v1/api-keys", post(keys::create).get(keys::list))
        .route("/v1/api-keys/{name}", delete(keys::revoke))
        .route("/v1/networks", post(networks::create).get(networks::list))
        .route(
            "/v1/networks/{net}",
            get(networks::show).patch(networks::set),
        )
        .route(
            "/v1/networks/{net}/tokens",
            post(networks::create_token).get(networks::list_tokens),
        )
        .route(
            "/v1/networks/{net}/tokens/{id}",
            delete(networks::revoke_token),
        )
        .route("/v1/networks/{net}/nodes", get(nodes::list))
        .route(
            "/v1/networks/{net}/nodes/{name}",
            get(nodes::show).delete(nodes::delete),
        )
        .route(
            "/v1/networks/{net}/nodes/{name}/revoke",
            post(nodes::revoke),
        )
        .route(
            "/v1/networks/{net}/nodes/{name}/rotate-key",
            post(nodes::rotate_key),
        )
        .route(
            "/v1/networks/{net}/nodes/{name}/endpoint",
            axum::routing::put(nodes::set_endpoint),
        )
        .route(
            "/v1/networks/{net}/policy",
            axum::routing::put(policy::apply).get(policy::show),
        )
        .route("/v1/networks/{net}/policy/history", get(policy::history))
        .route("/v1/networks/{net}/policy/preview", post(policy::preview))
        .route("/v1/networks/{net}/audit", get(policy::audit))
        .route("/v1/audit", get(policy::audit_global))
        .route(
            "/v1/networks/{net}/workloads",
            post(workloads::register).get(workloads::list),
        )
        .route(
            "/v1/networks/{net}/workloads/{id}",
            get(workloads::show).delete(workloads::delete),
        )
        .fallback(error::not_found)
        .with_state(hub)
}

pub use ca::drive as drive_ca_rotation;

/// Accepts TLS connections and serves the API on each until the listener fails.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Running out of file descriptors is the usual cause; back off and go on.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return debug!(%remote, error = %e, "admin TLS handshake failed"),
                    Err(_) => return debug!(%remote, "admin TLS handshake timed out"),
                };
            let service = TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                debug!(%remote, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// The caller, authenticated: the name of its API key.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl FromRequestParts<Arc<Hub>> for Actor {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, ApiErr> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiErr::Unauthorized(
                "missing API key: send Authorization: Bearer ztkey_...",
            ))?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(ApiErr::Unauthorized(
                "Authorization header is not 'Bearer KEY'",
            ))?;
        match key_store::authenticate(&hub.store, presented).await? {
            Some(name) => Ok(Actor(name)),
            None => Err(ApiErr::Unauthorized("API key not recognised")),
        }
    }
}
