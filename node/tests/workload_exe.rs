//! The workload API run in a process whose capabilities are cut like the shipped systemd unit's
//! (`setpriv --bounding-set`), asked by a real caller of another uid (`setpriv --reuid 65534
//! socat`). Without `CAP_SYS_PTRACE` the node cannot read the caller's `/proc/PID/exe`: the
//! refusal must say so and why, the log must WARN once at start and once per cause (not once per
//! call). With the capabilities of the shipped unit (`deploy/systemd/ztnet-node.service`, read
//! here), the same caller is named by its executable.
//!
//! The server is this test binary itself, run again under `setpriv` with `INNER` set; the outer
//! test keeps its full capabilities to start the caller under another uid. Needs root and
//! `setpriv`/`socat`; without them the test says so and passes nothing off as checked.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztnet_node::workload::{Broker, api};
use ztnet_proto::control::{NodeMsg, ServerMsg};
use ztnet_proto::workload::{Selector, SpiffeId, WorkloadEntry, WorkloadReply};

/// Set in the server process: the socket path to serve on.
const INNER: &str = "ZTNET_TEST_WORKLOAD_EXE_SOCKET";
/// The uid and gid of the caller (nobody).
const CALLER_ID: &str = "65534";

/// The server side: a broker whose session answers every list with one registration for an
/// executable no caller runs, so that every caller is refused and the refusal names the
/// executable the node saw. Serves until stdin closes.
fn inner(socket: &Path) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let broker = Broker::new();
        let listener = api::bind(socket).expect("bind the workload socket");
        let server = tokio::spawn(api::serve(listener, broker.clone()));
        let session = tokio::spawn(answer_lists(broker));
        // The outer test closes stdin when it is done.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .expect("stdin reader");
        server.abort();
        session.abort();
    });
}

async fn answer_lists(broker: Arc<Broker>) {
    let mut port = broker.attach().await;
    loop {
        if let NodeMsg::WorkloadList { request_id } = port.next_message().await {
            port.handle_answer(&ServerMsg::Workloads {
                request_id,
                entries: vec![WorkloadEntry {
                    spiffe_id: SpiffeId::parse("spiffe://corp.example/ns/t/sa/api")
                        .expect("valid id"),
                    selectors: vec![Selector::Path("/nonexistent/ztnet-test-api".into())],
                    ttl_secs: 60,
                }],
            });
        }
    }
}

/// Kills the server by its pid when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the test can run here, or why not.
fn missing_tools() -> Option<String> {
    // The effective uid, from /proc.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Some("not root".into());
    }
    for tool in ["setpriv", "socat"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("no {tool}"));
        }
    }
    None
}

/// Starts this binary as the server under `setpriv --bounding-set BOUNDING`; returns it, its
/// stderr lines as they come, and the socket once it answers.
fn start_server(
    name: &str,
    bounding: &str,
    dir: &Path,
) -> (Server, std::sync::mpsc::Receiver<String>, PathBuf) {
    let socket = dir.join(format!("{name}.workload.sock"));
    let mut child = Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .arg(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "inner_server",
            "--nocapture",
            "--include-ignored",
        ])
        .env(INNER, &socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server under setpriv");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "the server never listened on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, rx, socket)
}

/// One request from a process of uid and gid 65534; the answer.
fn ask_as_nobody(socket: &Path) -> WorkloadReply {
    let mut caller = Command::new("setpriv")
        .args(["--reuid", CALLER_ID, "--regid", CALLER_ID, "--clear-groups"])
        .args(["socat", "-t", "15", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the caller");
    caller
        .stdin
        .take()
        .expect("piped")
        .write_all(b"{\"op\":\"fetch_x509\"}\n")
        .expect("send the request");
    let out = caller.wait_with_output().expect("the caller ends");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "no answer ({e}): {text:?}, caller stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn refusal(reply: WorkloadReply) -> String {
    match reply {
        WorkloadReply::Refused { code, message } => {
            assert_eq!(code, "no-match", "{message}");
            message
        }
        WorkloadReply::Svids { .. } => panic!("an SVID for an executable nobody runs"),
    }
}

/// The server's stderr lines, collected until `done` says they are enough (or a deadline).
fn lines_until(
    rx: &std::sync::mpsc::Receiver<String>,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while !done(&lines) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "log never showed what was expected: {lines:#?}"
        );
        if let Ok(l) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
            lines.push(l);
        }
    }
    lines
}

