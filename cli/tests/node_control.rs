//! The node's control client (coordinator mode without TUN) against a real coordinator: the
//! data-plane configurations it would apply are recorded by a sink, everything else is real
//! (QUIC, mutual TLS, the state directory, the coordinator process, the `ztnet` CLI).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Coordinator, WEB_DB_POLICY, expect_failure, wait_for};
use tokio::sync::oneshot;
use ztnet_node::control::DataplaneSink;
use ztnet_node::control::client::{self, EnrollError, Exit, NodeOptions};
use ztnet_node::netconfig::DataplaneConfig;
use ztnet_node::state::StateDir;
use ztnet_proto::JoinToken;

const WAIT: Duration = Duration::from_secs(30);

/// Records every configuration the control client applies.
#[derive(Default)]
struct RecordingSink {
    configs: Mutex<Vec<DataplaneConfig>>,
    connected: AtomicBool,
}

impl RecordingSink {
    fn last(&self) -> Option<DataplaneConfig> {
        self.configs.lock().expect("lock").last().cloned()
    }

    fn peers(&self) -> Vec<String> {
        self.last()
            .map(|c| c.peers.into_iter().map(|p| p.name).collect())
            .unwrap_or_default()
    }

    fn version(&self) -> Option<u64> {
        self.last().and_then(|c| c.version)
    }
}

impl DataplaneSink for RecordingSink {
    fn apply(&self, config: DataplaneConfig) -> anyhow::Result<()> {
        self.configs.lock().expect("lock").push(config);
        Ok(())
    }

    fn listen_port(&self) -> u16 {
        51820
    }

    fn local_endpoints(&self) -> Vec<SocketAddr> {
        vec!["127.0.0.1:51820".parse().expect("addr")]
    }

    fn set_control_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
    }
}

/// A control client running in the background.
struct Node {
    sink: Arc<RecordingSink>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<Exit>>,
}

impl Node {
    fn start(state: &Path, name: &str, token: Option<String>) -> Node {
        Node::start_with(state, name, token, 0.5)
    }

