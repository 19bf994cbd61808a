//! SVID rotation under load and a CA rotation in the middle of it (issue 5), end to end: a
//! coordinator and two nodes in namespaces, two workloads on web1 with one-minute SVIDs kept
//! fresh by `ztnet identity fetch --watch` (the directory swap layout: the names are links
//! into `..data`), a reader that re-verifies the files with openssl at every `IN_MOVED_TO` of
//! `..data`, a poller per directory that checks the pair in process thousands of times over
//! the run, a rustls server that reloads its SVID on the same event and demands a client SVID,
//! and `openssl s_client` handshaking with it without pause. Half-way, `ztnet ca rotate`: the
//! new CA must reach every node's `ca.pem`, sign only once every SVID issued before has run
//! out, and no handshake, no check and no control connection may fail on the way. Needs root
//! and inotifywait (Debian package inotify-tools). About three minutes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ztnet_integration::topology::{COORDINATOR_ADDR, NETWORK, Topology, story_nodes};
use ztnet_integration::{Netns, Proc, bin, require_root, wait_for};

const SERVER: &str = "spiffe://corp.example/ns/production/sa/api";
const CLIENT: &str = "spiffe://corp.example/ns/production/sa/client";
/// The SVID lifetime; `--watch` renews at half of it.
const TTL_SECS: u64 = 60;
/// 2.5 lifetimes.
const RUN: Duration = Duration::from_secs(150);
/// The symlink `--watch` renames at every rotation.
const DATA: &str = "..data";
/// The pause between two checks of a poller: tight, yet leaving the two cores to the rest.
const POLL_PAUSE: Duration = Duration::from_millis(2);
/// The failures kept in full; the rest are counted.
const FAILURES_KEPT: usize = 50;

/// Removes the node's workload socket even when a daemon was killed before it could.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Failures seen by the background checkers, with the time since the start.
#[derive(Default)]
struct Findings {
    failures: Mutex<Vec<String>>,
    failures_dropped: AtomicU64,
    handshakes: AtomicU64,
    /// Reads that a `..data` swap fell into, read again (not failures).
    raced: AtomicU64,
    /// Per `..data` event: the directory, the hidden directory in force, the issuer.
    rewrites: Mutex<Vec<Rewrite>>,
}

#[derive(Clone, Debug)]
struct Rewrite {
    dir: PathBuf,
    in_force: PathBuf,
    issuer: String,
}

