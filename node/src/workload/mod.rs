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
