//! In-process nodes for the access-review tests: the real control client over QUIC with a data
//! plane that applies nothing, since those tests read only what the coordinator says.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use ztnet_node::control::DataplaneSink;
use ztnet_node::control::client::{self, Exit, NodeOptions};
use ztnet_node::netconfig::DataplaneConfig;
use ztnet_node::state::StateDir;

use super::Coordinator;

/// How long a node is given to stop.
const WAIT: Duration = Duration::from_secs(30);

/// Takes every configuration and applies nothing: the review reads the coordinator only.
pub struct NullSink;

impl DataplaneSink for NullSink {
    fn apply(&self, _config: DataplaneConfig) -> anyhow::Result<()> {
        Ok(())
    }

    fn listen_port(&self) -> u16 {
        51820
    }

    fn local_endpoints(&self) -> Vec<SocketAddr> {
        vec!["127.0.0.1:51820".parse().expect("addr")]
    }

    fn set_control_connected(&self, _connected: bool) {}
}

/// A control client (the real one, over QUIC) running in the background.
pub struct Node {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<Exit>>,
}

impl Node {
    pub fn start(state: &Path, name: &str, token: String) -> Node {
        let opts = NodeOptions {
            state: StateDir::open(state).expect("state dir"),
            coordinator: None,
            token: Some(token),
            name: name.into(),
            version: "0.9.0".into(),
            renew_fraction: 0.5,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let sink: Arc<dyn DataplaneSink> = Arc::new(NullSink);
        let task = tokio::spawn(client::run(opts, sink, async move {
            let _ = stopped.await;
        }));
        Node {
            stop: Some(stop),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

pub fn token(c: &Coordinator, network: &str, tag: &str) -> String {
    let args = [
        "token",
        "create",
        "--network",
        network,
        "--namespace",
        "production",
        "--tag",
        tag,
    ];
    c.ok(&args).trim().to_string()
}
