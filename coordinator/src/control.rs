//! The control server: QUIC on UDP, TLS 1.3 with ALPN `ztnet/1`, client certificates optional
//! at the TLS layer so that a node without one can enroll. Each connection carries one
//! bidirectional stream of framed JSON messages (see `ztnet_proto::control`).
//!
//! A session (a connection that starts with `Hello`) must present a node certificate that the
//! CA issued and that maps to an active node; it then gets its full netmap, deltas after that,
//! and may send acknowledgements, reports and renewal requests. A node's new session replaces
//! its live one; with `Hello::replaces` (a re-authentication ahead of a `max_session`
//! deadline, see `crate::posture`) that is logged as such, and the node stays online throughout.
//!
//! A node certificate that has expired (FC-22: a machine that was off longer than the
//! certificate's life) still opens a session when it is on record for an active node, expired
//! at most the renewal window ago (`ZTNET_EXPIRED_RENEW_GRACE_SECS`, 30 days by default), and
//! is for the node's TLS key on record (the SHA-256 of the SubjectPublicKeyInfo of the
//! certificate last issued to it; a mismatch is refused with `cert-key-mismatch`). Such a
//! session is renewal-only: its one message after `Hello` must be `Renew`, which is answered as
//! a normal renewal and audited as `node.cert-renew-expired`; anything else is refused with
//! `renewal-only`. It gets no netmap and is not counted as online.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::{Instrument, debug, info, info_span, warn};
use ztnet_proto::control::{
    ControlError, Hello, MAX_FLOWS_ANSWERED, NetmapUpdate, NodeMsg, ServerMsg,
};
use ztnet_proto::frame;

use crate::enroll::{enroll, refuse};
use crate::hub::{Attached, Hub, SessionEvent};
use crate::netmap;
use crate::store::nodes::{self, Node};

/// How long a new connection may take to open its stream and send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the node to read a final message before the connection is closed.
const LINGER: Duration = Duration::from_secs(5);

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, hub: Arc<Hub>) {
    while let Some(incoming) = endpoint.accept().await {
        let hub = hub.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle(conn, hub).await,
                Err(e) => debug!(%remote, error = %e, "control handshake failed"),
            }
        });
    }
}

async fn handle(conn: Connection, hub: Arc<Hub>) {
    let remote = conn.remote_address();
    let (mut send, mut recv) = match timeout(FIRST_MESSAGE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "control connection ended before its stream");
            return;
        }
        Err(_) => {
            debug!(%remote, "no control stream in time");
            conn.close(1u32.into(), b"timeout");
            return;
        }
    };
    let first = match timeout(FIRST_MESSAGE_TIMEOUT, frame::read::<_, NodeMsg>(&mut recv)).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            // A well-framed message with a bad field (a non-canonical key, say) is the
            // sender's mistake in content; anything else breaks the protocol itself.
            let code = match e {
                frame::FrameError::Malformed(_) => "bad-request",
                _ => "protocol",
            };
            let err = refuse(code, format!("first message refused: {e}"));
            return close_with(&conn, &mut send, err).await;
        }
        Err(_) => {
            let err = refuse("protocol", "no first message in time".into());
            return close_with(&conn, &mut send, err).await;
        }
    };
    match first {
        NodeMsg::Enroll(req) => {
            let span = info_span!("enroll", node = %req.name, %remote);
            async {
                match enroll(&hub, &req, remote).await {
                    Ok(resp) => {
                        if let Err(e) = frame::write(&mut send, &ServerMsg::Enrolled(resp)).await {
                            warn!(error = %e, "enrollment answer not delivered");
                        }
                        linger(&conn, &mut send).await;
                        conn.close(0u32.into(), b"enrolled");
                    }
                    Err(err) => close_with(&conn, &mut send, err).await,
                }
            }
            .instrument(span)
            .await;
        }
        NodeMsg::Hello(hello) => session(conn, send, recv, hello, hub).await,
        _ => {
            let err = refuse(
                "protocol",
                "a connection must start with enroll or hello".into(),
            );
            close_with(&conn, &mut send, err).await;
        }
    }
}

