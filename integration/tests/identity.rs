//! Workload identity end to end (issue 5): a coordinator and two nodes in namespaces, workload
//! registrations made with `ztnet workload`, SVIDs fetched with `ztnet identity fetch` run as
//! other uids through `setpriv`, and checked with tools we did not write: `openssl verify`,
//! `openssl x509`, and a mutual TLS handshake between `openssl s_server` and `s_client`.
//! Needs root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ztnet_integration::topology::{NETWORK, Topology, story_nodes};
use ztnet_integration::{Netns, Proc, bin, require_root, wait_for};

const API: &str = "spiffe://corp.example/ns/production/sa/api";
const WORKER: &str = "spiffe://corp.example/ns/production/sa/worker";
const CLIENT: &str = "spiffe://corp.example/ns/production/sa/client";

/// Removes the nodes' workload sockets even when a daemon was killed before it could.
struct SocketGuard(Vec<PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

#[test]
fn workloads_get_only_their_own_svids_and_complete_mutual_tls() -> Result<()> {
    require_root();
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "web2")
        .collect();
    let mut topo = Topology::build(&specs)?;
    let _sockets = SocketGuard(
        ["web1", "web2"]
            .iter()
            .map(|n| workload_socket(&topo.node(n).iface))
            .collect(),
    );
    topo.start_coordinator()?;
    topo.create_network()?;
    for name in ["web1", "web2"] {
        let token = topo.token_for(name)?;
        topo.start_node(name, Some(&token))?;
    }
    topo.wait_online(&["web1", "web2"], Duration::from_secs(60))?;

    // Registration: bad input is refused with a reason, good input is listed.
    let foreign = register(
        &topo,
        "spiffe://evil.example/ns/x/sa/y",
        "web1",
        "unix:uid:1001",
    )
    .expect_err("a foreign trust domain is refused");
    assert!(
        format!("{foreign:#}").contains("trust domain"),
        "{foreign:#}"
    );
    let bad_sel = register(&topo, API, "web1", "unix:user:root").expect_err("bad selector");
    assert!(format!("{bad_sel:#}").contains("unix:uid:N"), "{bad_sel:#}");
    let no_node = register(&topo, API, "db9", "unix:uid:1001").expect_err("unknown node");
    assert!(format!("{no_node:#}").contains("db9"), "{no_node:#}");
    register(&topo, API, "web1", "unix:uid:1001")?;
    register(&topo, WORKER, "web1", "unix:uid:1002")?;
    register(&topo, CLIENT, "web2", "unix:uid:1001")?;
    let dup = register(&topo, API, "web1", "unix:uid:1001").expect_err("duplicate");
    assert!(format!("{dup:#}").contains("already registered"), "{dup:#}");
    let list = topo.ztnet_json(&["workload", "list", "--network", NETWORK])?;
    let ids: Vec<&str> = list
        .as_array()
        .context("workload list is an array")?
        .iter()
        .filter_map(|w| w["spiffe_id"].as_str())
        .collect();
    assert_eq!(ids, [API, CLIENT, WORKER], "{list}");

    let files = SvidDirs::new()?;
    let web1 = topo.node("web1");
    let web2 = topo.node("web2");

    // uid 1001 on web1 gets the api identity, verified by openssl, with exactly one URI SAN.
    let api = files.dir(1001, "api")?;
    fetch(&web1.ns, &web1.iface, 1001, &api, &[])?;
    check_svid(&api, API)?;
    check_swap_layout(&api, 1001)?;

    // `--layout flat` writes three regular files; the default layout over them later turns
    // the names into links without losing the pair.
    let flat = files.dir(1001, "flat")?;
    fetch(&web1.ns, &web1.iface, 1001, &flat, &["--layout", "flat"])?;
    check_svid(&flat, API)?;
    for name in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(fs::symlink_metadata(flat.join(name))?.is_file(), "{name}");
    }
    assert!(!flat.join("..data").exists());
    fetch(&web1.ns, &web1.iface, 1001, &flat, &[])?;
    check_svid(&flat, API)?;
    check_swap_layout(&flat, 1001)?;

    // uid 1001 holds nothing else on web1: asking for the worker's ID names what it holds.
    let other = files.dir(1001, "other")?;
    let e = fetch(
        &web1.ns,
        &web1.iface,
        1001,
        &other,
        &["--spiffe-id", WORKER],
    )
    .expect_err("not its own");
    assert!(
        format!("{e:#}").contains(&format!("it holds: {API}")),
        "{e:#}"
    );

    // uid 1002 gets only the worker identity.
    let worker = files.dir(1002, "worker")?;
    fetch(&web1.ns, &web1.iface, 1002, &worker, &[])?;
    check_svid(&worker, WORKER)?;

    // An unregistered uid is refused in plain words and gets no files.
    let stray = files.dir(1003, "stray")?;
    let e = fetch(&web1.ns, &web1.iface, 1003, &stray, &[]).expect_err("unregistered uid");
    assert!(
        format!("{e:#}").contains("no workload registration on this node matches"),
        "{e:#}"
    );
    assert!(!stray.join("svid.pem").exists() && !stray.join("svid.key").exists());

    // The same uid on web2 gets web2's registration, not web1's.
    let client = files.dir(1001, "client")?;
    fetch(&web2.ns, &web2.iface, 1001, &client, &[])?;
    check_svid(&client, CLIENT)?;

    // Mutual TLS between the two SVID holders, inside web1's namespace on 127.0.0.1.
    let foreign = files.foreign_identity()?;
    mutual_tls(&web1.ns, &files, &api, &client, &foreign)?;

    // A deleted registration is not issued again.
    let id = list
        .as_array()
        .and_then(|a| a.iter().find(|w| w["spiffe_id"] == WORKER))
        .and_then(|w| w["id"].as_u64())
        .context("the worker registration has an id")?;
    topo.ztnet(&["workload", "delete", "--network", NETWORK, &id.to_string()])?;
    let again = files.dir(1002, "again")?;
    let e = fetch(&web1.ns, &web1.iface, 1002, &again, &[]).expect_err("deleted");
    assert!(format!("{e:#}").contains("matches"), "{e:#}");
    let audit = topo.ztnet(&["audit", "--network", NETWORK])?;
    assert!(audit.contains("workload.register") && audit.contains("workload.delete"));
    Ok(())
}

