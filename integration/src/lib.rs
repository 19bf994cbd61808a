//! The harness for ztnet's end-to-end tests: network namespaces, veth links, processes started
//! inside them, packet captures, and waiting on conditions with a deadline.
//!
//! Everything a test makes is named uniquely for that test ([`unique`]) and removed when its
//! guard drops, panics included. Traffic only ever goes to addresses inside namespaces the test
//! made. These tests need root (CI runs as root); [`require_root`] says so plainly.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod pcap;
pub mod stream;
pub mod topology;

/// Panics with a clear message unless the test runs as root.
pub fn require_root() {
    // SAFETY-free: geteuid has no preconditions; libc exposes it as unsafe only by convention.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, TUN devices); run the suite as root \
         (scripts/test.sh does, CI does)"
    );
}

/// A short name unique to this process and call: `PREFIX` + 6 hex digits. Keep `prefix` to at
/// most 8 characters so that the result fits an interface name (15 characters).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = (pid.wrapping_mul(2_654_435_761) ^ nanos ^ n.wrapping_mul(40_503)) & 0xff_ffff;
    format!("{prefix}{mix:06x}")
}

/// The directory that holds the workspace's built binaries (`target/debug` or
/// `target/release`), found from the test executable's own path, or `ZTNET_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ZTNET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .into()
}

/// The path of a workspace binary, with a clear error when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A fresh WireGuard key pair from the shipped tools: `ztnet-node genkey --output FILE` (0600),
/// then `ztnet-node pubkey < FILE`. Returns the public key.
pub fn make_key(path: &Path) -> Result<String> {
    let node = bin("ztnet-node");
    let out = Command::new(&node)
        .args(["genkey", "--output"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("genkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(&node)
        .arg("pubkey")
        .stdin(fs::File::open(path)?)
        .output()?;
    if !out.status.success() {
        bail!("pubkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Polls `check` every 50 ms until it returns `Ok(Some(v))` or the deadline passes; the error
/// names what was awaited and the last failure seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command on the host and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with every process still in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a namespace named `prefix` + a unique suffix, with `lo` up.
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .stdin(Stdio::null());
        c
    }

    /// Runs a command inside the namespace; returns its output whatever the exit status.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program} in {}", self.name))
    }

    /// Runs a command inside the namespace and fails with its stderr when it exits non-zero.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}{}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sh -c SCRIPT` inside the namespace and fails when it exits non-zero.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.exec("sh", &["-c", script])
    }

    /// Starts a long-running process inside the namespace, its output appended to `log`.
    pub fn spawn(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        log: &Path,
    ) -> Result<Proc> {
        let mut cmd = self.command(program);
        cmd.args(args);
        Proc::spawn(cmd, log)
    }

    /// A UDP socket bound to `bind` inside the namespace, for a test that must send several
    /// datagrams from one socket (a one-shot sender such as `socat -u` closes its socket at
    /// once, and the kernel drops an ICMP error that finds no socket, so the path MTU it
    /// carries is never learnt). A socket keeps the namespace it was made in, so it is made
    /// on a short-lived thread that has joined the namespace.
    pub fn udp_socket(&self, bind: std::net::SocketAddr) -> Result<std::net::UdpSocket> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<std::net::UdpSocket> {
                let ns = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
                // SAFETY: a valid namespace descriptor; only this thread changes namespace.
                #[allow(unsafe_code)]
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                if rc != 0 {
                    bail!(
                        "cannot join {}: {}",
                        self.name,
                        std::io::Error::last_os_error()
                    );
                }
                std::net::UdpSocket::bind(bind)
                    .with_context(|| format!("cannot bind {bind} in {}", self.name))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the socket thread panicked"))?
        })
    }

    /// Enables IPv4 and IPv6 forwarding (for router namespaces).
    pub fn enable_forwarding(&self) -> Result<()> {
        self.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes that a test started in its own namespace; ending them lets the
        // namespace go away. Only pids inside this test's namespace are touched.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    #[allow(unsafe_code)]
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A child process in its own process group, killed (the whole group) on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdout(out).stderr(err).process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The log file's content so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has exited (and how).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends a signal to the process group.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            #[allow(unsafe_code)]
            // SAFETY: kill has no memory-safety preconditions; the group is our child's own.
            unsafe {
                libc::kill(-(c.id() as i32), sig);
            }
        }
    }

    /// Kills the process group and waits for the process.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit, then kills it.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `tcpdump -w` on one interface of a namespace.
#[derive(Debug)]
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing full packets on `iface` in `ns` into `file`, and returns once tcpdump
    /// says it is listening.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> Result<Capture> {
        let log = file.with_extension("log");
        let f = file.to_string_lossy().into_owned();
        let proc = ns.spawn(
            "tcpdump",
            &[
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                iface,
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
                &f,
            ],
            &log,
        )?;
        let cap = Capture {
            proc,
            file: file.to_path_buf(),
        };
        wait_for("tcpdump to listen", Duration::from_secs(10), || {
            Ok(cap.proc.log().contains("listening on").then_some(()))
        })?;
        Ok(cap)
    }

    /// The frames written so far (tcpdump flushes each one with `-U`).
    pub fn frames(&self) -> Result<Vec<pcap::Frame>> {
        let bytes =
            fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))?;
        pcap::parse(&bytes)
    }

    /// Waits until the frames written so far satisfy `done`, so that a test stops the capture
    /// only after what it sent has been seen.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[pcap::Frame]) -> bool,
    ) -> Result<()> {
        wait_for(what, timeout, || Ok(done(&self.frames()?).then_some(())))
    }

    /// Stops tcpdump and returns the captured packets (link-layer frames).
    pub fn finish(mut self) -> Result<Vec<pcap::Frame>> {
        self.proc.stop(Duration::from_secs(5));
        let bytes =
            fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))?;
        pcap::parse(&bytes)
    }
}

/// Reads a line-oriented log until `needle` appears (for readiness messages).
pub fn log_contains(path: &Path, needle: &str) -> bool {
    fs::File::open(path)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains(needle))
        })
        .unwrap_or(false)
}
