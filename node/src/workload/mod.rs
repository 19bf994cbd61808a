//! Workload identity on the node: the local workload API ([`api`]) hands X.509-SVIDs to the
//! processes whose kernel-reported credentials match a registration for this node.
//!
//! The workload API and the control session meet in a [`Broker`]: the API queues a job (list
//! the registrations, sign a certificate request), the session that holds the control channel
//! sends it and routes the answer back by request id. With no session up, a job waits until
//! one is, or until the caller's deadline.

pub mod api;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};
use ztnet_proto::control::{ControlError, NodeMsg, ServerMsg};
use ztnet_proto::workload::WorkloadEntry;

/// How long a workload request waits for the coordinator before it is refused.
pub const COORDINATOR_DEADLINE: Duration = Duration::from_secs(10);

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
    /// A broker with room for a few dozen waiting jobs.
    pub fn new() -> Arc<Broker> {
        let (tx, rx) = mpsc::channel(64);
        Arc::new(Broker {
            tx,
            rx: Mutex::new(rx),
        })
    }

    /// The registrations of this node, from the coordinator.
    pub async fn list(&self) -> Result<Vec<WorkloadEntry>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::List(reply), answer).await
    }

    /// Asks the coordinator to sign `csr_pem` as `spiffe_id`.
    pub async fn sign(&self, spiffe_id: &str, csr_pem: String) -> Result<Signed, ControlError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Sign {
            spiffe_id: spiffe_id.to_string(),
            csr_pem,
            reply,
        };
        self.submit(job, answer).await
    }

    async fn submit<T>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, ControlError>>,
    ) -> Result<T, ControlError> {
        let unavailable = || ControlError {
            code: "unavailable".into(),
            message: format!(
                "the node has no answer from the coordinator within {}s; the control channel \
                 may be down",
                COORDINATOR_DEADLINE.as_secs()
            ),
        };
        let asked = async {
            self.tx.send(job).await.map_err(|_| unavailable())?;
            answer.await.map_err(|_| unavailable())?
        };
        tokio::time::timeout(COORDINATOR_DEADLINE, asked)
            .await
            .map_err(|_| unavailable())?
    }

    /// Takes the job queue for one control session; waits while another session holds it.
    pub async fn attach(&self) -> SessionPort<'_> {
        SessionPort {
            rx: self.rx.lock().await,
            pending: HashMap::new(),
            next_id: 1,
        }
    }
}

/// A control session's end of the broker: sends jobs, routes answers.
pub struct SessionPort<'a> {
    rx: MutexGuard<'a, mpsc::Receiver<Job>>,
    pending: HashMap<u64, Job>,
    next_id: u64,
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
        let list = tokio::spawn(async move { b.list().await });
        let b = broker.clone();
        let sign =
            tokio::spawn(async move { b.sign("spiffe://corp.example/x", "csr".into()).await });

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
        let list = tokio::spawn(async move { b.list().await });
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

    #[tokio::test]
    async fn with_no_session_a_request_is_refused_as_unavailable() {
        let broker = Broker::new();
        let err = broker.list().await.expect_err("no session");
        assert_eq!(err.code, "unavailable");
        // The abandoned job is skipped when a session attaches later.
        let b = broker.clone();
        let list = tokio::spawn(async move { b.list().await });
        let mut port = broker.attach().await;
        let msg = port.next_message().await;
        let NodeMsg::WorkloadList { request_id } = msg else {
            panic!("expected a list request, got {msg:?}");
        };
        port.handle_answer(&ServerMsg::Workloads {
            request_id,
            entries: vec![],
        });
        assert_eq!(list.await.expect("task").expect("listed"), vec![]);
    }
}