#[test]
fn watch_rewrites_a_short_lived_svid_and_every_pair_on_disk_stays_valid() -> Result<()> {
    require_root();
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1")
        .collect();
    let mut topo = Topology::build(&specs)?;
    let _sockets = SocketGuard(vec![workload_socket(&topo.node("web1").iface)]);
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
        "unix:uid:1001",
        "--ttl",
        "10s",
    ])?;

    let files = SvidDirs::new()?;
    let dir = files.dir(1001, "watch")?;
    let web1 = topo.node("web1");
    let out = dir.join("svid.pem");
    let mut cmd = as_uid(&web1.ns, 1001);
    cmd.args([
        "identity",
        "fetch",
        "--format",
        "x509",
        "--watch",
        "--interface",
    ])
    .arg(&web1.iface)
    .arg("--output")
    .arg(&out);
    let log = files.root.path().join("watch.log");
    let mut watcher = Proc::spawn(cmd, &log)?;

    // Each time svid.pem (a link into `..data`) shows a new certificate, the three names are a
    // valid, unexpired pair under the bundle. Three distinct certificates: two rewrites.
    let mut serials: Vec<String> = Vec::new();
    wait_for("two rewrites by --watch", Duration::from_secs(40), || {
        if let Some(st) = watcher.try_wait() {
            bail!("--watch exited ({st}): {}", watcher.log());
        }
        if !out.exists() {
            return Ok(None);
        }
        let serial = openssl(&["x509", "-noout", "-serial", "-in"], &out)?;
        if serials.last() != Some(&serial) {
            one_pair(&dir, || check_pair(&dir))?;
            serials.push(serial);
        }
        Ok((serials.len() >= 3).then_some(()))
    })?;
    // Between two swaps (not in the middle of one), one hidden directory is left.
    wait_for("the swap layout", Duration::from_secs(10), || {
        Ok(check_swap_layout(&dir, 1001).ok())
    })?;
    watcher.stop(Duration::from_secs(5));
    Ok(())
}

/// Registers one workload through `ztnet`.
fn register(topo: &Topology, id: &str, node: &str, selector: &str) -> Result<String> {
    topo.ztnet(&[
        "workload",
        "register",
        "--network",
        NETWORK,
        "--spiffe-id",
        id,
        "--node",
        node,
        "--selector",
        selector,
        "--ttl",
        "1h",
    ])
}

fn workload_socket(iface: &str) -> PathBuf {
    Path::new("/var/run/ztnet").join(format!("{iface}.workload.sock"))
}

/// `ztnet` in `ns`, run as `uid` (same gid, no supplementary groups).
fn as_uid(ns: &Netns, uid: u32) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(bin("ztnet"))
        .stdin(Stdio::null());
    cmd
}

