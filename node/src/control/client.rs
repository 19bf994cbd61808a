//! The I/O shell of the control client: QUIC connections to the coordinator, enrollment, and
//! the session loop that applies netmaps, acknowledges them, reports endpoints and renews the
//! node certificate. The decisions are made by the core in [`crate::control`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use ztnet_proto::control::{
    ControlError, EnrollRequest, Hello, NetmapUpdate, NetmapVersion, NodeMsg, Report, ServerMsg,
};
use ztnet_proto::token::fingerprint;
use ztnet_proto::{COORDINATOR_SERVER_NAME, JoinToken, PROTOCOL_VERSION, TokenError, frame};

use crate::control::{
    Backoff, CachedNetmap, CertTime, CertValidity, DataplaneSink, NetmapTracker, Refusal,
    UpdateRefused, classify, dataplane_config, deny_all_config, expired_peers, judge_cached,
    reauth_delay, rotation_due, tls, unix_to_rfc3339,
};
use crate::dataplane::peers::{KeyMismatch, MismatchKind};
use crate::state::{Enrollment, NodeCerts, StateDir, StateError, new_tls_key};

/// How often endpoints are reported (and checked for change).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// How long to wait for an answer to a renewal before asking again.
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How long a renewal of an expired certificate waits for the coordinator's answer.
const EXPIRED_RENEW_TIMEOUT: Duration = Duration::from_secs(20);
/// How long enrollment waits for the coordinator's answer.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a QUIC handshake may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval of the control channel.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Silence after which the control channel counts as lost.
const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// A session that lasted this long was healthy: the next reconnect starts the backoff over.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How often key rotation and key mismatches are looked at.
const KEY_TICK: Duration = Duration::from_millis(250);
/// How long a proposed key waits for the coordinator's answer before it is proposed again.
const ROTATE_RETRY: Duration = Duration::from_secs(30);
/// Fewest time between two requests for a fresh netmap.
const RESYNC_SPACING: Duration = Duration::from_secs(2);
/// Fresh netmaps asked for one peer's mismatch before the node stops asking for a while.
const RESYNC_ATTEMPTS: u32 = 3;
/// How long the node stops asking after [`RESYNC_ATTEMPTS`] did not heal a mismatch.
const RESYNC_QUIET: Duration = Duration::from_secs(60);
/// How long a re-authentication waits for its new session's first message.
const REAUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a failed re-authentication is tried again, while the deadline is ahead.
const REAUTH_RETRY: Duration = Duration::from_secs(1);
/// The next WireGuard key while a rotation is under way (0600, like `wg.key`).
const NEXT_WG_KEY: &str = "wg.key.next";

/// What the control client needs to run. Its `Debug` hides the token.
#[derive(Clone)]
pub struct NodeOptions {
    /// The state directory.
    pub state: StateDir,
    /// `HOST:PORT` of the coordinator; overrides the token's and the stored address.
    pub coordinator: Option<String>,
    /// Join token, needed only when the node is not enrolled yet.
    pub token: Option<String>,
    /// Node name to request at enrollment.
    pub name: String,
    /// ztnet-node version, sent in reports.
    pub version: String,
    /// Share of the node certificate's life after which it is renewed; 0.5 in production.
    pub renew_fraction: f64,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("state", &self.state)
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "redacted"))
            .field("name", &self.name)
            .field("version", &self.version)
            .field("renew_fraction", &self.renew_fraction)
            .finish()
    }
}

/// Why the control client stopped.
#[derive(Debug, Clone)]
pub enum Exit {
    /// The shutdown future completed.
    Shutdown,
    /// The coordinator revoked the node: the data plane passes nothing, the netmap on disk is
    /// gone.
    Revoked(ControlError),
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The node is not enrolled and no token was given.
    #[error(
        "this node is not enrolled yet: start it once with --token (from `ztnet token create`)"
    )]
    NoToken,
    /// The token string does not parse.
    #[error("{0}; this node needs a new token (`ztnet token create`)")]
    Token(TokenError),
    /// The coordinator said no.
    #[error("{}", refusal_sentence(.0))]
    Refused(ControlError),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Connecting or talking failed.
    #[error("enrollment with the coordinator at {coordinator} failed: {}", causes(.reason))]
    Connect {
        /// Address dialled.
        coordinator: String,
        /// The cause.
        reason: anyhow::Error,
    },
}

// The token error is in the message, and is not also a `source()`, so that a printed cause
// chain says it once.
impl From<TokenError> for EnrollError {
    fn from(e: TokenError) -> EnrollError {
        EnrollError::Token(e)
    }
}

/// An error and its causes on one line, each cause once.
fn causes(e: &anyhow::Error) -> String {
    ztnet_proto::report::chain(e.as_ref())
}

fn refusal_sentence(e: &ControlError) -> String {
    match classify(e) {
        Refusal::NeedsNewToken => format!(
            "the coordinator refused the join token: {} ({}); this node needs a new token \
             (`ztnet token create`)",
            e.message, e.code
        ),
        Refusal::NameTaken => format!(
            "the coordinator refused the name: {} ({}); start with another --name",
            e.message, e.code
        ),
        _ => format!(
            "the coordinator refused enrollment: {} ({})",
            e.message, e.code
        ),
    }
}

/// Runs coordinator mode on `sink` until `shutdown` completes or the node is revoked: enrolls
/// if needed, starts from the netmap on disk when it is still valid, then keeps the control
/// channel up.
pub async fn run<S>(
    opts: NodeOptions,
    sink: Arc<dyn DataplaneSink>,
    shutdown: S,
) -> anyhow::Result<Exit>
where
    S: Future<Output = ()>,
{
    run_with_workloads(opts, sink, None, shutdown).await
}

