//! Issue 6, revoking what else grants access, against the real binaries: a revoked join token
//! that was never used cannot enroll; a deleted workload registration is not renewed for the
//! workload that holds an SVID under it (`ztnet identity fetch --watch` keeps failing, and no
//! new certificate appears); admin API keys are several, stored hashed, shown once, and a
//! revoked key gets 401 on its very next request. Needs root (the coordinator and nodes run in
//! namespaces).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ztnet_integration::topology::{COORDINATOR_ADDR, NETWORK, Topology, story_nodes};
use ztnet_integration::{Netns, Proc, bin, require_root, wait_for};

const API: &str = "spiffe://corp.example/ns/production/sa/api";

/// `ztnet ARGS` in the coordinator's namespace with the API key in `key_file`.
fn ztnet_with(topo: &Topology, key_file: &Path, args: &[&str]) -> Output {
    let data = topo.coordinator_dir();
    topo.coord_ns
        .command(bin("ztnet"))
        .args(args)
        .env("ZTNET_COORDINATOR", COORDINATOR_ADDR)
        .env("ZTNET_API_KEY_FILE", key_file)
        .env("ZTNET_CA_CERT", data.join("ca.pem"))
        .env_remove("ZTNET_API_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run ztnet")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_revoked_token_cannot_enroll_and_a_revoked_api_key_is_refused_at_once() -> Result<()> {
    require_root();
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1")
        .collect();
    let mut topo = Topology::build(&specs)?;
    topo.start_coordinator()?;
    topo.create_network()?;

    // A token revoked before any use: the node that presents it is refused and exits.
    let created = topo.ztnet_json(&[
        "token",
        "create",
        "--network",
        NETWORK,
        "--namespace",
        "production",
        "--tag",
        "web",
        "--uses",
        "1",
    ])?;
    let token = created["token"].as_str().context("token")?.to_string();
    let id = created["info"]["id"]
        .as_str()
        .context("token id")?
        .to_string();
    let out = topo.ztnet(&["token", "revoke", "--network", NETWORK, &id])?;
    assert!(out.contains(&format!("revoked token {id}")), "{out}");
    let listed = topo.ztnet(&["token", "list", "--network", NETWORK])?;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("revoked")),
        "{listed}"
    );
    topo.start_node("web1", Some(&token))?;
    let (status, log) = topo.wait_exit("web1", Duration::from_secs(30))?;
    assert!(!status.success(), "enrolling with a revoked token fails");
    assert!(log.contains("revoked"), "the node says why: {log}");
    let list = topo.node_list()?;
    assert!(list.is_empty(), "nothing enrolled: {list:?}");

    // Several API keys: a new one is printed once, alone on stdout.
    let admin_key = topo.coordinator_dir().join("admin.key");
    let made = ztnet_with(&topo, &admin_key, &["api-key", "create", "ci-deploy"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let key = text(&made.stdout).trim().to_string();
    assert!(key.starts_with("ztkey_") && key.len() == 6 + 64, "{key:?}");
    assert!(
        text(&made.stderr).contains("shown this once"),
        "{}",
        text(&made.stderr)
    );
    let key_file = topo.dir.path().join("ci-deploy.key");
    std::fs::write(&key_file, format!("{key}\n"))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let dup = ztnet_with(&topo, &admin_key, &["api-key", "create", "ci-deploy"]);
    assert!(!dup.status.success(), "a name is never reused");
    assert!(
        text(&dup.stderr).contains("names are never reused"),
        "{}",
        text(&dup.stderr)
    );

    // The new key works, and is the actor of what it does.
    let used = ztnet_with(
        &topo,
        &key_file,
        &["network", "create", "--name", "ci-net", "--zero-trust"],
    );
    assert!(used.status.success(), "{}", text(&used.stderr));
    let audit = topo.ztnet_json(&["audit", "--network", "ci-net"])?;
    assert!(
        audit
            .as_array()
            .is_some_and(|v| v.iter().any(|e| e["actor"] == "ci-deploy")),
        "{audit}"
    );
    let keys = topo.ztnet(&["api-key", "list"])?;
    assert!(
        keys.lines()
            .any(|l| l.starts_with("admin") && l.contains("live"))
            && keys
                .lines()
                .any(|l| l.starts_with("ci-deploy") && l.contains("live")),
        "{keys}"
    );
    assert!(!keys.contains(&key), "the list never shows a key");

    // Stored hashed: the key itself is nowhere in the database.
    let db = topo.coordinator_dir().join("coordinator.db");
    let dump = Command::new("sqlite3")
        .arg(&db)
        .arg(".dump api_keys")
        .output()?;
    let dump = text(&dump.stdout);
    assert!(dump.contains("ci-deploy"), "{dump}");
    assert!(
        !dump.contains(&key[6..]),
        "the database holds the key in clear: {dump}"
    );

    // Revoked: the very next request with it gets 401.
    let out = topo.ztnet(&["api-key", "revoke", "ci-deploy"])?;
    assert!(out.contains("revoked API key ci-deploy"), "{out}");
    let refused = ztnet_with(&topo, &key_file, &["network", "list"]);
    assert!(!refused.status.success(), "a revoked key is refused");
    let why = text(&refused.stderr);
    assert!(
        why.contains("401") || why.contains("not recognised"),
        "{why}"
    );
    let keys = topo.ztnet(&["api-key", "list"])?;
    assert!(
        keys.lines()
            .any(|l| l.starts_with("ci-deploy") && l.contains("revoked") && l.contains("admin")),
        "{keys}"
    );

    // The last live key cannot be revoked: that would lock every operator out.
    let last = ztnet_with(&topo, &admin_key, &["api-key", "revoke", "admin"]);
    assert!(!last.status.success());
    assert!(
        text(&last.stderr).contains("last one"),
        "{}",
        text(&last.stderr)
    );
    assert!(
        topo.ztnet(&["network", "list"]).is_ok(),
        "admin still works"
    );
    Ok(())
}

/// `ztnet` in `ns` as `uid` (same gid, no supplementary groups).
fn as_uid(ns: &Netns, uid: u32) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(bin("ztnet"))
        .stdin(Stdio::null());
    cmd
}