impl Findings {
    fn fail(&self, start: Instant, what: String) {
        let t = start.elapsed().as_secs_f32();
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < FAILURES_KEPT {
            failures.push(format!("{t:.1}s: {what}"));
        } else {
            self.failures_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn svids_rotate_under_load_and_a_ca_rotation_breaks_no_handshake_or_control_channel() -> Result<()>
{
    require_root();
    if Command::new("inotifywait").arg("--help").output().is_err() {
        bail!("inotifywait is missing: apt-get install inotify-tools");
    }
    let specs: Vec<_> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "web2")
        .collect();
    let mut topo = Topology::build(&specs)?;
    let _socket = SocketGuard(workload_socket(&topo.node("web1").iface));
    topo.start_coordinator()?;
    topo.create_network()?;
    let token1 = topo.token_for("web1")?;
    // web2's token is made before the rotation and used after it: it pins the old CA.
    let token2 = topo.token_for("web2")?;
    topo.start_node("web1", Some(&token1))?;
    topo.wait_online(&["web1"], Duration::from_secs(60))?;
    let ttl = format!("{TTL_SECS}s");
    for (id, uid) in [(SERVER, "1001"), (CLIENT, "1002")] {
        topo.ztnet(&[
            "workload",
            "register",
            "--network",
            NETWORK,
            "--spiffe-id",
            id,
            "--node",
            "web1",
            "--selector",
            &format!("unix:uid:{uid}"),
            "--ttl",
            &ttl,
        ])?;
    }
    let root = tempfile::Builder::new().prefix("ztnet-rot-").tempdir()?;
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
    let old_ca = root.path().join("operator-ca.pem");
    fs::copy(topo.coordinator_dir().join("ca.pem"), &old_ca)?;

    let start = Instant::now();
    let findings = Arc::new(Findings::default());
    let stop = Arc::new(AtomicBool::new(false));
    let server_dir = owned_dir(root.path(), "server", 1001)?;
    let client_dir = owned_dir(root.path(), "client", 1002)?;

    // The readers: one inotifywait per directory; at every IN_MOVED_TO of `..data` the three
    // names (links into it) are re-verified with openssl, and the server reloads.
    let server_cfg: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>> = Arc::default();
    let mut inotify = Vec::new();
    for dir in [&server_dir, &client_dir] {
        let (child, events) = watch_dir(dir)?;
        inotify.push(ChildGuard(child));
        let dir = dir.clone();
        let findings = findings.clone();
        let reload = (dir == server_dir).then(|| server_cfg.clone());
        std::thread::spawn(move || {
            for name in events {
                if name != DATA {
                    continue;
                }
                match one_pair(&dir, &findings.raced, || check_pair(&dir)) {
                    Ok((in_force, issuer)) => findings.rewrites.lock().unwrap().push(Rewrite {
                        dir: dir.clone(),
                        in_force,
                        issuer,
                    }),
                    Err(e) => findings.fail(start, format!("{}: {e:#}", dir.display())),
                }
                if let Some(cfg) = &reload {
                    match one_pair(&dir, &findings.raced, || server_config(&dir)) {
                        Ok((_, c)) => *cfg.write().unwrap() = Some(Arc::new(c)),
                        Err(e) => findings.fail(start, format!("server reload: {e:#}")),
                    }
                }
            }
        });
    }

    let web1 = topo.node("web1");
    let mut watchers = Vec::new();
    for (dir, uid) in [(&server_dir, 1001), (&client_dir, 1002)] {
        let mut cmd = as_uid(&web1.ns, uid);
        cmd.args(["identity", "fetch", "--watch", "--interface", &web1.iface])
            .arg("--output")
            .arg(dir.join("svid.pem"));
        watchers.push(Proc::spawn(cmd, &dir.with_extension("log"))?);
    }
    wait_for("both first SVIDs", Duration::from_secs(30), || {
        Ok(
            (server_cfg.read().unwrap().is_some() && client_dir.join("svid.pem").exists())
                .then_some(()),
        )
    })?;

    // The pollers: the pair read through the links and checked in process without pause, for
    // the whole run.
    let pollers: Vec<_> = [&server_dir, &client_dir]
        .into_iter()
        .map(|dir| {
            let (dir, findings, stop) = (dir.clone(), findings.clone(), stop.clone());
            std::thread::spawn(move || poll_pairs(&dir, &stop, &findings, start))
        })
        .collect();

    // The workloads: a rustls server on 127.0.0.1 with the server SVID (reloaded above), and
    // openssl s_client with the client SVID, read afresh for every handshake.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    {
        let cfg = server_cfg.clone();
        let findings = findings.clone();
        std::thread::spawn(move || serve(listener, cfg, findings, start));
    }
    let client = {
        let findings = findings.clone();
        let stop = stop.clone();
        let dir = client_dir.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match one_pair(&dir, &findings.raced, || handshake(port, &dir)) {
                    Ok(_) => {
                        findings.handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => findings.fail(start, format!("handshake: {e:#}")),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Half-way through the first lifetime: rotate the CA.
    wait_for("one rewrite of each SVID", Duration::from_secs(60), || {
        Ok((findings.rewrites.lock().unwrap().len() >= 4).then_some(()))
    })?;
    let staged = topo.ztnet_json(&["ca", "rotate"])?;
    assert_eq!(staged["phase"], "staged", "{staged}");
    let rotated_at = start.elapsed();
    eprintln!("ca rotate at {rotated_at:?}: {}", staged["summary"]);
    wait_for(
        "the two-CA bundle in web1's ca.pem",
        Duration::from_secs(20),
        || {
            let pem = fs::read_to_string(topo.node("web1").state_dir.join("ca.pem"))?;
            Ok((pem.matches("BEGIN CERTIFICATE").count() == 2).then_some(()))
        },
    )?;
    // It may sign only when the SVIDs issued before it have run out: one TTL.
    let active = wait_for(
        "the new CA signing",
        Duration::from_secs(TTL_SECS + 40),
        || {
            let s = topo.ztnet_json(&["ca", "status"])?;
            Ok((s["phase"] == "retiring").then_some(s))
        },
    )?;
    let activated_after = start.elapsed() - rotated_at;
    eprintln!("new CA signs {activated_after:?} after the rotation");
    assert!(
        activated_after >= Duration::from_secs(TTL_SECS - 2),
        "the new CA signed before the old SVIDs ran out ({activated_after:?}): {active}"
    );

    // An operator with the pre-rotation ca.pem: still served, told to refresh.
    let out = topo
        .coord_ns
        .command(bin("ztnet"))
        .args(["ca", "status"])
        .env("ZTNET_COORDINATOR", COORDINATOR_ADDR)
        .env(
            "ZTNET_API_KEY_FILE",
            topo.coordinator_dir().join("admin.key"),
        )
        .env("ZTNET_CA_CERT", &old_ca)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "old ca.pem refused: {err}");
    assert!(
        err.contains("does not hold the CA that now signs") && err.contains("ztnet ca bundle"),
        "no refresh hint: {err}"
    );

    // The fix it names: the refreshed file holds both CAs, and the warning is gone.
    let refresh = |args: &[&str]| {
        topo.coord_ns
            .command(bin("ztnet"))
            .args(args)
            .env("ZTNET_COORDINATOR", COORDINATOR_ADDR)
            .env(
                "ZTNET_API_KEY_FILE",
                topo.coordinator_dir().join("admin.key"),
            )
            .env("ZTNET_CA_CERT", &old_ca)
            .output()
    };
    let out = refresh(&["ca", "bundle", "--file", &old_ca.to_string_lossy()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(&old_ca)?
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    let out = refresh(&["ca", "status"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("warning"), "{err}");

    // A token made before the rotation still enrolls a new node against the new chain.
    topo.start_node("web2", Some(&token2))?;
    topo.wait_online(&["web1", "web2"], Duration::from_secs(60))?;

    // Both workloads move to SVIDs of the new CA; the run goes on to 2.5 lifetimes.
    wait_for(
        "both SVIDs issued by the new CA",
        Duration::from_secs(TTL_SECS),
        || {
            let both = [&server_dir, &client_dir]
                .iter()
                .all(|d| issuer(&d.join("svid.pem")).is_ok_and(|i| i.contains("CA 2")));
            Ok(both.then_some(()))
        },
    )?;
    let handshakes_at_switch = findings.handshakes.load(Ordering::Relaxed);
    while start.elapsed() < RUN {
        for w in &mut watchers {
            if let Some(st) = w.try_wait() {
                bail!("--watch exited ({st}): {}", w.log());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let polls: Vec<Polled> = pollers
        .into_iter()
        .map(|p| p.join().expect("a poller panicked"))
        .collect();
    // The last swap of each directory was announced: its reader saw `..data` move to it.
    for dir in [&server_dir, &client_dir] {
        wait_for("the last swap's event", Duration::from_secs(10), || {
            let now = fs::read_link(dir.join(DATA))?;
            let seen = findings
                .rewrites
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.dir == *dir && r.in_force == now);
            Ok(seen.then_some(()))
        })?;
    }

    let failures = findings.failures.lock().unwrap().clone();
    let dropped = findings.failures_dropped.load(Ordering::Relaxed);
    let handshakes = findings.handshakes.load(Ordering::Relaxed);
    let rewrites = findings.rewrites.lock().unwrap().clone();
    eprintln!(
        "{handshakes} handshakes ({} after both moved to the new CA), {} verified rewrites, \
         {} reads raced a swap and were read again",
        handshakes - handshakes_at_switch,
        rewrites.len(),
        findings.raced.load(Ordering::Relaxed)
    );
    for p in &polls {
        eprintln!(
            "poller {}: {} checks of the pair, {} directories in force seen",
            p.dir.display(),
            p.checks,
            p.seen.len()
        );
    }
    if !failures.is_empty() {
        topo.dump_logs();
    }
    assert!(
        failures.is_empty(),
        "failures ({dropped} more not shown):\n{}",
        failures.join("\n")
    );
    assert!(handshakes >= 100, "only {handshakes} handshakes");
    assert!(
        handshakes - handshakes_at_switch >= 10,
        "few handshakes on the new CA"
    );
    for dir in [&server_dir, &client_dir] {
        let mine: Vec<_> = rewrites.iter().filter(|r| r.dir == *dir).collect();
        let n = mine.len();
        assert!(n >= 5, "{}: {n} rewrites in 2.5 lifetimes", dir.display());
        let distinct: BTreeSet<_> = mine.iter().map(|r| &r.in_force).collect();
        assert_eq!(
            distinct.len(),
            n,
            "every `..data` event named a new directory: {mine:?}"
        );
        assert!(
            mine.iter().any(|r| r.issuer.contains("CA 2")),
            "{}: no rewrite by the new CA",
            dir.display()
        );
        let staged: Vec<_> = fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..ztnet_"))
            .collect();
        assert!(
            staged.len() <= 2,
            "old hidden directories pile up: {staged:?}"
        );
    }
    for p in &polls {
        assert!(
            p.checks >= 5_000,
            "{}: only {} checks of the pair",
            p.dir.display(),
            p.checks
        );
        // Every directory that was ever in force was announced by an IN_MOVED_TO of `..data`.
        let announced: BTreeSet<_> = rewrites
            .iter()
            .filter(|r| r.dir == p.dir)
            .map(|r| &r.in_force)
            .collect();
        let unannounced: Vec<_> = p.seen.iter().filter(|d| !announced.contains(d)).collect();
        assert!(
            unannounced.is_empty(),
            "{}: in force without a `..data` event: {unannounced:?}",
            p.dir.display()
        );
        assert!(
            p.seen.len() + 1 >= announced.len(),
            "{}: the poller saw {} of {} directories in force",
            p.dir.display(),
            p.seen.len(),
            announced.len()
        );
    }
    // web1's control channel never dropped, through staging and the switch.
    let lost = node_log(&topo, "web1")
        .matches("control channel lost")
        .count();
    assert_eq!(lost, 0, "web1 lost its control channel");
    for w in &mut watchers {
        w.stop(Duration::from_secs(5));
    }
    drop(inotify);
    Ok(())
}

/// A directory owned by `uid` under `root`.
fn owned_dir(root: &Path, name: &str, uid: u32) -> Result<PathBuf> {
    let dir = root.join(name);
    fs::create_dir(&dir)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
    Ok(dir)
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

/// Kills and reaps a child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `inotifywait -m` on `dir`, giving the name of every file renamed into it; returns once
/// the watch is established (a probe file renamed into `dir` is reported).
fn watch_dir(dir: &Path) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut child = Command::new("inotifywait")
        .args(["-m", "-q", "-e", "moved_to", "--format", "%f"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("run inotifywait")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    let probe = dir.join(".probe");
    let tmp = dir.join(".probe.tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        fs::write(&tmp, b"x")?;
        fs::rename(&tmp, &probe)?;
        if let Ok(name) = rx.recv_timeout(Duration::from_millis(200))
            && name == ".probe"
        {
            fs::remove_file(&probe)?;
            return Ok((child, rx));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("inotifywait did not report the probe in {}", dir.display())
}

/// The hidden directory `..data` points at; an error before the first SVID.
fn in_force(dir: &Path) -> Result<PathBuf> {
    fs::read_link(dir.join(DATA)).with_context(|| format!("no {DATA} in {}", dir.display()))
}

/// Runs `read` (which opens the three names one by one) and returns what it found with the
/// directory in force, when `..data` pointed at the same directory before and after it. A
/// swap between its opens is the one way such a reader can see two pairs; it then reads
/// again, as docs/identity.md tells workloads to do.
fn one_pair<T>(
    dir: &Path,
    raced: &AtomicU64,
    mut read: impl FnMut() -> Result<T>,
) -> Result<(PathBuf, T)> {
    for _ in 0..5 {
        let before = in_force(dir)?;
        let found = read();
        if in_force(dir)? == before {
            return found.map(|v| (before, v));
        }
        raced.fetch_add(1, Ordering::Relaxed);
    }
    bail!(
        "{DATA} in {} changed under five reads in a row",
        dir.display()
    )
}

/// What one poller did.
struct Polled {
    dir: PathBuf,
    checks: u64,
    seen: BTreeSet<PathBuf>,
}

/// Checks the pair in `dir` in process, read through the links, until `stop`.
fn poll_pairs(dir: &Path, stop: &AtomicBool, findings: &Findings, start: Instant) -> Polled {
    let provider = rustls::crypto::ring::default_provider();
    let mut polled = Polled {
        dir: dir.to_path_buf(),
        checks: 0,
        seen: BTreeSet::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        match one_pair(dir, &findings.raced, || check_in_process(dir, &provider)) {
            Ok((in_force, ())) => {
                polled.checks += 1;
                polled.seen.insert(in_force);
            }
            Err(e) => findings.fail(start, format!("poller {}: {e:#}", dir.display())),
        }
        std::thread::sleep(POLL_PAUSE);
    }
    polled
}

/// svid.pem chains to bundle.pem, is valid now (webpki, as a TLS peer would check it), and
/// svid.key is its private key.
fn check_in_process(dir: &Path, provider: &rustls::crypto::CryptoProvider) -> Result<()> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut fs::read(dir.join("svid.pem"))?.as_slice())
        .collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut fs::read(dir.join("svid.key"))?.as_slice())?
        .context("svid.key holds no key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut fs::read(dir.join("bundle.pem"))?.as_slice()) {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(provider.clone()),
    )
    .build()?;
    let (leaf, intermediates) = chain
        .split_first()
        .context("svid.pem holds no certificate")?;
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .context("svid.pem does not verify under bundle.pem now")?;
    let signing = provider.key_provider.load_private_key(key)?;
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .context("svid.pem and svid.key are not a pair")?;
    Ok(())
}

/// svid.pem verifies against bundle.pem, is unexpired, and belongs to svid.key, each name a
/// link into `..data`; returns its issuer.
fn check_pair(dir: &Path) -> Result<String> {
    for name in ["svid.pem", "svid.key", "bundle.pem"] {
        let link = fs::read_link(dir.join(name)).with_context(|| format!("{name} is no link"))?;
        if link != Path::new(DATA).join(name) {
            bail!("{name} links to {}, not into {DATA}", link.display());
        }
    }
    let cert = dir.join("svid.pem");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg(&cert)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.trim_end().ends_with("OK") {
        bail!(
            "openssl verify refused it: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    openssl(&["x509", "-noout", "-checkend", "0", "-in"], &cert).context("expired")?;
    let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in"], &cert)?;
    let from_key = openssl(&["pkey", "-pubout", "-in"], &dir.join("svid.key"))?;
    if from_cert != from_key {
        bail!("svid.pem and svid.key are not a pair");
    }
    issuer(&cert)
}

fn issuer(cert: &Path) -> Result<String> {
    openssl(&["x509", "-noout", "-issuer", "-in"], cert)
}

fn openssl(args: &[&str], file: &Path) -> Result<String> {
    let out = Command::new("openssl").args(args).arg(file).output()?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A rustls server configuration from the SVID files in `dir`: its chain and key, and a
/// client verifier over its bundle.
fn server_config(dir: &Path) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = rustls_pemfile::certs(&mut fs::read(dir.join("svid.pem"))?.as_slice())
        .collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut fs::read(dir.join("svid.key"))?.as_slice())?
        .context("no key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut fs::read(dir.join("bundle.pem"))?.as_slice()) {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

/// Accepts connections: mutual TLS with the configuration of the moment, the client's SVID
/// must name CLIENT, then one line and close.
fn serve(
    listener: TcpListener,
    cfg: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>>,
    findings: Arc<Findings>,
    start: Instant,
) {
    for tcp in listener.incoming() {
        let Ok(mut tcp) = tcp else { continue };
        let Some(config) = cfg.read().unwrap().clone() else {
            continue;
        };
        let findings = findings.clone();
        std::thread::spawn(move || {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let result = (|| -> Result<()> {
                let mut conn = rustls::ServerConnection::new(config)?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut tcp)?;
                }
                let peer = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .context("no client certificate")?;
                if !contains(peer.as_ref(), CLIENT.as_bytes()) {
                    bail!("the client's SVID does not name {CLIENT}");
                }
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                tls.write_all(b"hello from api\n")?;
                tls.flush()?;
                conn.send_close_notify();
                let _ = conn.complete_io(&mut tcp);
                Ok(())
            })();
            if let Err(e) = result {
                findings.fail(start, format!("server side: {e:#}"));
            }
        });
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One mutual TLS handshake with `openssl s_client` holding the client SVID of the moment;
/// the server must present an SVID for SERVER under the client's bundle.
fn handshake(port: u16, dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(dir.join("svid.pem"))
        .arg("-key")
        .arg(dir.join("svid.key"))
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .args([
            "-verify_return_error",
            "-verify",
            "2",
            "-showcerts",
            "-ign_eof",
        ])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("Verify return code: 0 (ok)") {
        bail!(
            "s_client failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    if !text.contains("hello from api") {
        bail!("no answer from the server");
    }
    let leaf = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|r| r.split("-----END CERTIFICATE-----").next())
        .context("no server certificate shown")?;
    let pem = format!("-----BEGIN CERTIFICATE-----{leaf}-----END CERTIFICATE-----\n");
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    x509.stdin
        .take()
        .context("stdin")?
        .write_all(pem.as_bytes())?;
    let mut san = String::new();
    x509.stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut san)?;
    x509.wait()?;
    if !san.contains(&format!("URI:{SERVER}")) {
        bail!("the server's SVID does not name {SERVER}: {san}");
    }
    Ok(())
}

/// Every log of `name` so far, concatenated.
fn node_log(topo: &Topology, name: &str) -> String {
    let mut all = String::new();
    if let Ok(entries) = fs::read_dir(topo.dir.path()) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&format!("{name}.")) && file.ends_with(".log") {
                all.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    all
}