/// A directory the caller of uid 65534 can reach the socket in.
fn reachable_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn cap_eff_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server's status")
}

/// Run only as the server process of the tests below.
#[test]
#[ignore = "the server half of the tests below, started by them"]
fn inner_server() {
    if let Some(socket) = std::env::var_os(INNER) {
        inner(Path::new(&socket));
    }
}

#[test]
fn without_cap_sys_ptrace_the_refusal_names_the_error_and_the_log_says_it_once() {
    if let Some(why) = missing_tools() {
        eprintln!("SKIPPED: {why}; needs root, setpriv and socat");
        return;
    }
    let dir = reachable_dir();
    // The capabilities of the unit as a new user found it.
    let (server, log, socket) = start_server(
        "wlexe-noptrace",
        "-all,+net_admin,+net_bind_service",
        dir.path(),
    );
    let status = cap_eff_of(server.0.id());
    assert_eq!(
        api::has_sys_ptrace(&status),
        Some(false),
        "the server still holds CAP_SYS_PTRACE: {status}"
    );

    let first = refusal(ask_as_nobody(&socket));
    let second = refusal(ask_as_nobody(&socket));

    for message in [&first, &second] {
        assert!(
            message.contains("executable unknown: cannot read /proc/")
                && message.contains("/exe: Permission denied")
                && message.contains("the node needs CAP_SYS_PTRACE"),
            "the refusal does not say why: {message}"
        );
    }
    let lines = lines_until(&log, |l| {
        l.iter().filter(|l| l.contains("no registration")).count() >= 2
    });
    let start_warns = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("lacks CAP_SYS_PTRACE"))
        .count();
    let read_warns = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("/exe: Permission denied"))
        .count();
    assert_eq!(start_warns, 1, "one warning at start: {lines:#?}");
    assert_eq!(
        read_warns, 1,
        "one warning per cause, not per call: {lines:#?}"
    );
    drop(server);
}

/// The shipped node unit's `CapabilityBoundingSet`, as `setpriv --bounding-set` takes it.
fn units_bounding_set() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/ztnet-node.service");
    let text = std::fs::read_to_string(&unit).expect("the shipped node unit");
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        let name = cap.strip_prefix("CAP_").expect("a capability name");
        set.push_str(&format!(",+{}", name.to_ascii_lowercase()));
    }
    set
}

#[test]
fn with_the_shipped_units_capabilities_a_caller_of_another_uid_is_named_by_its_executable() {
    if let Some(why) = missing_tools() {
        eprintln!("SKIPPED: {why}; needs root, setpriv and socat");
        return;
    }
    let dir = reachable_dir();
    let bounding = units_bounding_set();
    let (server, log, socket) = start_server("wlexe-unit", &bounding, dir.path());
    assert_eq!(
        api::has_sys_ptrace(&cap_eff_of(server.0.id())),
        Some(true),
        "the unit's set {bounding} lacks CAP_SYS_PTRACE"
    );

    let message = refusal(ask_as_nobody(&socket));

    let socat = std::fs::canonicalize("/usr/bin/socat")
        .or_else(|_| which("socat"))
        .expect("socat's path");
    assert!(
        message.contains(&format!(
            "uid 65534, gid 65534, executable {}",
            socat.display()
        )),
        "{message}"
    );
    let lines = lines_until(&log, |l| l.iter().any(|l| l.contains("no registration")));
    assert!(
        !lines.iter().any(|l| l.contains("WARN")),
        "no warning with the unit's capabilities: {lines:#?}"
    );
    drop(server);
}

fn which(tool: &str) -> std::io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(p).unwrap_or_default())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, tool.to_string()))
}
