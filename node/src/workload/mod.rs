//! Workload identity on the node: the local workload API ([`api`]) hands X.509-SVIDs to the
//! processes whose kernel-reported credentials match a registration for this node.
//!
//! The workload API and the control session meet in a [`Broker`]: the API queues a job (list
//! the registrations, sign a certificate request), the session that holds the control channel
//! sends it and routes the answer back by request id. The broker knows whether a session is
//! attached: with none, a job waits only for [`RECONNECT_GRACE`] after the node started or the
//! last session ended (the control client is then still connecting); later ones are refused at
//! once, naming since when the node has had no control connection. A session that ends while a
//! job waits on it fails that job at once too, as "lost", not as a time-out.

pub mod api;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot, watch};
use tokio::time::Instant;
use ztnet_proto::control::{ControlError, NodeMsg, ServerMsg};
use ztnet_proto::workload::WorkloadEntry;

/// How long one caller of the workload API waits for the coordinator, all its requests
/// together, before it is refused.
pub const COORDINATOR_DEADLINE: Duration = Duration::from_secs(10);

/// How long a job waits for a session after the node started or its last session ended: the
/// control client reconnects within a second or two of a loss (backoff from 0.5 s). After that
/// the node is taken to be cut off, and a job is refused at once.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(3);

/// What a [`Broker`] knows of the control session.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// No session yet since the node started.
    Starting { at: Instant, wall: SystemTime },
    /// A session serves jobs.
    Up,
    /// The last session ended then.
    Down { at: Instant, wall: SystemTime },
}

/// What the coordinator signed.
#[derive(Debug, Clone)]
pub struct Signed {
    /// PEM certificate chain, leaf first.
    pub cert_pem: String,
    /// PEM trust bundle.
    pub bundle_pem: String,
}

/// The meeting point of the workload API and the control session.
pub struct Broker {
    tx: mpsc::Sender<Job>,
    rx: Mutex<mpsc::Receiver<Job>>,
    link: watch::Sender<Link>,
    grace: Duration,
}

enum Job {
    List(oneshot::Sender<Result<Vec<WorkloadEntry>, ControlError>>),
    Sign {
        spiffe_id: String,
        csr_pem: String,
        reply: oneshot::Sender<Result<Signed, ControlError>>,
    },
}

impl Broker {
    /// A broker with room for a few dozen waiting jobs; no session is attached yet.
    pub fn new() -> Arc<Broker> {
        Broker::with_grace(RECONNECT_GRACE)
    }

    /// [`Broker::new`] with another grace than [`RECONNECT_GRACE`] (tests).
    pub fn with_grace(grace: Duration) -> Arc<Broker> {
        let (tx, rx) = mpsc::channel(64);
        let (link, _) = watch::channel(Link::Starting {
            at: Instant::now(),
            wall: SystemTime::now(),
        });
        Arc::new(Broker {
            tx,
            rx: Mutex::new(rx),
            link,
            grace,
        })
    }

    /// The registrations of this node, from the coordinator, by `deadline`.
    pub async fn list(&self, deadline: Instant) -> Result<Vec<WorkloadEntry>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::List(reply), answer, deadline).await
    }

    /// Asks the coordinator to sign `csr_pem` as `spiffe_id`, by `deadline`.
    pub async fn sign(
        &self,
        spiffe_id: &str,
        csr_pem: String,
        deadline: Instant,
    ) -> Result<Signed, ControlError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Sign {
            spiffe_id: spiffe_id.to_string(),
            csr_pem,
            reply,
        };
        self.submit(job, answer, deadline).await
    }

    async fn submit<T>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, ControlError>>,
        deadline: Instant,
    ) -> Result<T, ControlError> {
        let mut link = self.link.subscribe();
        // Wait for a session only while one may still be coming.
        loop {
            let now = Instant::now();
            let state = *link.borrow_and_update();
            let (Link::Starting { at, .. } | Link::Down { at, .. }) = state else {
                break;
            };
            if now >= at + self.grace || now >= deadline {
                return Err(no_session(state, SystemTime::now()));
            }
            let until = (at + self.grace).min(deadline);
            // A time-out goes round again, to the refusal above.
            let _ = tokio::time::timeout_at(until, link.changed()).await;
        }
        if self.tx.send(job).await.is_err() {
            // The broker holds the receiver, so this does not happen while it lives.
            return Err(lost());
        }
        let session_ends = async {
            // `wait_for` sees the state now too: a session that ended before this line counts.
            let _ = link.wait_for(|l| !matches!(l, Link::Up)).await;
        };
        tokio::select! {
            r = answer => r.map_err(|_| lost())?,
            () = session_ends => Err(lost()),
            () = tokio::time::sleep_until(deadline) => Err(ControlError {
                code: "unavailable".into(),
                message: format!(
                    "the coordinator did not answer within {}s although the control \
                     connection is up; retry later",
                    COORDINATOR_DEADLINE.as_secs()
                ),
            }),
        }
    }

    /// Takes the job queue for one control session; waits while another session holds it.
    /// The broker counts the session as up until the port is dropped.
    pub async fn attach(&self) -> SessionPort<'_> {
        let rx = self.rx.lock().await;
        self.link.send_replace(Link::Up);
        SessionPort {
            rx,
            pending: HashMap::new(),
            next_id: 1,
            link: &self.link,
        }
    }
}