/// Finds the active node that the connection's client certificate belongs to, and when the
/// certificate expired if it has (only within the renewal window; past it, refused).
async fn authenticate(conn: &Connection, hub: &Hub) -> Result<(Node, Option<u64>), ControlError> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            refuse(
                "unknown-node",
                "no node certificate presented; enroll with a join token first".into(),
            )
        })?;
    let serial = crate::ca::serial_of(&certs[0])
        .ok_or_else(|| refuse("unknown-node", "node certificate does not parse".into()))?;
    let node = nodes::by_cert_serial(&hub.store, &serial)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "node lookup failed");
            refuse("internal", "node lookup failed".into())
        })?
        .ok_or_else(|| {
            refuse(
                "unknown-node",
                "this node certificate is not on record".into(),
            )
        })?;
    if !node.is_active() {
        let why = match (&node.revoked_at, &node.revoke_reason) {
            (Some(_), Some(reason)) if !reason.is_empty() => format!("revoked: {reason}"),
            (Some(_), _) => "revoked".to_owned(),
            _ => "deleted".to_owned(),
        };
        return Err(refuse(
            "revoked",
            format!(
                "node {} was {why}; enroll again with a new token, as a new node",
                node.name
            ),
        ));
    }
    let not_after = crate::ca::not_after_of(&certs[0])
        .ok_or_else(|| refuse("unknown-node", "node certificate does not parse".into()))?;
    let now = crate::store::unix_now();
    if not_after >= now {
        fill_tls_key(hub, &node, &certs[0]).await;
        return Ok((node, None));
    }
    let grace = crate::ca::renew_grace().as_secs();
    if now - not_after > grace {
        return Err(refuse(
            "cert-expired",
            format!(
                "node certificate of {} expired at {} ({} days ago), beyond the renewal window \
                 of {} days: expired beyond the renewal window; enroll again",
                node.name,
                rfc3339(not_after),
                (now - not_after) / 86_400,
                grace / 86_400
            ),
        ));
    }
    check_tls_key(hub, &node, &certs[0]).await?;
    Ok((node, Some(not_after)))
}

/// Refuses an expired certificate whose key is not the node's TLS key on record: the serial
/// alone does not show that the certificate is the one issued to this node. A node enrolled
/// before keys were recorded passes on its serial, with a warning; its renewal records its key.
async fn check_tls_key(
    hub: &Hub,
    node: &Node,
    cert: &CertificateDer<'_>,
) -> Result<(), ControlError> {
    let presented = nodes::tls_key_hash(cert.as_ref())
        .ok_or_else(|| refuse("unknown-node", "node certificate does not parse".into()))?;
    let on_record = nodes::tls_key(&hub.store, node.id).await.map_err(|e| {
        tracing::error!(error = %e, "TLS key lookup failed");
        refuse("internal", "node lookup failed".into())
    })?;
    match on_record {
        Some(key) if key == presented => Ok(()),
        Some(_) => {
            warn!(
                node = %node.name,
                "expired node certificate refused: its serial is on record for this node but \
                 its key is not the node's TLS key on record"
            );
            Err(refuse(
                "cert-key-mismatch",
                format!(
                    "this expired certificate names node {} but is not for the TLS key on \
                     record for it (the key of its last enrollment or renewal): not renewed; \
                     enroll again with a new token if this node's tls.key was replaced",
                    node.name
                ),
            ))
        }
        None => {
            warn!(
                node = %node.name,
                "node {} has no TLS key on record (enrolled before keys were recorded): its \
                 expired certificate is accepted on its serial alone; its renewal records its \
                 key",
                node.name
            );
            Ok(())
        }
    }
}

/// Records the key of a valid certificate for a node that has none on record yet.
async fn fill_tls_key(hub: &Hub, node: &Node, cert: &CertificateDer<'_>) {
    let Some(hash) = nodes::tls_key_hash(cert.as_ref()) else {
        return;
    };
    match nodes::fill_tls_key(&hub.store, node.id, &hash).await {
        Ok(true) => info!(node = %node.name, "TLS key of the node recorded"),
        Ok(false) => {}
        Err(e) => debug!(error = %e, "TLS key not recorded"),
    }
}