/// [`run`], also serving the workload API's requests to the coordinator through `workloads`.
pub async fn run_with_workloads<S>(
    opts: NodeOptions,
    sink: Arc<dyn DataplaneSink>,
    workloads: Option<Arc<crate::workload::Broker>>,
    shutdown: S,
) -> anyhow::Result<Exit>
where
    S: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let state = opts.state.clone();
    sink.set_control_connected(false);

    let enrollment = match (state.enrollment()?, state.certs()?) {
        (Some(e), Some(_)) => e,
        _ => {
            let token = opts.token.as_deref().ok_or(EnrollError::NoToken)?;
            tokio::select! {
                r = enroll(&opts, token, sink.as_ref()) => r?,
                () = &mut shutdown => return Ok(Exit::Shutdown),
            }
        }
    };
    let coordinator = opts
        .coordinator
        .clone()
        .unwrap_or_else(|| enrollment.coordinator.clone());

    let applier = Arc::new(Applier {
        tracker: Mutex::new(NetmapTracker::default()),
        expired: Mutex::new(Vec::new()),
        self_expired_warned: std::sync::atomic::AtomicBool::new(false),
        sink: sink.clone(),
        state: state.clone(),
        name: enrollment.name.clone(),
    });
    applier.start_from_disk(now_unix());
    let watchdog = tokio::spawn(expiry_watchdog(applier.clone()));
    let _watchdog = AbortOnDrop(watchdog);

    let ctx = Ctx {
        coordinator,
        name: enrollment.name.clone(),
        version: opts.version.clone(),
        renew_fraction: opts.renew_fraction,
        state,
        sink,
        applier,
        workloads,
        current: Mutex::new(None),
    };
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            r = connect_and_serve(&ctx) => r,
            () = &mut shutdown => {
                ctx.say_goodbye().await;
                return Ok(Exit::Shutdown);
            }
        };
        ctx.sink.set_control_connected(false);
        match outcome {
            Ok(SessionEnd::Revoked(e)) => {
                ctx.applier.revoke();
                error!(code = %e.code, "node revoked by the coordinator: {}", e.message);
                return Ok(Exit::Revoked(e));
            }
            Ok(SessionEnd::Lost(reason)) => {
                warn!(coordinator = %ctx.coordinator, "control channel lost: {reason}");
            }
            Err(e) => warn!(coordinator = %ctx.coordinator, "control channel: {}", causes(&e)),
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        debug!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            m = mismatch_seen(ctx.sink.as_ref()) => {
                warn!("{m}; reconnecting now for a fresh netmap");
            }
            () = &mut shutdown => return Ok(Exit::Shutdown),
        }
    }
}

/// Enrolls with a join token: checks the coordinator against the token's CA fingerprint before
/// sending the secret, sends public keys and a CSR, stores the answer.
pub async fn enroll(
    opts: &NodeOptions,
    token: &str,
    sink: &dyn DataplaneSink,
) -> Result<Enrollment, EnrollError> {
    let token = JoinToken::parse(token)?;
    let coordinator = opts
        .coordinator
        .clone()
        .unwrap_or_else(|| token.coordinator.clone());
    let wg = opts.state.wg_key()?;
    let tls_key = opts.state.tls_key()?;
    let failed = |reason: anyhow::Error| EnrollError::Connect {
        coordinator: coordinator.clone(),
        reason,
    };

    let csr_pem = csr_pem(&opts.name, &tls_key).map_err(failed)?;
    let request = EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_secret: token.secret.clone(),
        name: opts.name.clone(),
        wg_public_key: wg.public_key(),
        csr_pem,
        listen_port: sink.listen_port(),
        endpoints: sink.local_endpoints(),
        version: opts.version.clone(),
    };
    let config = tls::enroll_config(&token.ca_fingerprint).map_err(|e| failed(e.into()))?;
    info!(coordinator = %coordinator, name = %opts.name, "enrolling");
    let answer = tokio::time::timeout(
        ENROLL_TIMEOUT,
        exchange_enroll(&coordinator, config, &request),
    )
    .await
    .map_err(|_| failed(anyhow!("no answer within {}s", ENROLL_TIMEOUT.as_secs())))?
    .map_err(failed)?;

    let resp = match answer {
        ServerMsg::Enrolled(r) => r,
        ServerMsg::Error(e) => return Err(EnrollError::Refused(e)),
        other => return Err(failed(anyhow!("unexpected answer {}", msg_kind(&other)))),
    };
    let bundle = tls::certs(&resp.ca_pem, "ca.pem").map_err(|e| failed(e.into()))?;
    if !bundle
        .iter()
        .any(|c| fingerprint(c.as_ref()) == token.ca_fingerprint)
    {
        return Err(failed(anyhow!(
            "the trust bundle sent back does not contain the CA named by the token"
        )));
    }
    CertValidity::from_pem(&resp.cert_pem).map_err(|e| failed(anyhow!(e)))?;

    let enrollment = Enrollment {
        name: resp.name.clone(),
        network: resp.network.clone(),
        spiffe_id: resp.spiffe_id.clone(),
        addresses: resp.addresses.clone(),
        coordinator: coordinator.clone(),
    };
    opts.state.save_certs(&NodeCerts {
        cert_pem: resp.cert_pem,
        ca_pem: resp.ca_pem,
    })?;
    opts.state.save_enrollment(&enrollment)?;
    info!(
        node = %enrollment.name,
        network = %enrollment.network,
        spiffe_id = %enrollment.spiffe_id,
        "enrolled"
    );
    Ok(enrollment)
}

async fn exchange_enroll(
    coordinator: &str,
    config: quinn::ClientConfig,
    request: &EnrollRequest,
) -> anyhow::Result<ServerMsg> {
    let (endpoint, conn) = connect(coordinator, config).await?;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    frame::write(&mut send, &NodeMsg::Enroll(request.clone())).await?;
    let answer: Option<ServerMsg> = frame::read(&mut recv).await?;
    conn.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");
    answer.context("the coordinator closed the stream without answering")
}

