//! FC-22 for node certificates, end to end: a node restarted with a node certificate that has
//! expired, or that is not valid yet (its NotBefore is ahead of every clock here, as a clock
//! skew would make it), says so in plain words ("expired", "clock skew"), keeps retrying
//! without crash-looping, and connects again through the normal path as soon as a valid
//! certificate is back in its state directory. The bad certificates are made with `openssl
//! ca` from the coordinator's own CA and the node's own TLS key, so only their dates are wrong.
//! Needs root.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use ztnet_integration::topology::{Topology, story_nodes};
use ztnet_integration::{require_root, wait_for};

#[test]
fn a_node_with_an_expired_or_not_yet_valid_certificate_says_so_and_recovers() -> Result<()> {
    require_root();
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1")
        .collect();
    let mut topo = Topology::build(&specs)?;
    topo.start_coordinator()?;
    topo.create_network()?;
    let token = topo.token_for("web1")?;
    topo.start_node("web1", Some(&token))?;
    topo.wait_online(&["web1"], Duration::from_secs(60))?;
    topo.stop_node("web1")?;
    wait_offline(&topo)?;

    let state = topo.node("web1").state_dir.clone();
    let good = fs::read_to_string(state.join("node.pem"))?;
    let work = tempfile::tempdir()?;
    let cases = [
        (
            "expired",
            "20200101000000Z",
            "20200102000000Z",
            "expired at 2020-01-02",
        ),
        (
            "not yet valid",
            "20990101000000Z",
            "20990102000000Z",
            "clock skew",
        ),
    ];
    for (what, start, end, says) in cases {
        let bad = sign_with_dates(&topo.coordinator_dir(), &state, work.path(), start, end)?;
        fs::write(state.join("node.pem"), bad)?;
        let log_before = node_log(&topo);
        topo.start_node("web1", None)?;
        // It says what is wrong, more than once (it retries), and keeps running.
        wait_for(
            &format!("web1 to report its {what} certificate twice"),
            Duration::from_secs(60),
            || {
                let log = node_log(&topo);
                let new = &log[log_before.len().min(log.len())..];
                if !running(&mut topo) {
                    bail!("ztnet-node exited on a {what} certificate:\n{new}");
                }
                Ok((new.matches(says).count() >= 2).then_some(()))
            },
        )?;
        assert!(running(&mut topo), "no crash loop on a {what} certificate");
        let listed = topo.node_list()?;
        assert_eq!(
            listed[0]["online"], false,
            "refused by the coordinator: {listed:?}"
        );

        // The normal path: a valid certificate back in place, and the running node connects.
        fs::write(state.join("node.pem"), &good)?;
        topo.wait_online(&["web1"], Duration::from_secs(60))?;
        topo.stop_node("web1")?;
        wait_offline(&topo)?;
    }
    Ok(())
}

/// A certificate for the node's own TLS key, signed by the coordinator's CA, valid from
/// `start` to `end` (openssl's YYYYMMDDHHMMSSZ).
fn sign_with_dates(
    coordinator: &Path,
    state: &Path,
    work: &Path,
    start: &str,
    end: &str,
) -> Result<String> {
    let (ca_cert, ca_key) = if coordinator.join("ca-state.json").exists() {
        bail!("this test expects the first CA, not a rotated one");
    } else {
        (coordinator.join("ca.pem"), coordinator.join("ca.key"))
    };
    let dir = work.join(start);
    fs::create_dir_all(dir.join("certs"))?;
    fs::write(dir.join("index.txt"), "")?;
    fs::write(dir.join("serial"), "7a01\n")?;
    fs::write(
        dir.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndir = {d}\ndatabase = $dir/index.txt\n\
             new_certs_dir = $dir/certs\nserial = $dir/serial\ndefault_md = sha256\n\
             policy = any\nunique_subject = no\n[any]\ncommonName = supplied\n",
            d = dir.display()
        ),
    )?;
    let csr = dir.join("node.csr");
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=web1", "-key"])
        .arg(state.join("tls.key"))
        .arg("-out")
        .arg(&csr))?;
    let out = dir.join("node.pem");
    run(Command::new("openssl")
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(dir.join("ca.cnf"))
        .arg("-cert")
        .arg(&ca_cert)
        .arg("-keyfile")
        .arg(&ca_key)
        .args(["-startdate", start, "-enddate", end, "-in"])
        .arg(&csr)
        .arg("-out")
        .arg(&out))?;
    Ok(fs::read_to_string(out)?)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn running(topo: &mut Topology) -> bool {
    topo.nodes.get_mut("web1").is_some_and(|n| n.running())
}

fn wait_offline(topo: &Topology) -> Result<()> {
    wait_for("web1 offline", Duration::from_secs(30), || {
        Ok((topo.node_list()?[0]["online"] == false).then_some(()))
    })
}

/// Every log of web1 so far, concatenated in start order.
fn node_log(topo: &Topology) -> String {
    let mut files: Vec<_> = fs::read_dir(topo.dir.path())
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("web1.") && n.ends_with(".log"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| fs::read_to_string(p).unwrap_or_default())
        .collect()
}
