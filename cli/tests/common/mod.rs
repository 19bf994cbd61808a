//! Shared by the CLI tests: the real `ztnet` binary, and a real `ztnet-coordinator` process on
//! 127.0.0.1 with its own temporary data directory, stopped when the guard drops.

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod review;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ZTNET: &str = env!("CARGO_BIN_EXE_ztnet");

/// A valid WireGuard key and FC-31's bad forms of it.
pub const VALID_KEY: &str = "YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GI=";

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The coordinator binary, built once per test process from this workspace.
pub fn coordinator_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(ZTNET)
            .parent()
            .expect("the binary has a directory");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("cli/ is inside the workspace");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |args: &[&str]| {
            Command::new(&cargo)
                .args(args)
                .current_dir(workspace)
                .status()
                .expect("cargo runs")
                .success()
        };
        // The same feature set as `cargo build --workspace --bins`, so that this is a no-op
        // after it (as in scripts/test.sh); the coordinator alone if another crate is broken.
        let built = build(&["build", "-q", "--workspace", "--bins"])
            || build(&[
                "build",
                "-q",
                "-p",
                "ztnet-coordinator",
                "--bin",
                "ztnet-coordinator",
            ]);
        assert!(built, "building ztnet-coordinator failed");
        let bin = dir.join("ztnet-coordinator");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A port free on 127.0.0.1 for both TCP and UDP right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running coordinator.
pub struct Coordinator {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Coordinator {
    /// Starts a coordinator on a fresh data directory and waits until its API answers.
    pub fn start() -> Coordinator {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut c = Coordinator {
            dir,
            addr,
            child: None,
        };
        c.restart();
        c
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca(&self) -> PathBuf {
        self.data().join("ca.pem")
    }

    pub fn admin_key(&self) -> PathBuf {
        self.data().join("admin.key")
    }

    /// Stops the process (by its pid) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("coordinator.log")).expect("log");
        let child = Command::new(coordinator_bin())
            .arg("--data-dir")
            .arg(self.data())
            .args(["--trust-domain", "corp.example", "--listen"])
            .arg(self.addr.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("coordinator starts");
        self.child = Some(child);
        let addr = self.addr;
        wait_for("the coordinator to listen", Duration::from_secs(30), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("coordinator exited with {status}: {}", self.log());
            }
            self.admin_key().exists() && TcpStream::connect(addr).is_ok()
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// A `ztnet` command configured for this coordinator through the environment.
    pub fn cli(&self) -> Command {
        let mut cmd = isolated_cli(self.dir.path());
        cmd.env("ZTNET_COORDINATOR", self.addr.to_string())
            .env("ZTNET_API_KEY_FILE", self.admin_key())
            .env("ZTNET_CA_CERT", self.ca());
        cmd
    }

    /// Runs `ztnet ARGS` and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().expect("ztnet runs");
        assert_success(&out, args);
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `ztnet ARGS --output json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("json output")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `ztnet` command that reads no user config (HOME and ZTNET_CONFIG point into `dir`).
pub fn isolated_cli(dir: &Path) -> Command {
    let mut cmd = Command::new(ZTNET);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("ZTNET_CONFIG", dir.join("ztnet-config.toml"))
        .stdin(Stdio::null());
    cmd
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "ztnet {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs and expects failure with exit code `code`; returns stderr.
pub fn expect_failure(cmd: &mut Command, code: i32) -> String {
    let out = cmd.output().expect("ztnet runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The policy used by the tests: web reaches db on tcp:5432, with its own tests.
pub const WEB_DB_POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[test]]
from = { name = "web-1", tags = ["web"] }
to = { name = "db-1", tags = ["db"] }
port = "tcp:5432"
expect = "allow"

[[test]]
from = { name = "db-1", tags = ["db"] }
to = { name = "web-1", tags = ["web"] }
port = "tcp:22"
expect = "deny"
"#;