fn rfc3339(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn session(
    conn: Connection,
    mut send: SendStream,
    recv: RecvStream,
    hello: Hello,
    hub: Arc<Hub>,
) {
    let remote = conn.remote_address();
    let (node, expired_at) = match authenticate(&conn, &hub).await {
        Ok(n) => n,
        Err(err) => {
            info!(%remote, code = %err.code, "control session refused");
            return close_with(&conn, &mut send, err).await;
        }
    };
    if hello.protocol != ztnet_proto::PROTOCOL_VERSION {
        let err = refuse(
            "protocol",
            format!(
                "node speaks protocol {}, coordinator {}",
                hello.protocol,
                ztnet_proto::PROTOCOL_VERSION
            ),
        );
        return close_with(&conn, &mut send, err).await;
    }
    let span = info_span!("session", node = %node.name, %remote);
    match expired_at {
        None => {
            run_session(conn, send, recv, hello, hub, node)
                .instrument(span)
                .await;
        }
        Some(at) => {
            renewal_only(conn, send, recv, hub, node, at)
                .instrument(span)
                .await;
        }
    }
}

/// A session on an expired certificate: one `Renew`, answered, then the connection closes.
async fn renewal_only(
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    hub: Arc<Hub>,
    node: Node,
    expired_at: u64,
) {
    info!(
        expired_at = %rfc3339(expired_at),
        "renewal-only session on an expired node certificate"
    );
    let msg = match timeout(FIRST_MESSAGE_TIMEOUT, frame::read::<_, NodeMsg>(&mut recv)).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let err = refuse("protocol", format!("unreadable message: {e}"));
            return close_with(&conn, &mut send, err).await;
        }
        Err(_) => {
            let err = refuse("protocol", "no renewal request in time".into());
            return close_with(&conn, &mut send, err).await;
        }
    };
    let NodeMsg::Renew { csr_pem } = msg else {
        let err = refuse(
            "renewal-only",
            format!(
                "the node certificate expired at {}: this session may only renew it (send \
                 renew); {} refused",
                rfc3339(expired_at),
                msg_kind(&msg)
            ),
        );
        return close_with(&conn, &mut send, err).await;
    };
    let detail = format!("certificate expired at {}", rfc3339(expired_at));
    let audit = Some(("node.cert-renew-expired", detail));
    match renew(&hub, &node, &mut send, &csr_pem, audit).await {
        Ok(()) => {
            linger(&conn, &mut send).await;
            conn.close(0u32.into(), b"renewed");
        }
        Err(err) => close_with(&conn, &mut send, err).await,
    }
}

/// The name of a node message, for refusals.
fn msg_kind(msg: &NodeMsg) -> &'static str {
    match msg {
        NodeMsg::Enroll(_) => "enroll",
        NodeMsg::Hello(_) => "hello",
        NodeMsg::Ack { .. } => "ack",
        NodeMsg::Report(_) => "report",
        NodeMsg::Renew { .. } => "renew",
        NodeMsg::RotateKey { .. } => "rotate-key",
        NodeMsg::Resync { .. } => "resync",
        NodeMsg::Posture(_) => "posture",
        NodeMsg::WorkloadList { .. } => "workload-list",
        NodeMsg::SignSvid { .. } => "sign-svid",
        NodeMsg::Flows { .. } => "flows",
    }
}

/// Signs a new node certificate from `csr_pem`, records it (with an audit entry when `audit`
/// names one), and sends it.
async fn renew(
    hub: &Hub,
    node: &Node,
    send: &mut SendStream,
    csr_pem: &str,
    audit: Option<(&str, String)>,
) -> Result<(), ControlError> {
    let internal = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "database failed");
        refuse("internal", "database failure".into())
    };
    let cert = hub
        .ca
        .issue_node(csr_pem, &node.spiffe_id)
        .map_err(|e| refuse("bad-request", e.to_string()))?;
    let mut tx = hub.store.write().await.map_err(internal)?;
    nodes::add_cert(&mut tx, node.id, &cert.serial, cert.not_after)
        .await
        .map_err(internal)?;
    let key = nodes::tls_key_hash_pem(&cert.pem).ok_or_else(|| {
        internal(crate::store::StoreError::Corrupt(
            "the certificate just issued does not parse".into(),
        ))
    })?;
    nodes::set_tls_key(&mut tx, node.id, &key)
        .await
        .map_err(internal)?;
    if let Some((action, detail)) = audit {
        crate::store::audit::append(
            &mut tx,
            crate::store::audit::Entry {
                network: Some(node.network),
                actor: &format!("node:{}", node.name),
                action,
                target: &node.name,
                detail,
            },
        )
        .await
        .map_err(internal)?;
    }
    tx.commit().await.map_err(|e| internal(e.into()))?;
    info!(not_after = cert.not_after, "node certificate renewed");
    let answer = ServerMsg::Renewed {
        cert_pem: cert.pem,
        ca_pem: hub.ca.ca_pem().to_string(),
    };
    frame::write(send, &answer)
        .await
        .map_err(|e| refuse("protocol", e.to_string()))
}