fn serial(cert: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-enddate", "-in"])
        .arg(cert)
        .output()?;
    if !out.status.success() {
        bail!("openssl x509: {}", text(&out.stderr));
    }
    Ok(text(&out.stdout))
}

/// Removes the workload socket even if the test fails.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_deleted_workload_registration_is_not_renewed() -> Result<()> {
    require_root();
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1")
        .collect();
    let mut topo = Topology::build(&specs)?;
    let iface = topo.node("web1").iface.clone();
    let _socket = SocketGuard(Path::new("/var/run/ztnet").join(format!("{iface}.workload.sock")));
    topo.start_coordinator()?;
    topo.create_network()?;
    let token = topo.token_for("web1")?;
    topo.start_node("web1", Some(&token))?;
    topo.wait_online(&["web1"], Duration::from_secs(60))?;
    let registered = topo.ztnet_json(&[
        "workload",
        "register",
        "--network",
        NETWORK,
        "--spiffe-id",
        API,
        "--node",
        "web1",
        "--selector",
        "unix:uid:1001",
        "--ttl",
        "10s",
    ])?;
    let id = registered["id"].as_u64().context("registration id")?;

    // A directory the workload's uid can write.
    let files = tempfile::Builder::new().prefix("ztnet-grants-").tempdir()?;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755))?;
    let dir = files.path().join("svid");
    std::fs::create_dir(&dir)?;
    std::os::unix::fs::chown(&dir, Some(1001), Some(1001))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let out = dir.join("svid.pem");
    let mut cmd = as_uid(&topo.node("web1").ns, 1001);
    cmd.args([
        "identity",
        "fetch",
        "--format",
        "x509",
        "--watch",
        "--interface",
    ])
    .arg(&iface)
    .arg("--output")
    .arg(&out);
    let log = files.path().join("watch.log");
    let mut watcher = Proc::spawn(cmd, &log)?;

    // The first SVID, then one renewal: renewal works while the registration exists.
    let mut seen: Vec<String> = Vec::new();
    wait_for("an SVID and one renewal", Duration::from_secs(30), || {
        if let Some(st) = watcher.try_wait() {
            bail!("--watch exited ({st}): {}", watcher.log());
        }
        if out.exists() {
            let s = serial(&out)?;
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
        Ok((seen.len() >= 2).then_some(()))
    })?;

    topo.ztnet(&["workload", "delete", "--network", NETWORK, &id.to_string()])?;
    let kept = serial(&out)?;
    // The SVID lives 10 s and is renewed at half: for 12 s, well past its expiry, no new one.
    let mut failures = 0;
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        if let Some(st) = watcher.try_wait() {
            bail!("--watch exited ({st}): {}", watcher.log());
        }
        assert_eq!(
            serial(&out)?,
            kept,
            "a certificate was renewed after its registration was deleted"
        );
        failures = watcher.log().matches("renewal failed").count();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        failures >= 1,
        "the watcher says its renewal is refused: {}",
        watcher.log()
    );
    eprintln!(
        "workload: {} renewal attempts refused after the delete; the last one: {}",
        failures,
        watcher
            .log()
            .lines()
            .rev()
            .find(|l| l.contains("renewal failed"))
            .unwrap_or_default()
    );
    watcher.stop(Duration::from_secs(5));
    let audit = topo.ztnet(&["audit", "--network", NETWORK])?;
    assert!(audit.contains("workload.delete"), "{audit}");
    Ok(())
}