/// Everything a session needs.
struct Ctx {
    coordinator: String,
    name: String,
    version: String,
    renew_fraction: f64,
    state: StateDir,
    sink: Arc<dyn DataplaneSink>,
    applier: Arc<Applier>,
    workloads: Option<Arc<crate::workload::Broker>>,
    /// The QUIC endpoint of the session in progress, closed on the way out at a shutdown so
    /// that the coordinator sees the node leave at once instead of at its idle timeout.
    current: Mutex<Option<quinn::Endpoint>>,
}

/// How long a stopping node waits for its goodbye to the coordinator to be sent.
const GOODBYE: Duration = Duration::from_millis(500);

impl Ctx {
    /// Closes the session in progress, if any, and waits (briefly) until the close is sent.
    async fn say_goodbye(&self) {
        let endpoint = lock(&self.current).take();
        if let Some(endpoint) = endpoint {
            endpoint.close(0u32.into(), b"node stopping");
            let _ = tokio::time::timeout(GOODBYE, endpoint.wait_idle()).await;
        }
    }
}

/// How one session ended.
enum SessionEnd {
    /// Revoked or unknown: stop.
    Revoked(ControlError),
    /// Lost for this reason: reconnect.
    Lost(String),
}

async fn connect_and_serve(ctx: &Ctx) -> anyhow::Result<SessionEnd> {
    // At most one renewal of an expired certificate per attempt: when the node's clock still
    // calls the new one expired, the coordinator's check decides.
    let mut renewed = false;
    loop {
        let certs = ctx
            .state
            .certs()?
            .context("the node certificate is missing from the state directory")?;
        let validity = CertValidity::from_pem(&certs.cert_pem).map_err(|e| anyhow!(e))?;
        // This node's clock may be the wrong one: say what it sees, then let the coordinator's
        // check decide, so a skewed clock alone does not keep the node away.
        let now = now_unix();
        let problem = validity.problem(now);
        let expired = !renewed && validity.judge(now) == CertTime::Expired;
        match &problem {
            Some(p) if expired => warn!("{p}"),
            Some(p) => error!("{p}"),
            None => {}
        }
        let key_pem = zeroize::Zeroizing::new(ctx.state.tls_key()?.serialize_pem());
        let config = tls::session_config(&certs.ca_pem, &certs.cert_pem, &key_pem)?;
        let (endpoint, conn) = match connect(&ctx.coordinator, config).await {
            Ok(c) => c,
            Err(e) => {
                return Err(match problem {
                    Some(p) => e.context(p),
                    None => e,
                });
            }
        };
        *lock(&ctx.current) = Some(endpoint.clone());
        let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
        if expired {
            let end = renew_expired(ctx, send, recv, validity).await;
            conn.close(0u32.into(), b"renewed");
            match end? {
                Some(end) => return Ok(end),
                None => {
                    renewed = true;
                    continue;
                }
            }
        }
        let mut conn = conn;
        let end = session(ctx, &endpoint, &mut conn, send, recv, validity).await;
        conn.close(0u32.into(), b"bye");
        return end;
    }
}