async fn run_session(
    conn: Connection,
    mut send: SendStream,
    recv: RecvStream,
    hello: Hello,
    hub: Arc<Hub>,
    node: Node,
) {
    let remote = conn.remote_address();
    if let Err(e) = record_report(&hub, &node, remote, &hello.report).await {
        tracing::error!(error = %e, "storing the node's report failed");
    }
    let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    let replacing = hello.replaces && hub.is_online(node.id);
    let (tx, mut events) = mpsc::unbounded_channel();
    match hub.attach(&node, conn_id, remote, tx).await {
        Ok(Attached::Live) => {}
        Ok(Attached::Gone) => {
            // Revoked or deleted after `authenticate`: the same check now gives the reason.
            let err = match authenticate(&conn, &hub).await {
                Err(err) => err,
                Ok(_) => refuse("revoked", "node is no longer active".into()),
            };
            return close_with(&conn, &mut send, err).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "netmap for the new session failed");
            let err = refuse(
                "internal",
                "the coordinator could not build the netmap".into(),
            );
            return close_with(&conn, &mut send, err).await;
        }
    }
    if hello.has_feature(ztnet_proto::control::FEATURE_FLOWS) {
        hub.enable_flow_queries(node.id, conn_id);
    }
    if replacing {
        // The node's re-authentication ahead of its max_session deadline: the old session was
        // replaced in `attach` and closes without taking the node offline.
        info!(
            have = ?hello.have_version.map(|v| v.0),
            "control session re-authenticated: it replaces the node's previous session"
        );
    } else {
        info!(have = ?hello.have_version.map(|v| v.0), "control channel connected");
    }

    let mut messages = spawn_reader(recv);
    let mut sent = None;
    let reason = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(SessionEvent::Netmap { full, delta }) => {
                    let update = match delta {
                        Some(d) if Some(d.from) == sent => NetmapUpdate::Delta(*d),
                        _ => NetmapUpdate::Full((*full).clone()),
                    };
                    sent = Some(full.version);
                    if let Err(e) = frame::write(&mut send, &ServerMsg::Netmap(update)).await {
                        break format!("push failed: {e}");
                    }
                }
                Some(SessionEvent::Send(msg)) => {
                    // A node that does not re-authenticate by itself would not know it.
                    if matches!(*msg, ServerMsg::SessionDeadline { .. }) && !hello.reauthenticates {
                        continue;
                    }
                    if let Err(e) = frame::write(&mut send, msg.as_ref()).await {
                        break format!("push failed: {e}");
                    }
                }
                Some(SessionEvent::Close(err)) => {
                    info!(code = %err.code, "closing control channel");
                    close_with(&conn, &mut send, err).await;
                    break "closed by the coordinator".into();
                }
                None => break "session dropped".into(),
            },
            msg = messages.recv() => match msg {
                Some(Ok(m)) => {
                    if let Err(err) = on_message(&hub, &node, remote, &mut send, m).await {
                        close_with(&conn, &mut send, err).await;
                        break "protocol error".into();
                    }
                }
                Some(Err(e)) => {
                    let err = refuse("protocol", format!("unreadable message: {e}"));
                    close_with(&conn, &mut send, err).await;
                    break "unreadable message".into();
                }
                None => break "stream ended".into(),
            },
            e = conn.closed() => break format!("connection closed: {e}"),
        }
    };
    hub.detach(node.id, conn_id);
    if let Err(e) = nodes::touch(&hub.store, node.id).await {
        debug!(error = %e, "last_seen not stored");
    }
    info!(%reason, "control channel lost");
}

