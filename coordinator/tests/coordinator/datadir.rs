//! Signals from the data directory and the process: a changed trust domain refused, a lost
//! admin key file reported, each error cause said once, a cloned node identity warned about,
//! admin bodies with unknown fields refused, a second coordinator on one directory refused.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{DEADLINE, TestNode, eventually, start};

/// Runs the binary with these arguments and collects stderr lines on a channel.
fn spawn(dir: &Path, trust_domain: &str, listen: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztnet-coordinator"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--trust-domain", trust_domain, "--listen", listen])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the coordinator binary runs");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collects lines until one contains `until` or the stream ends; returns all of them.
fn read_until(rx: &mpsc::Receiver<String>, until: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut all = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                all.push_str(&line);
                all.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    all
}

fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait works") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_start_with_another_trust_domain_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    start(tmp.path()).stop();

    let (mut child, rx) = spawn(tmp.path(), "other.example", "127.0.0.1:0");
    let code = wait_exit(&mut child);
    let log = read_until(&rx, "\u{0}");

    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("\"corp.example\"") && log.contains("\"other.example\""),
        "{log}"
    );
    let again = start(tmp.path());
    assert!(again.log().contains("coordinator started"));
}

#[test]
fn a_second_coordinator_on_one_data_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = start(tmp.path());
    let pid = first.child.id();

    let (mut child, rx) = spawn(tmp.path(), "corp.example", "127.0.0.1:0");
    let code = wait_exit(&mut child);
    let log = read_until(&rx, "\u{0}");
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!("another ztnet-coordinator (pid {pid}) is running")),
        "{log}"
    );
    assert!(!log.contains("ready"), "{log}");

    // The lock goes with the process, so the next start after it takes the directory.
    first.stop();
    let again = start(tmp.path());
    assert!(again.log().contains("coordinator started"));
}

#[tokio::test]
async fn a_revoked_first_admin_key_is_not_pointed_at_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.ok("POST", "/v1/api-keys", Some(json!({"name": "ci"})))
        .await;
    api.ok("DELETE", "/v1/api-keys/admin", None).await;
    coord.stop();

    let (mut child, rx) = spawn(tmp.path(), "corp.example", "127.0.0.1:0");
    let log = read_until(&rx, "ready");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("the first admin key (admin.key) was revoked"),
        "{log}"
    );
    let ready = log
        .lines()
        .find(|l| l.contains("ready"))
        .expect("a ready line");
    assert!(!ready.contains("admin_key="), "{ready}");
}

#[test]
fn a_missing_admin_key_file_is_reported_and_not_claimed() {
    let tmp = tempfile::tempdir().unwrap();
    start(tmp.path()).stop();
    std::fs::remove_file(tmp.path().join("admin.key")).unwrap();

    let (mut child, rx) = spawn(tmp.path(), "corp.example", "127.0.0.1:0");
    let log = read_until(&rx, "ready");
    let _ = child.kill();
    let _ = child.wait();

    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("first admin key file is gone"), "{log}");
    let ready = log
        .lines()
        .find(|l| l.contains("ready"))
        .expect("a ready line");
    assert!(!ready.contains("admin_key="), "{ready}");
    assert!(
        !tmp.path().join("admin.key").exists(),
        "a second key was made"
    );
}

#[test]
fn a_port_in_use_is_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();

    let (mut child, rx) = spawn(tmp.path(), "corp.example", &listen);
    let code = wait_exit(&mut child);
    let log = read_until(&rx, "\u{0}");

    assert_eq!(code, Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.contains("error:"))
        .expect("an error line");
    assert_eq!(error.matches("in use").count(), 1, "{error}");
    assert!(error.contains("admin API"), "{error}");
}

#[tokio::test]
async fn admin_bodies_with_unknown_fields_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();

    let body = json!({"name": "lab", "zero_trust": true, "cidrr": "100.64.0.0/24"});
    let (status, _) = api.call("POST", "/v1/networks", Some(body)).await;

    assert!((400..500).contains(&status), "status {status}");
    let (status, _) = api.get("/v1/networks/lab").await;
    assert_eq!(status, 404, "the refused call made the network");
}

#[tokio::test]
async fn one_identity_from_two_addresses_is_warned_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &["web"], 1).await;
    let mut web1 = TestNode::new("web1", 51820);
    web1.enroll(&coord, &token).await;

    let mut first = web1.connect(&coord).await;
    first.full().await;
    let mut second = web1.connect(&coord).await;
    second.full().await;

    let log = eventually("the conflict warning", || {
        let log = coord.log();
        async move { log.contains("a copied state directory?").then_some(log) }
    })
    .await;
    let line = log
        .lines()
        .find(|l| l.contains("copied state directory"))
        .unwrap();
    assert!(line.contains("WARN") && line.contains("web1"), "{line}");
    assert!(line.matches("127.0.0.1:").count() >= 2, "{line}");
    let health = api.ok("GET", "/v1/health", None).await;
    assert_eq!(health["identity_conflicts"], 1);
}

#[tokio::test]
async fn audit_details_give_times_in_rfc_3339() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("lab").await;
    api.token("lab", "production", &["web"], 1).await;

    let audit = api.ok("GET", "/v1/networks/lab/audit", None).await;

    let detail = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "token.create")
        .and_then(|e| e["detail"].as_str())
        .expect("a token.create entry")
        .to_string();
    let at = detail.split("expires at ").nth(1).expect("an expiry");
    assert!(
        at.len() == 20 && at.starts_with("20") && at.ends_with('Z') && at.contains('T'),
        "{detail}"
    );
}
