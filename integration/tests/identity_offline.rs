//! What a fresh user of workload identity ran into, end to end with a real coordinator and node
//! in namespaces and `ztnet identity fetch` run as another uid:
//! - a second `--output` name in a directory that holds an SVID is refused, naming the other
//!   file, and the SVID there is left as it was;
//! - once the node has lost its control channel (the coordinator stopped), a fetch is refused
//!   at once, saying since when the node has had no control connection, instead of after the
//!   10 s deadline.
//!
//! Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ztnet_integration::topology::{NETWORK, Topology, story_nodes};
use ztnet_integration::{Netns, bin, require_root, wait_for};

const API: &str = "spiffe://corp.example/ns/production/sa/api";
const UID: u32 = 1001;

/// Removes the node's workload socket even when the daemon was killed before it could.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `ztnet identity fetch --output OUT` as uid 1001 in `ns`.
fn fetch(ns: &Netns, iface: &str, out: &Path) -> Result<Output> {
    ns.command("setpriv")
        .arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups")
        .arg(bin("ztnet"))
        .args(["identity", "fetch", "--interface", iface, "--output"])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .context("run ztnet identity fetch")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[test]
fn a_shared_directory_and_a_cut_off_node_are_refused_in_plain_words_at_once() -> Result<()> {
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
    topo.ztnet(&[
        "workload",
        "register",
        "--network",
        NETWORK,
        "--spiffe-id",
        API,
        "--node",
        "web1",
        "--selector",
        &format!("unix:uid:{UID}"),
    ])?;

    let root = tempfile::Builder::new()
        .prefix("ztnet-svid-off-")
        .tempdir()?;
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
    let dir = root.path().join("certs");
    fs::create_dir(&dir)?;
    std::os::unix::fs::chown(&dir, Some(UID), Some(UID))?;

    let first = fetch(&topo.node("web1").ns, &iface, &dir.join("svid.pem"))?;
    assert!(first.status.success(), "{}", stderr(&first));
    let key = fs::read(dir.join("svid.key"))?;

    // A second --output name in the same directory.
    let second = fetch(&topo.node("web1").ns, &iface, &dir.join("t.pem"))?;
    assert!(!second.status.success(), "a second name was written");
    let text = stderr(&second);
    assert!(
        text.contains(&format!(
            "{} holds another SVID",
            dir.join("svid.pem").display()
        )) && text.contains("into another directory"),
        "{text}"
    );
    assert_eq!(fs::read(dir.join("svid.key"))?, key, "the key was replaced");
    assert!(fs::symlink_metadata(dir.join("t.pem")).is_err());

    // The node loses its control channel.
    topo.stop_coordinator();
    let cut_off = "has no control connection to the coordinator since";
    wait_for(
        "the node to say it has no control connection",
        Duration::from_secs(60),
        || {
            let out = fetch(&topo.node("web1").ns, &iface, &dir.join("svid.pem"))?;
            assert!(!out.status.success(), "an SVID with no coordinator");
            Ok(stderr(&out).contains(cut_off).then_some(()))
        },
    )?;
    let started = Instant::now();
    let out = fetch(&topo.node("web1").ns, &iface, &dir.join("svid.pem"))?;
    let took = started.elapsed();
    let text = stderr(&out);
    println!("refusal with no control session took {took:?}: {text}");
    assert!(
        text.contains(cut_off) && text.contains("cannot issue an SVID now; retry later"),
        "{text}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused after {took:?}, not at once"
    );
    assert_eq!(
        fs::read(dir.join("svid.key"))?,
        key,
        "the SVID on disk stays"
    );
    Ok(())
}