async fn on_message(
    hub: &Arc<Hub>,
    node: &Node,
    remote: SocketAddr,
    send: &mut SendStream,
    msg: NodeMsg,
) -> Result<(), ControlError> {
    let internal = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "database failed");
        refuse("internal", "database failure".into())
    };
    match msg {
        NodeMsg::Ack { version } => {
            debug!(version = version.0, "netmap acknowledged");
            nodes::record_ack(&hub.store, node.id, version.0)
                .await
                .map_err(internal)?;
        }
        NodeMsg::Report(report) => {
            let changed = record_report(hub, node, remote, &report)
                .await
                .map_err(internal)?;
            if changed {
                debug!("endpoints changed");
                hub.recompute(node.network).await.map_err(internal)?;
            }
        }
        NodeMsg::Renew { csr_pem } => renew(hub, node, send, &csr_pem, None).await?,
        NodeMsg::RotateKey { public_key } => {
            info!(next = %public_key.short(), "node proposed a new key");
            tokio::spawn(crate::rotation::propose(
                hub.clone(),
                node.clone(),
                public_key,
            ));
        }
        NodeMsg::Resync { reason } => {
            let reason: String = reason.chars().take(300).collect();
            warn!(%reason, "node asked for a fresh netmap");
            hub.resend_full(node).await.map_err(internal)?;
        }
        NodeMsg::Posture(posture) => {
            crate::posture::on_report(hub, node, posture)
                .await
                .map_err(internal)?;
        }
        NodeMsg::WorkloadList { request_id } => {
            let answer = crate::workload::list(hub, node, request_id).await;
            frame::write(send, &answer)
                .await
                .map_err(|e| refuse("protocol", e.to_string()))?;
        }
        NodeMsg::SignSvid {
            request_id,
            spiffe_id,
            csr_pem,
        } => {
            let answer = crate::workload::sign(hub, node, request_id, &spiffe_id, &csr_pem).await;
            frame::write(send, &answer)
                .await
                .map_err(|e| refuse("protocol", e.to_string()))?;
        }
        NodeMsg::Flows {
            id,
            mut flows,
            truncated,
        } => {
            let truncated = truncated || flows.len() > MAX_FLOWS_ANSWERED;
            flows.truncate(MAX_FLOWS_ANSWERED);
            hub.answer_flows(node.id, id, crate::hub::FlowAnswer { flows, truncated });
        }
        NodeMsg::Enroll(_) | NodeMsg::Hello(_) => {
            return Err(refuse(
                "protocol",
                "enroll and hello are only valid as the first message".into(),
            ));
        }
    }
    Ok(())
}

async fn record_report(
    hub: &Hub,
    node: &Node,
    remote: SocketAddr,
    report: &ztnet_proto::control::Report,
) -> Result<bool, crate::store::StoreError> {
    let endpoints = netmap::endpoints(remote.ip(), report.listen_port, &report.endpoints);
    let version: String = report.version.chars().take(64).collect();
    nodes::record_report(
        &hub.store,
        node.id,
        report.listen_port,
        &endpoints,
        &version,
    )
    .await
}

/// Reads frames on their own task: `frame::read` is not cancel-safe, so it must not sit in a
/// `select!` next to the pushes.
fn spawn_reader(mut recv: RecvStream) -> mpsc::Receiver<Result<NodeMsg, frame::FrameError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let msg = frame::read::<_, NodeMsg>(&mut recv).await;
            let end = !matches!(msg, Ok(Some(_)));
            let item = match msg {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    rx
}

/// Sends a refusal, lets the node read it, then closes the connection.
async fn close_with(conn: &Connection, send: &mut SendStream, err: ControlError) {
    let _ = frame::write(send, &ServerMsg::Error(err)).await;
    linger(conn, send).await;
    conn.close(1u32.into(), b"refused");
}

async fn linger(conn: &Connection, send: &mut SendStream) {
    let _ = send.finish();
    tokio::select! {
        _ = timeout(LINGER, send.stopped()) => {}
        _ = conn.closed() => {}
    }
}