    fn start_with(state: &Path, name: &str, token: Option<String>, renew_fraction: f64) -> Node {
        let sink = Arc::new(RecordingSink::default());
        let opts = NodeOptions {
            state: StateDir::open(state).expect("state dir"),
            coordinator: None,
            token,
            name: name.into(),
            version: "test".into(),
            renew_fraction,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let dyn_sink: Arc<dyn DataplaneSink> = sink.clone();
        let task = tokio::spawn(client::run(opts, dyn_sink, async move {
            let _ = stopped.await;
        }));
        Node {
            sink,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) -> Exit {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("task").expect("clean exit")
    }
}

fn token(c: &Coordinator, network: &str, tag: &str) -> String {
    let out = c
        .cli()
        .args([
            "token",
            "create",
            "--network",
            network,
            "--namespace",
            "production",
        ])
        .args(["--tag", tag])
        .output()
        .expect("ztnet runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn node_json(c: &Coordinator, network: &str, name: &str) -> serde_json::Value {
    c.json(&["node", "show", "--network", network, name])
}

fn acknowledged(c: &Coordinator, network: &str, name: &str) -> bool {
    let n = node_json(c, network, name);
    n["online"] == true && n["applied_version"] == n["netmap_version"] && n["applied_version"] != 0
}

fn apply_policy(c: &Coordinator, network: &str, source: &str, wait: bool) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, source).expect("write");
    let file = file.to_str().expect("utf-8").to_string();
    let mut args = vec!["policy", "apply", "--network", network, "-f", &file];
    if wait {
        args.extend(["--wait", "--timeout", "30s"]);
    }
    c.ok(&args)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_enroll_follow_policy_and_a_deleted_node_stops() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "prod-vpc", "--zero-trust"]);
    apply_policy(&c, "prod-vpc", WEB_DB_POLICY, false);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (web_dir, db_dir) = (dirs.path().join("web"), dirs.path().join("db"));

    let web = Node::start(&web_dir, "web-1", Some(token(&c, "prod-vpc", "web")));
    let db_token = token(&c, "prod-vpc", "db");
    let db = Node::start(&db_dir, "db-1", Some(db_token.clone()));

    wait_for("web-1 to learn db-1", WAIT, || web.sink.peers() == ["db-1"]);
    wait_for("db-1 to learn web-1", WAIT, || db.sink.peers() == ["web-1"]);
    wait_for("both acknowledgements", WAIT, || {
        acknowledged(&c, "prod-vpc", "web-1") && acknowledged(&c, "prod-vpc", "db-1")
    });
    assert!(web.sink.connected.load(Ordering::SeqCst));

    // What the node applied is what the coordinator holds for it.
    let cfg = web.sink.last().expect("a config");
    let db_info = node_json(&c, "prod-vpc", "db-1");
    let peer = &cfg.peers[0];
    assert_eq!(
        peer.public_key.to_base64(),
        db_info["public_key"].as_str().expect("key")
    );
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert!(peer.endpoint.is_some(), "the first endpoint is used");
    assert_eq!(
        peer.identity.as_ref().map(|i| i.tags.clone()),
        Some(vec!["db".to_string()])
    );
    assert!(!cfg.addresses.is_empty() && !cfg.routes.is_empty());
    assert!(!cfg.filter.peers.is_empty());

    // The state directory: private keys private, the netmap persisted.
    assert_eq!(mode(&web_dir), 0o700);
    assert_eq!(mode(&web_dir.join("wg.key")), 0o600);
    assert_eq!(mode(&web_dir.join("tls.key")), 0o600);
    let state = StateDir::open(&web_dir).expect("state");
    let saved = state.netmap().expect("reads").expect("netmap.json written");
    assert_eq!(Some(saved.version.0), web.sink.version());
    let enrollment = state.enrollment().expect("reads").expect("enrollment.json");
    assert_eq!(enrollment.network, "prod-vpc");
    assert_eq!(enrollment.coordinator, c.addr.to_string());
    // The private key never left: the coordinator knows only the public half.
    let wg_key = std::fs::read_to_string(web_dir.join("wg.key")).expect("read");
    assert!(!c.log().contains(wg_key.trim()));

    // A used-up token is refused with a reason that says what to do.
    let again = dirs.path().join("again");
    let opts = NodeOptions {
        state: StateDir::open(&again).expect("state"),
        coordinator: None,
        token: Some(db_token),
        name: "db-2".into(),
        version: "test".into(),
        renew_fraction: 0.5,
    };
    let err = client::enroll(
        &opts,
        opts.token.as_deref().expect("token"),
        db.sink.as_ref(),
    )
    .await
    .expect_err("used up");
    assert!(matches!(err, EnrollError::Refused(_)), "{err}");
    assert!(err.to_string().contains("needs a new token"), "{err}");
    assert!(!again.join("node.pem").exists());

    // Deleting db-1: it stops passing traffic, forgets its netmap and exits; web-1 drops it.
    c.ok(&["node", "delete", "--network", "prod-vpc", "db-1"]);
    let exit = tokio::time::timeout(WAIT, db.task)
        .await
        .expect("db-1 exits in time")
        .expect("task")
        .expect("no error");
    assert!(matches!(exit, Exit::Revoked(_)), "{exit:?}");
    let last = db.sink.last().expect("a config");
    assert!(
        last.peers.is_empty() && last.filter.peers.is_empty(),
        "deny all after revocation"
    );
    assert!(!db_dir.join("netmap.json").exists());
    wait_for("web-1 to drop db-1", WAIT, || web.sink.peers().is_empty());

    // With db-1 gone, a change to the web-db grant alters no netmap: --wait says so instead
    // of timing zero acknowledgements.
    let out = apply_policy(&c, "prod-vpc", &WEB_DB_POLICY.replace("5432", "5433"), true);
    assert!(out.contains("0 node(s) to update"), "{out}");
    assert!(out.contains("no online node had to change"), "{out}");
    assert!(!out.contains("acknowledged in"), "{out}");
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_the_coordinator_starts_from_disk_then_reconnects() {
    let mut c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    apply_policy(&c, "lab", WEB_DB_POLICY, false);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (web_dir, db_dir) = (dirs.path().join("web"), dirs.path().join("db"));
    let web = Node::start(&web_dir, "web-1", Some(token(&c, "lab", "web")));
    let db = Node::start(&db_dir, "db-1", Some(token(&c, "lab", "db")));
    wait_for("web-1 to learn db-1", WAIT, || web.sink.peers() == ["db-1"]);
    let version = web.sink.version();
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
    assert!(matches!(db.shutdown().await, Exit::Shutdown));

    c.stop();
    let web = Node::start(&web_dir, "web-1", None);
    wait_for("the netmap on disk to be applied", WAIT, || {
        web.sink.version() == version
    });
    assert_eq!(
        web.sink.peers(),
        ["db-1"],
        "fail-static: the mesh comes back"
    );
    assert!(!web.sink.connected.load(Ordering::SeqCst));

    c.restart();
    wait_for(
        "the control channel to come back",
        Duration::from_secs(60),
        || web.sink.connected.load(Ordering::SeqCst) && acknowledged(&c, "lab", "web-1"),
    );
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_is_pinned_cleared_and_a_stale_revision_refused() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let web = Node::start(
        &dirs.path().join("web"),
        "web-1",
        Some(token(&c, "lab", "web")),
    );
    wait_for("web-1 enrolled", WAIT, || web.sink.version().is_some());

    let pin = [
        "node",
        "set-endpoint",
        "--network",
        "lab",
        "web-1",
        "127.0.0.1:51999",
    ];
    let out = c.ok(&pin);
    assert!(
        out.contains("pinned to 127.0.0.1:51999 (revision 1)"),
        "{out}"
    );
    let n = node_json(&c, "lab", "web-1");
    assert_eq!(n["pinned_endpoint"], "127.0.0.1:51999");

    let mut stale = c.cli();
    stale.args([
        "node",
        "set-endpoint",
        "-n",
        "lab",
        "web-1",
        "--clear",
        "--revision",
        "0",
    ]);
    let stderr = expect_failure(&mut stale, 1);
    assert!(stderr.contains("409"), "{stderr}");
    let cleared = c.json(&[
        "node",
        "set-endpoint",
        "-n",
        "lab",
        "web-1",
        "--clear",
        "--revision",
        "1",
    ]);
    assert!(cleared["pinned_endpoint"].is_null(), "{cleared}");
    let audit = c.ok(&["audit", "--network", "lab"]);
    assert!(audit.contains("node.set-endpoint"), "{audit}");
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

/// A coordinator killed with SIGKILL closes nothing: the node must notice by the QUIC idle
/// timeout (8 s), then come back through its backoff once the coordinator restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_is_noticed_within_the_idle_timeout() {
    let mut c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let web = Node::start(
        &dirs.path().join("web"),
        "web-1",
        Some(token(&c, "lab", "web")),
    );
    wait_for("the control channel", WAIT, || {
        web.sink.connected.load(Ordering::SeqCst)
    });

    c.stop();
    wait_for("web-1 to notice", Duration::from_secs(12), || {
        !web.sink.connected.load(Ordering::SeqCst)
    });

    c.restart();
    wait_for("the control channel to come back", WAIT, || {
        web.sink.connected.load(Ordering::SeqCst)
    });
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_is_not_waited_for_and_learns_of_its_deletion_at_next_start() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    apply_policy(&c, "lab", WEB_DB_POLICY, false);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (web_dir, db_dir) = (dirs.path().join("web"), dirs.path().join("db"));
    let web = Node::start(&web_dir, "web-1", Some(token(&c, "lab", "web")));
    let db = Node::start(&db_dir, "db-1", Some(token(&c, "lab", "db")));
    wait_for("both to learn each other", WAIT, || {
        web.sink.peers() == ["db-1"] && db.sink.peers() == ["web-1"]
    });
    assert!(matches!(db.shutdown().await, Exit::Shutdown));
    wait_for("db-1 offline", WAIT, || {
        node_json(&c, "lab", "db-1")["online"] == false
    });

    // --wait names the offline node up front and waits only for the online one.
    let file = dirs.path().join("p2.toml");
    std::fs::write(&file, WEB_DB_POLICY.replace("5432", "6432")).expect("write");
    let out = c
        .cli()
        .args(["policy", "apply", "-n", "lab", "-f"])
        .arg(&file)
        .args(["--wait", "--timeout", "20s"])
        .output()
        .expect("ztnet runs");
    common::assert_success(&out, &["policy", "apply", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("db-1 is offline; it gets the policy when it reconnects"),
        "{stderr}"
    );
    assert!(!stderr.contains("web-1"), "web-1 is online: {stderr}");
    assert!(
        stdout.contains("all 1 online node(s) acknowledged"),
        "{stdout}"
    );
    assert!(acknowledged(&c, "lab", "web-1"));

    // Deleted while away: the next start passes nothing and exits with the reason.
    c.ok(&["node", "delete", "--network", "lab", "db-1"]);
    let db = Node::start(&db_dir, "db-1", None);
    let exit = tokio::time::timeout(WAIT, db.task)
        .await
        .expect("exits in time")
        .expect("task")
        .expect("no error");
    let Exit::Revoked(reason) = exit else {
        panic!("expected a revocation, got {exit:?}");
    };
    assert!(!reason.message.is_empty());
    let last = db.sink.last().expect("configs");
    assert!(last.peers.is_empty(), "deny all after revocation");
    assert!(!db_dir.join("netmap.json").exists());
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_another_ca_fingerprint_is_refused_before_the_secret_is_sent() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let real = JoinToken::parse(&token(&c, "lab", "web")).expect("parses");
    let forged = JoinToken {
        coordinator: real.coordinator.clone(),
        ca_fingerprint: "ab".repeat(32),
        secret: real.secret.clone(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = NodeOptions {
        state: StateDir::open(dir.path()).expect("state"),
        coordinator: None,
        token: None,
        name: "web-1".into(),
        version: "test".into(),
        renew_fraction: 0.5,
    };
    let sink = RecordingSink::default();
    let err = client::enroll(&opts, &forged.encode(), &sink)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    let tokens = c.json(&["token", "list", "--network", "lab"]);
    assert_eq!(tokens[0]["uses_left"], 1, "the token was not spent");

    let err = client::enroll(&opts, "ztjoin1_garbage", &sink)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("needs a new token"), "{err}");

    let enrollment = client::enroll(&opts, &real.encode(), &sink)
        .await
        .expect("enrolls");
    assert_eq!(enrollment.name, "web-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificate_is_renewed_and_the_new_one_is_used() {
    let mut c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = StateDir::open(dir.path()).expect("state");
    let opts = NodeOptions {
        state: state.clone(),
        coordinator: None,
        token: None,
        name: "web-1".into(),
        version: "test".into(),
        renew_fraction: 0.0,
    };
    let sink = RecordingSink::default();
    client::enroll(&opts, &token(&c, "lab", "web"), &sink)
        .await
        .expect("enrolls");
    let first = state.certs().expect("reads").expect("enrolled");
    let first_key = std::fs::read_to_string(dir.path().join("tls.key")).expect("key");

    // Renew at once (0% of the life): the node asks as soon as it is connected.
    let node = Node::start_with(dir.path(), "web-1", None, 0.0);
    wait_for("a renewed certificate on disk", WAIT, || {
        state
            .certs()
            .ok()
            .flatten()
            .is_some_and(|c| c.cert_pem != first.cert_pem)
    });
    let key = std::fs::read_to_string(dir.path().join("tls.key")).expect("key");
    assert_ne!(key, first_key, "a renewal comes with a new TLS key");
    assert_eq!(mode(&dir.path().join("tls.key")), 0o600);

    // The coordinator accepts the renewed certificate on the next connection.
    c.restart();
    wait_for(
        "a session with the renewed certificate",
        Duration::from_secs(60),
        || node.sink.connected.load(Ordering::SeqCst) && acknowledged(&c, "lab", "web-1"),
    );
    assert!(matches!(node.shutdown().await, Exit::Shutdown));
}

/// FC-22: a node whose certificate expired while it was away says so plainly and keeps
/// retrying (it does not exit or crash-loop), while it passes nothing from an expired netmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_node_certificate_is_reported_and_retried() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("node");
    let node = Node::start(&state_dir, "web-1", Some(token(&c, "lab", "web")));
    wait_for("enrollment and a netmap", WAIT, || {
        node.sink.version().is_some()
    });
    node.shutdown().await;

    // Age the state: the certificate and the netmap both expired a day ago.
    let state = StateDir::open(&state_dir).expect("state");
    let mut certs = state.certs().expect("reads").expect("enrolled");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["web-1".into()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    certs.cert_pem = params.self_signed(&key).expect("cert").pem();
    state.save_certs(&certs).expect("saved");
    let mut netmap = state.netmap().expect("reads").expect("saved");
    netmap.expires_at = 1;
    state.save_netmap(&netmap).expect("saved");

    let logs = capture_logs();
    let node = Node::start(&state_dir, "web-1", None);
    wait_for("two reports of the expired certificate", WAIT, || {
        logs.text()
            .matches("node certificate expired at 2020-01-02T00:00:00Z")
            .count()
            >= 2
    });
    assert!(!node.task.is_finished(), "the node keeps retrying");
    assert!(
        node.sink.last().is_none(),
        "an expired netmap is never applied"
    );
    assert!(
        logs.text()
            .contains("expired at 1970-01-01T00:00:01Z: not used")
    );
    assert!(!node.sink.connected.load(Ordering::SeqCst));
    node.shutdown().await;
}

/// Log lines captured from every thread of this test process.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Logs {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init()
        .expect("only this test installs a subscriber");
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_exits_and_stays_listed_with_its_reason() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "rev", "--zero-trust"]);
    apply_policy(&c, "rev", WEB_DB_POLICY, false);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (web_dir, db_dir) = (dirs.path().join("web"), dirs.path().join("db"));
    let web = Node::start(&web_dir, "web-1", Some(token(&c, "rev", "web")));
    let db = Node::start(&db_dir, "db-1", Some(token(&c, "rev", "db")));
    wait_for("web-1 to learn db-1", WAIT, || web.sink.peers() == ["db-1"]);

    let out = c.ok(&[
        "node",
        "revoke",
        "--network",
        "rev",
        "db-1",
        "--reason",
        "disk stolen",
    ]);
    assert!(out.contains("revoked node db-1"), "{out}");
    let exit = tokio::time::timeout(WAIT, db.task)
        .await
        .expect("db-1 exits in time")
        .expect("task")
        .expect("no error");
    match &exit {
        Exit::Revoked(why) => assert!(why.message.contains("disk stolen"), "{why:?}"),
        other => panic!("expected Revoked, got {other:?}"),
    }
    wait_for("web-1 to drop db-1", WAIT, || web.sink.peers().is_empty());

    let table = c.ok(&["node", "list", "--network", "rev"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("db-1"))
        .unwrap_or_else(|| panic!("db-1 not listed:\n{table}"));
    assert!(row.contains("revoked (disk stolen)"), "{table}");
    let listed = c.json(&["node", "list", "--network", "rev"]);
    let db_row = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|n| n["name"] == "db-1")
        .expect("db-1 in the JSON list");
    assert_eq!(db_row["state"], "revoked");
    assert_eq!(db_row["revoke_reason"], "disk stolen");
    let audit = c.ok(&["audit", "--network", "rev"]);
    assert!(
        audit.contains("node.revoke") && audit.contains("disk stolen"),
        "{audit}"
    );
    // A second revoke says that the node was revoked, and why.
    let err = expect_failure(
        c.cli().args(["node", "revoke", "--network", "rev", "db-1"]),
        1,
    );
    assert!(
        err.contains("was revoked at") && err.contains("disk stolen"),
        "{err}"
    );
    assert!(matches!(web.shutdown().await, Exit::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_can_reach_and_diff_read_the_policy_in_force_and_the_nodes() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "rev2"]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for (name, tag) in [("web-1", "web"), ("db-1", "db"), ("ops-1", "ops")] {
        let t = token(&c, "rev2", tag);
        nodes.push(Node::start(&dirs.path().join(name), name, Some(t)));
    }
    wait_for("three nodes enrolled", WAIT, || {
        c.json(&["node", "list", "--network", "rev2"])
            .as_array()
            .is_some_and(|a| a.len() == 3)
    });
    let who = ["policy", "who-can-reach", "--network", "rev2", "db-1"];

    // No policy yet: nobody.
    let out = c.ok(&[&who[..], &["--port", "tcp:5432"]].concat());
    assert!(out.contains("no policy in force"), "{out}");

    apply_policy(&c, "rev2", WEB_DB_POLICY, false);
    let out = c.ok(&[&who[..], &["--port", "tcp:5432"]].concat());
    let row = out
        .lines()
        .find(|l| l.starts_with("web-1"))
        .unwrap_or_else(|| panic!("web-1 missing:\n{out}"));
    assert!(row.contains("grant[0]"), "{out}");
    assert!(!out.contains("ops-1"), "{out}");
    let json = c.json(&[&who[..], &["--port", "tcp:5432"]].concat());
    let names: Vec<&str> = json["reachers"]
        .as_array()
        .expect("reachers")
        .iter()
        .filter_map(|r| r["node"].as_str())
        .collect();
    assert_eq!(names, ["web-1"], "{json}");
    let out = c.ok(&[&who[..], &["--port", "tcp:22"]].concat());
    assert!(out.contains("no node may reach db-1 on tcp:22"), "{out}");
    let err = expect_failure(
        c.cli().args([
            "policy",
            "who-can-reach",
            "--network",
            "rev2",
            "db-9",
            "--port",
            "tcp:5432",
        ]),
        1,
    );
    assert!(err.contains("db-9"), "{err}");
    let err = expect_failure(
        c.cli().args([&who[..], &["--port", "tcp:http"]].concat()),
        1,
    );
    assert!(err.contains("--port"), "{err}");

    // The diff against a document that gives ops everything and takes web's access away.
    let new = dirs.path().join("new.toml");
    std::fs::write(
        &new,
        "[[grant]]\nfrom = [\"tag:ops\"]\nto = [\"*\"]\nports = [\"any\"]\n",
    )
    .expect("write");
    let new = new.to_str().expect("utf-8");
    let diff = c.json(&["policy", "diff", "--network", "rev2", "-f", new]);
    let pairs = |key: &str| -> Vec<(String, String, String)> {
        diff[key]
            .as_array()
            .expect("array")
            .iter()
            .map(|p| {
                (
                    p["from"].as_str().expect("from").to_owned(),
                    p["to"].as_str().expect("to").to_owned(),
                    p["ports"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        pairs("removed"),
        [("web-1".into(), "db-1".into(), r#"["tcp:5432"]"#.into())],
        "{diff}"
    );
    let added = pairs("added");
    assert!(
        added.contains(&("ops-1".into(), "db-1".into(), r#"["any"]"#.into()))
            && added.contains(&("ops-1".into(), "web-1".into(), r#"["any"]"#.into())),
        "{diff}"
    );
    let table = c.ok(&["policy", "diff", "--network", "rev2", "-f", new]);
    assert!(
        table.contains("- removed") && table.contains("+ added"),
        "{table}"
    );
    // Nothing was applied.
    let shown = c.ok(&["policy", "show", "--network", "rev2"]);
    assert!(shown.contains("tag:web"), "{shown}");

    // A revoked node reaches nobody any more.
    c.ok(&["node", "revoke", "--network", "rev2", "web-1"]);
    let out = c.ok(&[&who[..], &["--port", "tcp:5432"]].concat());
    assert!(out.contains("no node may reach db-1"), "{out}");
    for n in nodes {
        let _ = tokio::time::timeout(WAIT, n.shutdown()).await;
    }
}