/// `ztnet identity fetch` as `uid` into `dir/svid.pem`, with `extra` arguments.
fn fetch(ns: &Netns, iface: &str, uid: u32, dir: &Path, extra: &[&str]) -> Result<()> {
    let mut cmd = as_uid(ns, uid);
    cmd.args([
        "identity",
        "fetch",
        "--format",
        "x509",
        "--interface",
        iface,
    ])
    .arg("--output")
    .arg(dir.join("svid.pem"))
    .args(extra);
    let out = cmd.output().context("run ztnet identity fetch")?;
    if !out.status.success() {
        bail!(
            "identity fetch as uid {uid} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The X.509-SVID rules, checked by openssl.
fn check_svid(dir: &Path, want: &str) -> Result<()> {
    check_pair(dir)?;
    let cert = dir.join("svid.pem");
    let san = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in"], &cert)?;
    let uris: Vec<&str> = san
        .split(',')
        .map(str::trim)
        .filter(|s| s.contains("URI:"))
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN: {san}");
    assert!(uris[0].ends_with(&format!("URI:{want}")), "{san}");
    assert!(!san.contains("DNS:"), "no other SAN: {san}");
    let ext = openssl(
        &["x509", "-noout", "-ext", "keyUsage,basicConstraints", "-in"],
        &cert,
    )?;
    assert!(
        ext.contains("Digital Signature") && ext.contains("CA:FALSE"),
        "{ext}"
    );
    assert!(!ext.contains("Certificate Sign"), "{ext}");
    let dates = openssl(&["x509", "-noout", "-startdate", "-enddate", "-in"], &cert)?;
    assert!(
        dates.contains("notBefore") && dates.contains("notAfter"),
        "{dates}"
    );
    let key = fs::metadata(dir.join("svid.key"))?;
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "svid.key mode");
    assert_eq!(
        key.uid(),
        fs::metadata(dir)?.uid(),
        "svid.key belongs to the caller"
    );
    Ok(())
}

/// The directory swap layout: the three names link into `..data`, which names the one hidden
/// directory, 0755 and the caller's.
fn check_swap_layout(dir: &Path, uid: u32) -> Result<()> {
    for name in ["svid.pem", "svid.key", "bundle.pem"] {
        let link = fs::read_link(dir.join(name)).with_context(|| format!("{name} is no link"))?;
        ensure!(
            link == Path::new("..data").join(name),
            "{name} -> {}",
            link.display()
        );
    }
    let hidden: Vec<_> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..ztnet_"))
        .collect();
    ensure!(hidden.len() == 1, "not one hidden directory: {hidden:?}");
    ensure!(fs::read_link(dir.join("..data"))? == Path::new(&hidden[0]));
    let meta = fs::metadata(dir.join(&hidden[0]))?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o755,
        "{} mode",
        hidden[0]
    );
    ensure!(
        meta.uid() == uid,
        "the hidden directory is not the caller's"
    );
    Ok(())
}

/// Runs `check` on the pair in `dir` and returns its result, when `..data` named the same
/// directory before and after; reads again when a swap fell in between (the reader's rule
/// in docs/identity.md).
fn one_pair(dir: &Path, mut check: impl FnMut() -> Result<()>) -> Result<()> {
    for _ in 0..5 {
        let before = fs::read_link(dir.join("..data"))?;
        let result = check();
        if fs::read_link(dir.join("..data"))? == before {
            return result;
        }
    }
    bail!(
        "..data in {} changed under five reads in a row",
        dir.display()
    )
}

/// svid.pem verifies against bundle.pem, is unexpired, and belongs to svid.key.
fn check_pair(dir: &Path) -> Result<()> {
    let cert = dir.join("svid.pem");
    let bundle = dir.join("bundle.pem");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&bundle)
        .arg(&cert)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.trim_end().ends_with("OK") {
        bail!(
            "openssl verify refused {}: {text}{}",
            cert.display(),
            stderr(&out)
        );
    }
    openssl(&["x509", "-noout", "-checkend", "0", "-in"], &cert)
        .context("the SVID on disk has expired")?;
    let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in"], &cert)?;
    let from_key = openssl(&["pkey", "-pubout", "-in"], &dir.join("svid.key"))?;
    if from_cert != from_key {
        bail!("svid.pem and svid.key are not a pair");
    }
    Ok(())
}