/// Renews an expired node certificate on a renewal-only session (FC-22): `Hello`, then
/// `Renew` with a new key, then the answer saved (key, then certificate, each atomically).
/// `None` when renewed; a revocation ends the node; any other refusal is an error that the
/// caller retries with backoff.
async fn renew_expired(
    ctx: &Ctx,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    old: CertValidity,
) -> anyhow::Result<Option<SessionEnd>> {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        have_version: ctx.applier.have_version(),
        report: report(ctx),
        reauthenticates: false,
        replaces: false,
        features: Vec::new(),
    };
    frame::write(&mut send, &NodeMsg::Hello(hello)).await?;
    let key = new_tls_key().map_err(|e| anyhow!("making a TLS key: {e}"))?;
    let csr_pem = csr_pem(&ctx.name, &key)?;
    frame::write(&mut send, &NodeMsg::Renew { csr_pem }).await?;
    let answer = tokio::time::timeout(EXPIRED_RENEW_TIMEOUT, async {
        loop {
            match frame::read::<_, ServerMsg>(&mut recv).await? {
                None => anyhow::bail!("the coordinator closed the stream without renewing"),
                Some(ServerMsg::Renewed { cert_pem, ca_pem }) => return Ok(Ok((cert_pem, ca_pem))),
                Some(ServerMsg::Error(e)) => return Ok(Err(e)),
                // The coordinator found the certificate valid (this node's clock is off) and
                // opened a normal session: the renewal answer follows.
                Some(other) => debug!("{} before the renewal answer; ignored", msg_kind(&other)),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no answer to the renewal of the expired certificate in time"))??;
    match answer {
        Ok((cert_pem, ca_pem)) => {
            let v = finish_renewal(ctx, Some(key), cert_pem, ca_pem)?;
            info!(
                expired_at = %unix_to_rfc3339(old.not_after),
                until = %unix_to_rfc3339(v.not_after),
                "expired node certificate renewed; connecting with the new one"
            );
            Ok(None)
        }
        Err(e) if classify(&e) == Refusal::Revoked => Ok(Some(SessionEnd::Revoked(e))),
        Err(e) if e.code == "cert-key-mismatch" => Err(anyhow!(
            "the coordinator refused to renew the node certificate that expired at {} ({}): {}; \
             this node's tls.key is not the key the coordinator has on record for it: put \
             back the state directory's own tls.key, or enroll again with a new token",
            unix_to_rfc3339(old.not_after),
            e.code,
            e.message
        )),
        Err(e) => Err(anyhow!(
            "the coordinator refused to renew the node certificate that expired at {} ({}): {}",
            unix_to_rfc3339(old.not_after),
            e.code,
            e.message
        )),
    }
}

/// Serves one session on `conn` until it ends. A `max_session` deadline from the coordinator
/// is met by [`reauthenticate`]: a new session from the same endpoint replaces the live one in
/// place (`conn`, the stream and the reader are swapped; the netmap in force and the data plane
/// are not touched), so the node's traffic never stops for it.
async fn session(
    ctx: &Ctx,
    endpoint: &quinn::Endpoint,
    conn: &mut quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    validity: CertValidity,
) -> anyhow::Result<SessionEnd> {
    let mut report = report(ctx);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        have_version: ctx.applier.have_version(),
        report: report.clone(),
        reauthenticates: true,
        replaces: false,
        features: session_features(ctx),
    };
    frame::write(&mut send, &NodeMsg::Hello(hello)).await?;
    let mut posture = crate::posture::Reporter::new(&ctx.version);
    frame::write(&mut send, &posture.first().await).await?;

    let (tx, mut rx) = mpsc::channel(16);
    let mut _reader = AbortOnDrop(tokio::spawn(read_frames(recv, tx)));
    // The first message of a replacement session, handled before anything else it sends.
    let mut first: Option<ServerMsg> = None;
    // When to re-authenticate, and the deadline by which the coordinator cuts this session.
    let mut reauth: Option<(Instant, Instant)> = None;
    let mut opening: Option<Opening<'_>> = None;
    // How the live session ended while its replacement was opening.
    let mut old_end: Option<SessionEnd> = None;
    ctx.sink.set_control_connected(true);
    info!(coordinator = %ctx.coordinator, node = %ctx.name, "control channel connected");

    let mut report_tick =
        tokio::time::interval_at(Instant::now() + REPORT_INTERVAL, REPORT_INTERVAL);
    let mut renew_deadline = instant_at(validity.renew_at_fraction(ctx.renew_fraction));
    let mut pending_key: Option<rcgen::KeyPair> = None;
    let mut workload_port = crate::workload::attach(ctx.workloads.as_ref()).await;
    let mut key_tick = tokio::time::interval(KEY_TICK);
    let mut rotation_sent: Option<Instant> = None;
    // After a switch, the netmap in force still says to rotate until the next one arrives.
    let mut switched_at: Option<NetmapVersion> = None;
    let mut resync = Resync::default();
    loop {
        // One step of the session; an error writing to a session that its replacement is
        // taking over (the coordinator closes it once it reads the new hello) waits for the
        // replacement's outcome, like the session's end does.
        let step: anyhow::Result<Option<SessionEnd>> = async {
            tokio::select! {
                msg = next_message(&mut first, &mut rx), if old_end.is_none() => {
                    let msg = match msg {
                        None => Err(SessionEnd::Lost("the coordinator closed the stream".into())),
                        Some(Err(e)) => Err(SessionEnd::Lost(e)),
                        Some(Ok(ServerMsg::Error(e))) if classify(&e) == Refusal::Revoked => {
                            Err(SessionEnd::Revoked(e))
                        }
                        Some(Ok(ServerMsg::Error(e))) => {
                            Err(SessionEnd::Lost(format!("the coordinator refused: {e}")))
                        }
                        Some(Ok(m)) => Ok(m),
                    };
                    let msg = match msg {
                        Ok(m) => m,
                        // The coordinator tells the live session that the replacement took over
                        // as soon as it reads the new hello: the replacement's outcome decides.
                        Err(end) if opening.is_some() => {
                            debug!("the session ended while its replacement opens");
                            old_end = Some(end);
                            return Ok(None);
                        }
                        Err(end) => return Ok(Some(end)),
                    };
                    match msg {
                        ServerMsg::Netmap(update) => {
                            if let Some(end) = apply_update(ctx, &mut send, &update).await? {
                                return Ok(Some(end));
                            }
                        }
                        ServerMsg::Renewed { cert_pem, ca_pem } => {
                            match finish_renewal(ctx, pending_key.take(), cert_pem, ca_pem) {
                                // Never sooner than the retry interval, whatever the fraction.
                                Ok(v) => {
                                    let at = instant_at(v.renew_at_fraction(ctx.renew_fraction));
                                    renew_deadline = at.max(Instant::now() + RENEW_RETRY);
                                }
                                Err(e) => {
                                    warn!("certificate renewal answer not used: {}", causes(&e))
                                }
                            }
                        }
                        ServerMsg::Workloads { .. }
                        | ServerMsg::Svid { .. }
                        | ServerMsg::WorkloadRefused { .. } => {
                            if let Some(port) = workload_port.as_mut() {
                                port.handle_answer(&msg);
                            }
                        }
                        ServerMsg::RotateKey => {
                            info!("the coordinator asked for a key rotation");
                            propose_key(ctx, &mut send).await?;
                            rotation_sent = Some(Instant::now());
                        }
                        ServerMsg::SwitchKey { public_key } => {
                            if switch_key(ctx, public_key)? {
                                rotation_sent = None;
                                switched_at = ctx.applier.have_version();
                            }
                        }
                        ServerMsg::RotateRefused { error } => {
                            warn!(code = %error.code, "key rotation refused: {}", error.message);
                            discard_next_key(ctx);
                            rotation_sent = Some(Instant::now());
                        }
                        ServerMsg::FlowQuery { id } => {
                            let answer = crate::control::flow_answer(ctx.sink.as_ref(), id);
                            frame::write(&mut send, &answer).await?;
                        }
                        ServerMsg::SessionDeadline { max_session_secs, remaining_secs } => {
                            let now = Instant::now();
                            let at = now + reauth_delay(max_session_secs, remaining_secs);
                            let deadline = now + Duration::from_secs(remaining_secs);
                            debug!(
                                max_session_secs,
                                remaining_secs,
                                in_ms = at.duration_since(now).as_millis() as u64,
                                "session deadline: re-authenticating ahead of it"
                            );
                            reauth = Some((at, deadline));
                        }
                        other => {
                            return Ok(Some(SessionEnd::Lost(format!(
                                "unexpected message {} on a session", msg_kind(&other)
                            ))));
                        }
                    }
                }
                msg = posture.next() => frame::write(&mut send, &msg).await?,
                request = crate::workload::next_message(&mut workload_port) => {
                    frame::write(&mut send, &request).await?;
                }
                _ = key_tick.tick() => {
                    let due = rotation_sent.is_none_or(|at| at.elapsed() >= ROTATE_RETRY)
                        && (next_key(ctx)?.is_some()
                            || ctx.applier.rotation_due(now_unix(), switched_at));
                    if due {
                        propose_key(ctx, &mut send).await?;
                        rotation_sent = Some(Instant::now());
                    }
                    for m in ctx.sink.take_key_mismatches() {
                        if let Some(reason) = resync.consider(&m, Instant::now()) {
                            frame::write(&mut send, &NodeMsg::Resync { reason }).await?;
                        }
                    }
                }
                _ = report_tick.tick() => {
                    let now = self::report(ctx);
                    if now.endpoints != report.endpoints {
                        info!(endpoints = ?now.endpoints, "local endpoints changed");
                    }
                    report = now;
                    frame::write(&mut send, &NodeMsg::Report(report.clone())).await?;
                }
                () = sleep_until_some(reauth.map(|(at, _)| at)), if opening.is_none() => {
                    // Opened beside the live session, which goes on serving until the swap.
                    opening = Some(Box::pin(reauthenticate(ctx, endpoint)));
                }
                opened = until_opened(&mut opening) => {
                    opening = None;
                    match opened {
                        Ok(next) => {
                            let old = std::mem::replace(conn, next.conn);
                            send = next.send;
                            rx = next.rx;
                            // Dropping the old reader aborts it: nothing more is read there.
                            _reader = next.reader;
                            first = Some(next.first);
                            old.close(0u32.into(), b"reauthenticated");
                            old_end = None;
                            reauth = None;
                            info!(
                                "control session re-authenticated ahead of its max_session \
                                 deadline"
                            );
                        }
                        Err(e) => {
                            if let Some(end) = old_end.take() {
                                warn!("re-authentication failed: {}", causes(&e));
                                return Ok(Some(end));
                            }
                            let deadline = reauth.map_or_else(Instant::now, |(_, d)| d);
                            let retry = Instant::now() + REAUTH_RETRY;
                            warn!(
                                "re-authentication failed, the current session goes on: {}",
                                causes(&e)
                            );
                            // Past the deadline the coordinator cuts this session and the node
                            // connects again as after any loss.
                            reauth = (retry < deadline).then_some((retry, deadline));
                        }
                    }
                }
                () = tokio::time::sleep_until(renew_deadline) => {
                    let key = new_tls_key().map_err(|e| anyhow!("making a TLS key: {e}"))?;
                    let csr_pem = csr_pem(&ctx.name, &key)?;
                    frame::write(&mut send, &NodeMsg::Renew { csr_pem }).await?;
                    debug!("asked for a renewed node certificate");
                    pending_key = Some(key);
                    renew_deadline = Instant::now() + RENEW_RETRY;
                }
            }
            Ok(None)
        }
        .await;
        match step {
            Ok(None) => {}
            Ok(Some(end)) => return Ok(end),
            Err(e) if opening.is_some() => {
                debug!(
                    "the session failed while its replacement opens: {}",
                    causes(&e)
                );
                old_end.get_or_insert(SessionEnd::Lost(causes(&e)));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The optional messages this node's session answers.
fn session_features(ctx: &Ctx) -> Vec<String> {
    let mut features = Vec::new();
    if ctx.sink.answers_flow_queries() {
        features.push(ztnet_proto::control::FEATURE_FLOWS.to_string());
    }
    features
}

/// A session opened ahead of the live one's deadline, up to its first message.
struct Replacement {
    conn: quinn::Connection,
    send: quinn::SendStream,
    rx: mpsc::Receiver<Result<ServerMsg, String>>,
    reader: AbortOnDrop<()>,
    first: ServerMsg,
}

/// A re-authentication under way.
type Opening<'a> = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Replacement>> + Send + 'a>>;

/// Completes with the outcome of the re-authentication under way; never without one.
async fn until_opened(opening: &mut Option<Opening<'_>>) -> anyhow::Result<Replacement> {
    match opening {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Opens a new session from `endpoint` with the certificate on disk (`Hello::replaces`, then
/// the posture), and waits for its first message. The coordinator makes it the node's current
/// session when it reads the hello; the caller then drops the old one.
async fn reauthenticate(ctx: &Ctx, endpoint: &quinn::Endpoint) -> anyhow::Result<Replacement> {
    let certs = ctx
        .state
        .certs()?
        .context("the node certificate is missing from the state directory")?;
    let key_pem = zeroize::Zeroizing::new(ctx.state.tls_key()?.serialize_pem());
    let config = tls::session_config(&certs.ca_pem, &certs.cert_pem, &key_pem)?;
    let conn = dial(endpoint, &ctx.coordinator, config).await?;
    let opened = async {
        let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            have_version: ctx.applier.have_version(),
            report: report(ctx),
            reauthenticates: true,
            replaces: true,
            features: session_features(ctx),
        };
        frame::write(&mut send, &NodeMsg::Hello(hello)).await?;
        let posture = crate::posture::Reporter::new(&ctx.version).first().await;
        frame::write(&mut send, &posture).await?;
        let (tx, mut rx) = mpsc::channel(16);
        let reader = AbortOnDrop(tokio::spawn(read_frames(recv, tx)));
        let first = tokio::time::timeout(REAUTH_TIMEOUT, rx.recv())
            .await
            .map_err(|_| anyhow!("no answer within {}s", REAUTH_TIMEOUT.as_secs()))?
            .context("the coordinator closed the new session without answering")?
            .map_err(|e| anyhow!(e))?;
        anyhow::Ok((send, rx, reader, first))
    }
    .await;
    match opened {
        Ok((send, rx, reader, first)) => Ok(Replacement {
            conn,
            send,
            rx,
            reader,
            first,
        }),
        Err(e) => {
            conn.close(0u32.into(), b"reauthentication failed");
            Err(e)
        }
    }
}

/// The held-back first message of a replacement session, else the next one from the reader.
async fn next_message(
    first: &mut Option<ServerMsg>,
    rx: &mut mpsc::Receiver<Result<ServerMsg, String>>,
) -> Option<Result<ServerMsg, String>> {
    match first.take() {
        Some(m) => Some(Ok(m)),
        None => rx.recv().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends the next key's public half, making the key first when there is none on disk.
async fn propose_key(ctx: &Ctx, send: &mut quinn::SendStream) -> anyhow::Result<()> {
    let key = match next_key(ctx)? {
        Some(k) => k,
        None => {
            let key = ztnet_proto::PrivateKey::generate();
            let mut text = zeroize::Zeroizing::new(key.to_base64_secret());
            text.push('\n');
            crate::state::write_atomic(&next_key_path(ctx), text.as_bytes(), 0o600)?;
            key
        }
    };
    let public_key = key.public_key();
    info!(next = %public_key.short(), "proposing a new WireGuard key");
    frame::write(send, &NodeMsg::RotateKey { public_key }).await?;
    Ok(())
}

fn next_key_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.path().join(NEXT_WG_KEY)
}

/// The key of a rotation under way, from the state directory.
fn next_key(ctx: &Ctx) -> anyhow::Result<Option<ztnet_proto::PrivateKey>> {
    let path = next_key_path(ctx);
    match std::fs::read_to_string(&path) {
        Ok(text) => ztnet_proto::PrivateKey::parse_file_content(&text)
            .map(Some)
            .with_context(|| format!("{} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("reading {}", path.display()))),
    }
}

fn discard_next_key(ctx: &Ctx) {
    if let Err(e) = std::fs::remove_file(next_key_path(ctx))
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {NEXT_WG_KEY}: {e}");
    }
}

/// Switches to the proposed key when `public_key` is its public half: `wg.key` first (so a
/// restart runs the key the coordinator now holds), then the data plane, whose sessions are
/// rebuilt on it and which handshakes with every peer at once. False when there was nothing
/// to switch to.
fn switch_key(ctx: &Ctx, public_key: ztnet_proto::WgKey) -> anyhow::Result<bool> {
    let Some(key) = next_key(ctx)? else {
        debug!(key = %public_key.short(), "switch to a key this node does not hold; ignored");
        return Ok(false);
    };
    if key.public_key() != public_key {
        warn!(
            asked = %public_key.short(),
            held = %key.public_key().short(),
            "the coordinator asked to switch to another key than the one proposed; ignored"
        );
        return Ok(false);
    }
    let wg_key = ctx.state.path().join("wg.key");
    std::fs::rename(next_key_path(ctx), &wg_key)
        .with_context(|| format!("moving {NEXT_WG_KEY} to {}", wg_key.display()))?;
    ctx.applier.switch_key(key, now_unix())?;
    info!(key = %public_key.short(), "switched to the new WireGuard key");
    Ok(true)
}

/// Decides which key mismatches earn a request for a fresh netmap: at most one every
/// [`RESYNC_SPACING`], and for one peer at most [`RESYNC_ATTEMPTS`] before a pause of
/// [`RESYNC_QUIET`], said at error level, so a mismatch never turns into a silent endless loop.
#[derive(Default)]
struct Resync {
    last: Option<Instant>,
    per_peer: std::collections::HashMap<String, (u32, Instant)>,
}

impl Resync {
    fn consider(&mut self, m: &KeyMismatch, now: Instant) -> Option<String> {
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < RESYNC_SPACING)
        {
            return None;
        }
        if let MismatchKind::StaleKeyForUs = m.kind {
            warn!("{m}; it heals when {} gets a fresh netmap", m.peer);
            return None;
        }
        let entry = self.per_peer.entry(m.peer.clone()).or_insert((0, now));
        if now.duration_since(entry.1) >= RESYNC_QUIET {
            *entry = (0, now);
        }
        if entry.0 >= RESYNC_ATTEMPTS {
            return None;
        }
        entry.0 += 1;
        self.last = Some(now);
        if entry.0 == RESYNC_ATTEMPTS {
            error!(
                "{m}; still after {} fresh netmaps: the coordinator's key for {} is not the one \
                 it uses; not asking again for {} s",
                RESYNC_ATTEMPTS - 1,
                m.peer,
                RESYNC_QUIET.as_secs()
            );
        } else {
            warn!("{m}; asking the coordinator for a fresh netmap");
        }
        Some(m.to_string())
    }
}

/// Completes with the first key mismatch that a fresh netmap may heal.
async fn mismatch_seen(sink: &dyn DataplaneSink) -> KeyMismatch {
    loop {
        if let Some(m) = sink
            .take_key_mismatches()
            .into_iter()
            .find(|m| matches!(m.kind, MismatchKind::UnknownKey(_)))
        {
            return m;
        }
        tokio::time::sleep(KEY_TICK).await;
    }
}

/// Applies one netmap update; `Some` ends the session.
async fn apply_update(
    ctx: &Ctx,
    send: &mut quinn::SendStream,
    update: &NetmapUpdate,
) -> anyhow::Result<Option<SessionEnd>> {
    if let Err(e) = save_bundle(ctx, update) {
        // Not acknowledged: the coordinator keeps the rotation waiting for this node.
        error!("trust bundle in netmap not used: {}", causes(&e));
        return Ok(None);
    }
    match ctx.applier.handle(update, now_unix()) {
        Ok(version) => {
            frame::write(send, &NodeMsg::Ack { version }).await?;
            Ok(None)
        }
        Err(HandleError::Refused(UpdateRefused::DeltaMismatch(e))) => Ok(Some(SessionEnd::Lost(
            format!("{}; reconnecting for a full netmap", e.message),
        ))),
        Err(HandleError::Refused(e)) => {
            error!("{e}; passing what the netmap in force allows");
            Ok(None)
        }
        Err(HandleError::Dataplane(e)) => Ok(Some(SessionEnd::Lost(format!(
            "the data plane refused the netmap: {}",
            causes(&e)
        )))),
    }
}

/// Saves the trust bundle a netmap carries to `ca.pem` (atomically) when it differs from the
/// one on disk, so that the next connection trusts every CA in it. Refused whole when one
/// certificate in it does not parse.
fn save_bundle(ctx: &Ctx, update: &NetmapUpdate) -> anyhow::Result<()> {
    let bundle = match update {
        NetmapUpdate::Full(n) => n.bundle_pem.as_deref(),
        NetmapUpdate::Delta(d) => d.bundle_pem.as_deref(),
    };
    let Some(bundle) = bundle else {
        return Ok(());
    };
    let cas = tls::certs(bundle, "trust bundle")?.len();
    let certs = ctx
        .state
        .certs()?
        .context("the node certificate is missing from the state directory")?;
    if certs.ca_pem == bundle {
        return Ok(());
    }
    ctx.state.save_certs(&NodeCerts {
        cert_pem: certs.cert_pem,
        ca_pem: bundle.to_owned(),
    })?;
    info!(cas, "trust bundle saved to ca.pem");
    Ok(())
}

fn finish_renewal(
    ctx: &Ctx,
    key: Option<rcgen::KeyPair>,
    cert_pem: String,
    ca_pem: String,
) -> anyhow::Result<CertValidity> {
    let key = key.context("no renewal was asked for")?;
    let der = tls::certs(&cert_pem, "renewed certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
        .map_err(|e| anyhow!("renewed certificate: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        anyhow::bail!("the renewed certificate is not for the key this node sent");
    }
    tls::certs(&ca_pem, "renewed trust bundle")?;
    let validity = CertValidity::from_pem(&cert_pem).map_err(|e| anyhow!(e))?;
    // The key first: a crash between the two writes leaves a key without its certificate,
    // which the coordinator refuses; the other order would be the same. Both are rare.
    ctx.state.save_tls_key(&key)?;
    ctx.state.save_certs(&NodeCerts { cert_pem, ca_pem })?;
    info!(until = %unix_to_rfc3339(validity.not_after), "node certificate renewed");
    Ok(validity)
}

async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<ServerMsg, String>>) {
    loop {
        let item = match frame::read::<_, ServerMsg>(&mut recv).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => break,
            Err(e) => Err(e.to_string()),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            break;
        }
    }
}

fn report(ctx: &Ctx) -> Report {
    Report {
        listen_port: ctx.sink.listen_port(),
        endpoints: ctx.sink.local_endpoints(),
        version: ctx.version.clone(),
    }
}

/// Applies netmaps to the data plane under one lock, so the expiry watchdog and the session
/// never interleave.
struct Applier {
    tracker: Mutex<NetmapTracker>,
    /// Peers left out because their key expired, as last applied.
    expired: Mutex<Vec<String>>,
    self_expired_warned: std::sync::atomic::AtomicBool,
    sink: Arc<dyn DataplaneSink>,
    state: StateDir,
    name: String,
}

enum HandleError {
    Refused(UpdateRefused),
    Dataplane(anyhow::Error),
}

impl Applier {
    fn lock(&self) -> MutexGuard<'_, NetmapTracker> {
        // A panic while holding the lock cannot leave the tracker half-changed: every change
        // is one assignment, so a poisoned lock is still consistent.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_from_disk(&self, now: u64) {
        let cached = match self.state.netmap() {
            Ok(n) => n,
            Err(e) => {
                warn!("{e}; not used, passing nothing until the coordinator sends a netmap");
                None
            }
        };
        match judge_cached(cached, now) {
            CachedNetmap::Usable(n) => match self.sink.apply(dataplane_config(&n, now)) {
                Ok(()) => {
                    info!(
                        version = n.version.0,
                        peers = n.peers.len(),
                        "started from the netmap on disk"
                    );
                    self.lock().commit(*n);
                }
                Err(e) => error!("the data plane refused the netmap on disk: {}", causes(&e)),
            },
            CachedNetmap::Expired {
                version,
                expires_at,
            } => warn!(
                version = version.0,
                "the netmap on disk expired at {}: not used, passing nothing until the \
                 coordinator sends a new one",
                unix_to_rfc3339(expires_at)
            ),
            CachedNetmap::Missing => {
                info!("no netmap yet: passing nothing until the coordinator sends one")
            }
        }
    }

    fn have_version(&self) -> Option<NetmapVersion> {
        self.lock().version()
    }

    fn handle(&self, update: &NetmapUpdate, now: u64) -> Result<NetmapVersion, HandleError> {
        let mut tracker = self.lock();
        let next = tracker.prepare(update, now).map_err(HandleError::Refused)?;
        let was = tracker.current().and_then(|n| n.node.quarantine.clone());
        match (&was, &next.node.quarantine) {
            (_, Some(why)) if was.as_ref() != Some(why) => warn!(
                reason = %why,
                "this node is quarantined by the coordinator: no peer accepts it until it \
                 passes its posture again"
            ),
            (Some(_), None) => info!("this node passes its posture again: quarantine lifted"),
            _ => {}
        }
        self.sink
            .apply(dataplane_config(&next, now))
            .map_err(HandleError::Dataplane)?;
        *lock(&self.expired) = expired_peers(&next, now);
        self.self_expired_warned
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.state.save_netmap(&next) {
            error!("{e}; a restart will not find this netmap");
        }
        let version = next.version;
        info!(
            version = version.0,
            peers = next.peers.len(),
            "netmap applied"
        );
        tracker.commit(next);
        Ok(version)
    }

    /// Whether the netmap in force says to rotate the key now; never for a netmap that is not
    /// newer than `after` (the one in force at the last switch).
    fn rotation_due(&self, now: u64, after: Option<NetmapVersion>) -> bool {
        self.lock()
            .current()
            .is_some_and(|n| after.is_none_or(|v| n.version > v) && rotation_due(n, now))
    }

    /// Applies the netmap in force with a new private key.
    fn switch_key(&self, key: ztnet_proto::PrivateKey, now: u64) -> anyhow::Result<()> {
        let tracker = self.lock();
        let mut config = match tracker.current() {
            Some(n) => dataplane_config(n, now),
            None => deny_all_config(Some(self.name.clone())),
        };
        config.private_key = Some(key);
        self.sink.apply(config)
    }

    /// Drops the peers whose key expired by this node's clock (FC-17), whether the
    /// coordinator is reachable or not.
    fn enforce_key_expiry(&self, now: u64) {
        let tracker = self.lock();
        let Some(current) = tracker.current() else {
            return;
        };
        if current.node.key_expires_at.is_some_and(|at| at <= now)
            && !self
                .self_expired_warned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            error!(
                "this node's WireGuard key expired at {} without a rotation: its peers drop \
                 it until it rotates (is the coordinator reachable?)",
                unix_to_rfc3339(current.node.key_expires_at.unwrap_or(now))
            );
        }
        let expired = expired_peers(current, now);
        let mut applied = lock(&self.expired);
        if expired == *applied {
            return;
        }
        for name in expired.iter().filter(|n| !applied.contains(n)) {
            let at = current
                .peers
                .iter()
                .find(|p| &p.name == name)
                .and_then(|p| p.key_expires_at)
                .unwrap_or(now);
            warn!(
                peer = %name,
                "peer's key expired at {}: dropped by this node's clock",
                unix_to_rfc3339(at)
            );
        }
        match self.sink.apply(dataplane_config(current, now)) {
            Ok(()) => *applied = expired,
            Err(e) => error!("the data plane refused the configuration: {}", causes(&e)),
        }
    }

    /// Enforces expiry; returns the expiry of the netmap in force.
    fn enforce_expiry(&self, now: u64) -> Option<u64> {
        let mut tracker = self.lock();
        if let Some(old) = tracker.expire(now) {
            error!(
                version = old.version.0,
                "the netmap expired at {} with no newer one from the coordinator: passing nothing",
                unix_to_rfc3339(old.expires_at)
            );
            if let Err(e) = self.sink.apply(deny_all_config(Some(self.name.clone()))) {
                error!(
                    "the data plane refused the deny-all configuration: {}",
                    causes(&e)
                );
            }
        }
        tracker.expires_at()
    }

    fn revoke(&self) {
        let mut tracker = self.lock();
        tracker.clear();
        if let Err(e) = self.sink.apply(deny_all_config(Some(self.name.clone()))) {
            error!(
                "the data plane refused the deny-all configuration: {}",
                causes(&e)
            );
        }
        if let Err(e) = self.state.remove_netmap() {
            error!("{e}; remove it by hand so that a restart passes nothing");
        }
    }
}

/// How often the watchdog checks netmap and peer key expiry: a peer is dropped at most this
/// long (plus the second the expiry is counted in) after its key expired.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

async fn expiry_watchdog(applier: Arc<Applier>) {
    loop {
        let now = now_unix();
        applier.enforce_expiry(now);
        applier.enforce_key_expiry(now);
        tokio::time::sleep(EXPIRY_TICK).await;
    }
}

/// Locks a mutex, going on with the data if a holder panicked (each value is replaced whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dials the coordinator over QUIC with a fresh client endpoint.
async fn connect(
    coordinator: &str,
    config: quinn::ClientConfig,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let addr = resolve(coordinator).await?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket for QUIC")?;
    let conn = dial(&endpoint, coordinator, config).await?;
    Ok((endpoint, conn))
}

/// Dials the coordinator over QUIC from `endpoint`: a re-authentication reuses the live
/// session's endpoint, so the coordinator sees the new session come from the same address.
async fn dial(
    endpoint: &quinn::Endpoint,
    coordinator: &str,
    mut config: quinn::ClientConfig,
) -> anyhow::Result<quinn::Connection> {
    config.transport_config(Arc::new(transport()?));
    let addr = resolve(coordinator).await?;
    let connecting = endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .context("starting the QUIC handshake")?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to the coordinator at {coordinator} ({addr})"))?;
    Ok(conn)
}

/// QUIC timers of the control channel: a keep-alive every 2 s and an idle timeout of 8 s, so a
/// coordinator killed without closing its connections is noticed within 8 s (the coordinator
/// sets the same values; the smaller of the two sides' idle timeouts applies).
fn transport() -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).context("control channel idle timeout")?,
    ));
    Ok(transport)
}

async fn resolve(coordinator: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(coordinator)
        .await
        .with_context(|| format!("coordinator address {coordinator:?} does not resolve"))?
        .next()
        .with_context(|| format!("coordinator address {coordinator:?} has no address"))
}

/// A certificate signing request for the node's TLS key, CN = node name.
fn csr_pem(name: &str, key: &rcgen::KeyPair) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    Ok(params.serialize_request(key)?.pem()?)
}

fn msg_kind(m: &ServerMsg) -> &'static str {
    match m {
        ServerMsg::Enrolled(_) => "enrolled",
        ServerMsg::Netmap(_) => "netmap",
        ServerMsg::Renewed { .. } => "renewed",
        ServerMsg::Error(_) => "error",
        ServerMsg::Workloads { .. } => "workloads",
        ServerMsg::Svid { .. } => "svid",
        ServerMsg::WorkloadRefused { .. } => "workload-refused",
        ServerMsg::RotateKey => "rotate-key",
        ServerMsg::SwitchKey { .. } => "switch-key",
        ServerMsg::RotateRefused { .. } => "rotate-refused",
        ServerMsg::FlowQuery { .. } => "flow-query",
        ServerMsg::SessionDeadline { .. } => "session-deadline",
    }
}

/// Current Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The monotonic instant at which the wall clock reaches `unix`.
fn instant_at(unix: u64) -> Instant {
    let now = now_unix();
    Instant::now() + Duration::from_secs(unix.saturating_sub(now))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