/// The refusal for a job that found no session, in the state `link`.
fn no_session(link: Link, now: SystemTime) -> ControlError {
    let (what, wall) = match link {
        Link::Starting { wall, .. } => {
            ("has not reached the coordinator since it started at", wall)
        }
        Link::Down { wall, .. } => ("has no control connection to the coordinator since", wall),
        Link::Up => ("has no control connection to the coordinator", now),
    };
    let ago = now.duration_since(wall).map_or(0, |d| d.as_secs());
    ControlError {
        code: "unavailable".into(),
        message: format!(
            "the node {what} {} ({ago} s ago); it cannot issue an SVID now; retry later",
            rfc3339(wall)
        ),
    }
}

/// The refusal for a job whose session ended before it answered.
fn lost() -> ControlError {
    ControlError {
        code: "unavailable".into(),
        message: "the node lost its control connection to the coordinator while this request \
                  waited for the answer; retry later"
            .into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A control session's end of the broker: sends jobs, routes answers.
pub struct SessionPort<'a> {
    rx: MutexGuard<'a, mpsc::Receiver<Job>>,
    pending: HashMap<u64, Job>,
    next_id: u64,
    link: &'a watch::Sender<Link>,
}

impl Drop for SessionPort<'_> {
    /// The session ended: jobs still pending fail as their replies drop, later ones wait only
    /// for the grace.
    fn drop(&mut self) {
        self.link.send_replace(Link::Down {
            at: Instant::now(),
            wall: SystemTime::now(),
        });
    }
}

impl SessionPort<'_> {
    /// Waits for the next job and returns the message to send for it.
    pub async fn next_message(&mut self) -> NodeMsg {
        loop {
            let Some(job) = self.rx.recv().await else {
                // The broker holds a sender, so the queue never closes while it lives.
                std::future::pending::<()>().await;
                continue;
            };
            let request_id = self.next_id;
            self.next_id += 1;
            let msg = match &job {
                Job::List(reply) if reply.is_closed() => continue,
                Job::Sign { reply, .. } if reply.is_closed() => continue,
                Job::List(_) => NodeMsg::WorkloadList { request_id },
                Job::Sign {
                    spiffe_id, csr_pem, ..
                } => NodeMsg::SignSvid {
                    request_id,
                    spiffe_id: spiffe_id.clone(),
                    csr_pem: csr_pem.clone(),
                },
            };
            self.pending.insert(request_id, job);
            return msg;
        }
    }

    /// Routes a workload answer to the job that asked for it; false when `msg` is not one.
    pub fn handle_answer(&mut self, msg: &ServerMsg) -> bool {
        let protocol = |what: &str| ControlError {
            code: "protocol".into(),
            message: format!("the coordinator answered a {what} request with the wrong kind"),
        };
        match msg {
            ServerMsg::Workloads {
                request_id,
                entries,
            } => match self.pending.remove(request_id) {
                Some(Job::List(reply)) => {
                    let _ = reply.send(Ok(entries.clone()));
                }
                Some(Job::Sign { reply, .. }) => {
                    let _ = reply.send(Err(protocol("sign")));
                }
                None => tracing::debug!(request_id, "answer to no pending workload request"),
            },
            ServerMsg::Svid {
                request_id,
                cert_pem,
                bundle_pem,
            } => match self.pending.remove(request_id) {
                Some(Job::Sign { reply, .. }) => {
                    let _ = reply.send(Ok(Signed {
                        cert_pem: cert_pem.clone(),
                        bundle_pem: bundle_pem.clone(),
                    }));
                }
                Some(Job::List(reply)) => {
                    let _ = reply.send(Err(protocol("list")));
                }
                None => tracing::debug!(request_id, "answer to no pending workload request"),
            },
            ServerMsg::WorkloadRefused { request_id, error } => {
                match self.pending.remove(request_id) {
                    Some(Job::Sign { reply, .. }) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Some(Job::List(reply)) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    None => tracing::debug!(request_id, "answer to no pending workload request"),
                }
            }
            _ => return false,
        }
        true
    }
}