/// s_server holds `server`'s SVID and requires a client certificate under the bundle.
fn mutual_tls(
    ns: &Netns,
    files: &SvidDirs,
    server: &Path,
    client: &Path,
    foreign: &Path,
) -> Result<()> {
    let bundle = server.join("bundle.pem");
    let start = |dir: &Path, log: &str| -> Result<Proc> {
        let mut cmd = ns.command("openssl");
        cmd.args([
            "s_server",
            "-accept",
            "127.0.0.1:8443",
            "-Verify",
            "1",
            "-www",
        ])
        .arg("-verify_return_error")
        .arg("-cert")
        .arg(dir.join("svid.pem"))
        .arg("-key")
        .arg(dir.join("svid.key"))
        .arg("-CAfile")
        .arg(&bundle)
        .stdin(Stdio::null());
        Proc::spawn(cmd, &files.root.path().join(log))
    };
    let handshake = |cert_dir: &Path, extra: &[&str]| -> Result<Output> {
        let mut cmd = ns.command("openssl");
        cmd.args([
            "s_client",
            "-connect",
            "127.0.0.1:8443",
            "-verify_return_error",
        ])
        .args(extra)
        .arg("-cert")
        .arg(cert_dir.join("svid.pem"))
        .arg("-key")
        .arg(cert_dir.join("svid.key"))
        .arg("-CAfile")
        .arg(&bundle)
        .stdin(Stdio::null());
        Ok(cmd.output()?)
    };
    let listening = || {
        wait_for("s_server to listen", Duration::from_secs(10), || {
            let out = ns.output("ss", &["-Hltn", "sport = :8443"])?;
            Ok((!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()))
        })
    };

    let mut s = start(server, "s_server.log")?;
    listening()?;
    // TLS 1.2 so that the server's verdict on the client certificate ends the handshake.
    let ok = handshake(client, &["-tls1_2", "-showcerts"])?;
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "mutual TLS failed: {text}{}",
        stderr(&ok)
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    // The client checks the server's SPIFFE ID from the certificate it was shown.
    let peer = files.root.path().join("peer.pem");
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .context("server cert shown")?;
    let end = text
        .find("-----END CERTIFICATE-----")
        .context("server cert end")?
        + 25;
    fs::write(&peer, &text[begin..end])?;
    let san = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in"], &peer)?;
    assert!(san.contains(&format!("URI:{API}")), "{san}");
    // The server saw and verified the client's SVID.
    let bad = handshake(foreign, &["-tls1_2"])?;
    assert!(
        !bad.status.success(),
        "a foreign client certificate was accepted"
    );
    s.stop(Duration::from_secs(5));

    // And a server holding the foreign certificate is refused by an SVID client.
    let mut s = start(foreign, "s_server-foreign.log")?;
    listening()?;
    let bad = handshake(client, &[])?;
    assert!(
        !bad.status.success(),
        "a foreign server certificate was accepted"
    );
    let text = String::from_utf8_lossy(&bad.stdout).into_owned() + &stderr(&bad);
    assert!(
        text.contains("verify") || text.contains("certificate"),
        "{text}"
    );
    s.stop(Duration::from_secs(5));
    Ok(())
}

/// Runs `openssl ARGS FILE` and returns stdout.
fn openssl(args: &[&str], file: &Path) -> Result<String> {
    let out = Command::new("openssl").args(args).arg(file).output()?;
    if !out.status.success() {
        bail!(
            "openssl {} {} failed: {}",
            args.join(" "),
            file.display(),
            stderr(&out)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Directories owned by the test's workload uids, under one world-traversable temp dir.
struct SvidDirs {
    root: tempfile::TempDir,
}

impl SvidDirs {
    fn new() -> Result<SvidDirs> {
        let root = tempfile::Builder::new().prefix("ztnet-svid-").tempdir()?;
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        Ok(SvidDirs { root })
    }

    fn dir(&self, uid: u32, name: &str) -> Result<PathBuf> {
        let dir = self.root.path().join(name);
        fs::create_dir(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        Ok(dir)
    }

    /// A key and certificate from another trust domain's CA, made with openssl.
    fn foreign_identity(&self) -> Result<PathBuf> {
        let dir = self.root.path().join("foreign");
        fs::create_dir(&dir)?;
        let sh = format!(
            "set -e; cd {d}
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
               -subj /CN=evil-ca -keyout ca.key -out ca.pem 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /O=evil \
               -keyout svid.key -out req.csr 2>/dev/null
             printf 'subjectAltName=URI:spiffe://evil.example/ns/production/sa/api\\n' > ext
             openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
               -extfile ext -out svid.pem 2>/dev/null",
            d = dir.display()
        );
        let out = Command::new("sh").arg("-c").arg(&sh).output()?;
        if !out.status.success() {
            bail!("making the foreign identity failed: {}", stderr(&out));
        }
        Ok(dir)
    }
}