/// The session port when there is a broker, else nothing.
pub async fn attach(broker: Option<&Arc<Broker>>) -> Option<SessionPort<'_>> {
    match broker {
        Some(b) => Some(b.attach().await),
        None => None,
    }
}

/// The next message of an optional port; never completes without one.
pub async fn next_message(port: &mut Option<SessionPort<'_>>) -> NodeMsg {
    match port {
        Some(p) => p.next_message().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use ztnet_proto::workload::{Selector, SpiffeId};

    use super::*;

    fn entry() -> WorkloadEntry {
        WorkloadEntry {
            spiffe_id: SpiffeId::parse("spiffe://corp.example/ns/p/sa/api").expect("valid"),
            selectors: vec![Selector::Uid(1001)],
            ttl_secs: 60,
        }
    }

    #[tokio::test]
    async fn answers_reach_the_request_that_asked_by_id() {
        let broker = Broker::new();
        let b = broker.clone();
        let list = tokio::spawn(async move { b.list(soon()).await });
        let b = broker.clone();
        let sign = tokio::spawn(async move {
            b.sign("spiffe://corp.example/x", "csr".into(), soon())
                .await
        });

        let mut port = broker.attach().await;
        let mut ids = std::collections::BTreeMap::new();
        for _ in 0..2 {
            match port.next_message().await {
                NodeMsg::WorkloadList { request_id } => ids.insert("list", request_id),
                NodeMsg::SignSvid {
                    request_id,
                    spiffe_id,
                    csr_pem,
                } => {
                    assert_eq!(
                        (spiffe_id.as_str(), csr_pem.as_str()),
                        ("spiffe://corp.example/x", "csr")
                    );
                    ids.insert("sign", request_id)
                }
                other => panic!("unexpected {other:?}"),
            };
        }
        // An answer to nobody is ignored; the answers go to their own requests.
        assert!(port.handle_answer(&ServerMsg::Workloads {
            request_id: 99,
            entries: vec![]
        }));
        assert!(port.handle_answer(&ServerMsg::WorkloadRefused {
            request_id: ids["sign"],
            error: ControlError {
                code: "not-registered".into(),
                message: "no".into()
            },
        }));
        assert!(port.handle_answer(&ServerMsg::Workloads {
            request_id: ids["list"],
            entries: vec![entry()]
        }));
        assert_eq!(list.await.expect("task").expect("listed"), vec![entry()]);
        let refused = sign.await.expect("task").expect_err("refused");
        assert_eq!(refused.code, "not-registered");
    }

    #[tokio::test]
    async fn a_wrong_kind_of_answer_is_a_protocol_error() {
        let broker = Broker::new();
        let b = broker.clone();
        let list = tokio::spawn(async move { b.list(soon()).await });
        let mut port = broker.attach().await;
        let NodeMsg::WorkloadList { request_id } = port.next_message().await else {
            panic!("expected a list request");
        };
        let svid = ServerMsg::Svid {
            request_id,
            cert_pem: String::new(),
            bundle_pem: String::new(),
        };
        assert!(port.handle_answer(&svid));
        assert_eq!(
            list.await.expect("task").expect_err("refused").code,
            "protocol"
        );
        let netmap_like = ServerMsg::Error(ControlError {
            code: "x".into(),
            message: "y".into(),
        });
        assert!(!port.handle_answer(&netmap_like), "not a workload answer");
    }

    /// The deadline of one caller.
    fn soon() -> Instant {
        Instant::now() + COORDINATOR_DEADLINE
    }

    /// A grace short enough for a test, long enough for a task to start.
    const GRACE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_node_that_never_reached_the_coordinator_refuses_after_the_grace() {
        let broker = Broker::with_grace(GRACE);
        let started = Instant::now();
        let err = broker.list(soon()).await.expect_err("no session");
        let waited = started.elapsed();
        assert_eq!(err.code, "unavailable");
        assert!(
            err.message
                .contains("has not reached the coordinator since it started at")
                && err.message.contains("retry later"),
            "{}",
            err.message
        );
        assert!(
            waited >= GRACE && waited < GRACE * 3,
            "waited {waited:?}, the grace is {GRACE:?}, not the {COORDINATOR_DEADLINE:?} deadline"
        );
        // Past the grace, the next one is refused at once.
        let started = Instant::now();
        broker.list(soon()).await.expect_err("no session");
        assert!(started.elapsed() < GRACE, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn after_a_session_ended_requests_are_refused_at_once_naming_since_when() {
        let broker = Broker::with_grace(GRACE);
        drop(broker.attach().await);
        // Within the grace a request waits: the session may come back.
        let b = broker.clone();
        let waiting = tokio::spawn(async move { b.list(soon()).await });
        let mut port = broker.attach().await;
        let NodeMsg::WorkloadList { request_id } = port.next_message().await else {
            panic!("expected a list request");
        };
        port.handle_answer(&ServerMsg::Workloads {
            request_id,
            entries: vec![entry()],
        });
        assert_eq!(waiting.await.expect("task").expect("listed"), vec![entry()]);
        drop(port);

        // Once the grace is over, the answer comes at once, not after the deadline.
        tokio::time::sleep(GRACE).await;
        let started = Instant::now();
        let err = broker.list(soon()).await.expect_err("no session");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.code, "unavailable");
        assert!(
            err.message
                .contains("has no control connection to the coordinator since")
                && err.message.contains("cannot issue an SVID now"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_session_that_ends_under_a_waiting_request_fails_it_at_once_as_lost() {
        let broker = Broker::with_grace(GRACE);
        let mut port = broker.attach().await;
        let b = broker.clone();
        let started = Instant::now();
        let waiting = tokio::spawn(async move { b.list(soon()).await });
        let NodeMsg::WorkloadList { .. } = port.next_message().await else {
            panic!("expected a list request");
        };
        drop(port);
        let err = waiting.await.expect("task").expect_err("lost");
        assert!(
            started.elapsed() < COORDINATOR_DEADLINE / 4,
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.message.contains("lost its control connection") && !err.message.contains("within"),
            "a loss is not called a time-out: {}",
            err.message
        );

        // A job queued but never taken fails the same way when the session ends.
        let port = broker.attach().await;
        let b = broker.clone();
        let queued = tokio::spawn(async move { b.list(soon()).await });
        // Poll until the job is in the queue, then end the session without taking it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while broker.tx.capacity() == broker.tx.max_capacity() {
            assert!(Instant::now() < deadline, "the job never reached the queue");
            tokio::task::yield_now().await;
        }
        drop(port);
        let err = queued.await.expect("task").expect_err("lost");
        assert!(err.message.contains("lost"), "{}", err.message);
    }

    #[tokio::test]
    async fn an_up_session_that_does_not_answer_is_a_time_out_at_the_deadline() {
        let broker = Broker::with_grace(GRACE);
        let mut port = broker.attach().await;
        let b = broker.clone();
        let deadline = Instant::now() + Duration::from_millis(300);
        let waiting = tokio::spawn(async move { b.list(deadline).await });
        let _ = port.next_message().await;
        let err = waiting.await.expect("task").expect_err("timed out");
        assert!(Instant::now() >= deadline);
        assert!(
            err.message.contains("did not answer within") && err.message.contains("is up"),
            "{}",
            err.message
        );
        // The port goes on serving the next job.
        let b = broker.clone();
        let list = tokio::spawn(async move { b.list(soon()).await });
        let NodeMsg::WorkloadList { request_id } = port.next_message().await else {
            panic!("expected a list request");
        };
        port.handle_answer(&ServerMsg::Workloads {
            request_id,
            entries: vec![],
        });
        assert_eq!(list.await.expect("task").expect("listed"), vec![]);
    }
}
