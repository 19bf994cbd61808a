//! The harness: a coordinator process, an admin client and a small QUIC node client.

#![allow(dead_code, reason = "each test module uses a different part")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use ztnet_proto::control::{
    EnrollRequest, EnrollResponse, Hello, Netmap, NetmapUpdate, NodeMsg, Report, ServerMsg,
};
use ztnet_proto::{PrivateKey, WgKey, frame};

/// How long any wait in these tests may take.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A coordinator process. Killed on drop.
pub struct Coord {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub ca_pem: String,
    pub api_key: String,
}

/// Starts the binary on `dir` and waits until it logs its listen address.
pub fn start(dir: &Path) -> Coord {
    try_start(dir).unwrap_or_else(|log| panic!("coordinator did not start:\n{log}"))
}

/// Starts the binary; on failure returns its log after it exited.
pub fn try_start(dir: &Path) -> Result<Coord, String> {
    try_start_env(dir, &[])
}

/// Starts the binary with extra environment variables.
pub fn start_env(dir: &Path, env: &[(&str, &str)]) -> Coord {
    try_start_env(dir, env).unwrap_or_else(|log| panic!("coordinator did not start:\n{log}"))
}

/// [`try_start`] with extra environment variables.
pub fn try_start_env(dir: &Path, env: &[(&str, &str)]) -> Result<Coord, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztnet-coordinator"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--trust-domain", "corp.example", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the coordinator binary runs");
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
            if let Some(rest) = line.split("listen=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = match rx.recv_timeout(DEADLINE) {
        Ok(a) => a.parse().expect("listen address parses"),
        Err(_) => {
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if child.try_wait().expect("wait works").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            // Let the reader thread drain what is left.
            std::thread::sleep(Duration::from_millis(50));
            return Err(log.lock().unwrap().clone());
        }
    };
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem written");
    let api_key = std::fs::read_to_string(dir.join("admin.key"))
        .expect("admin.key written")
        .trim()
        .to_string();
    Ok(Coord {
        dir: dir.to_path_buf(),
        addr,
        child,
        log,
        ca_pem,
        api_key,
    })
}

impl Coord {
    /// Stops the process (SIGTERM by pid, then waits).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        let mut r = self.ca_pem.as_bytes();
        rustls_pemfile::certs(&mut r).next().unwrap().unwrap()
    }

    pub fn api(&self) -> Api {
        Api::new(self.addr, &self.ca_pem, Some(self.api_key.clone()))
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// An admin API client that verifies the server as `ztnet-coordinator` against the CA.
pub struct Api {
    client: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    pub fn new(addr: SocketAddr, ca_pem: &str, key: Option<String>) -> Api {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve(ztnet_proto::COORDINATOR_SERVER_NAME, addr)
            .https_only(true)
            .timeout(DEADLINE)
            .build()
            .unwrap();
        Api {
            client,
            base: format!(
                "https://{}:{}",
                ztnet_proto::COORDINATOR_SERVER_NAME,
                addr.port()
            ),
            key,
        }
    }

    pub fn with_key(&self, key: Option<&str>) -> Api {
        Api {
            client: self.client.clone(),
            base: self.base.clone(),
            key: key.map(str::to_string),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    /// Calls and asserts a 200, returning the body.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }

    pub async fn network(&self, name: &str) -> Value {
        self.ok(
            "POST",
            "/v1/networks",
            Some(json!({"name": name, "zero_trust": true})),
        )
        .await
    }

    /// A join token for `net`; returns (token string, token id).
    pub async fn token(&self, net: &str, ns: &str, tags: &[&str], uses: u32) -> (String, String) {
        let v = self
            .ok(
                "POST",
                &format!("/v1/networks/{net}/tokens"),
                Some(json!({"namespace": ns, "tags": tags, "uses": uses, "ttl_secs": 3600})),
            )
            .await;
        (
            v["token"].as_str().unwrap().to_string(),
            v["info"]["id"].as_str().unwrap().to_string(),
        )
    }

    pub async fn policy(&self, net: &str, source: &str) -> (u16, Value) {
        self.call(
            "PUT",
            &format!("/v1/networks/{net}/policy"),
            Some(json!({ "source": source })),
        )
        .await
    }
}

/// A node as the tests play it: its keys, and its certificate once enrolled.
pub struct TestNode {
    pub name: String,
    pub wg: PrivateKey,
    pub tls_key: rcgen::KeyPair,
    pub listen_port: u16,
    pub cert_pem: Option<String>,
    pub enrolled: Option<EnrollResponse>,
}

impl TestNode {
    pub fn new(name: &str, listen_port: u16) -> TestNode {
        TestNode {
            name: name.to_string(),
            wg: PrivateKey::generate(),
            tls_key: rcgen::KeyPair::generate().unwrap(),
            listen_port,
            cert_pem: None,
            enrolled: None,
        }
    }

    pub fn public_key(&self) -> WgKey {
        self.wg.public_key()
    }

    pub fn csr(&self) -> String {
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .serialize_request(&self.tls_key)
            .unwrap()
            .pem()
            .unwrap()
    }

    pub fn enroll_request(&self, token: &str) -> EnrollRequest {
        let t = ztnet_proto::JoinToken::parse(token).unwrap();
        EnrollRequest {
            protocol: ztnet_proto::PROTOCOL_VERSION,
            token_secret: t.secret,
            name: self.name.clone(),
            wg_public_key: self.public_key(),
            csr_pem: self.csr(),
            listen_port: self.listen_port,
            endpoints: vec![format!("10.1.2.3:{}", self.listen_port).parse().unwrap()],
            version: "test".into(),
        }
    }

    /// Enrolls; panics on refusal.
    pub async fn enroll(&mut self, coord: &Coord, token: &str) -> EnrollResponse {
        let req = self.enroll_request(token);
        match send_first(
            coord,
            None,
            &serde_json::to_value(NodeMsg::Enroll(req)).unwrap(),
        )
        .await
        {
            ServerMsg::Enrolled(r) => {
                self.cert_pem = Some(r.cert_pem.clone());
                self.enrolled = Some(r.clone());
                r
            }
            other => panic!("enrollment of {} refused: {other:?}", self.name),
        }
    }

    pub fn identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let pem = self.cert_pem.as_ref().expect("enrolled");
        let mut r = pem.as_bytes();
        let certs = rustls_pemfile::certs(&mut r).map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.tls_key.serialize_der()));
        (certs, key)
    }

    /// Opens a session with the node's certificate.
    pub async fn connect(&self, coord: &Coord) -> Session {
        Session::open(coord, Some(self.identity()), self.listen_port).await
    }
}

/// Opens a connection (with a client identity or not), sends one first message as raw JSON
/// and returns the answer.
pub async fn send_first(
    coord: &Coord,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    msg: &Value,
) -> ServerMsg {
    let (_endpoint, conn) = connect(coord, identity).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write(&mut send, msg).await.unwrap();
    let answer = tokio::time::timeout(DEADLINE, frame::read::<_, ServerMsg>(&mut recv))
        .await
        .expect("answer in time")
        .expect("answer readable")
        .expect("an answer, not the end");
    conn.close(0u32.into(), b"done");
    answer
}

pub async fn connect(
    coord: &Coord,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> (quinn::Endpoint, quinn::Connection) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(coord.ca_der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ztnet_proto::CONTROL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(coord.addr, ztnet_proto::COORDINATOR_SERVER_NAME)
        .unwrap()
        .await
        .expect("QUIC handshake with the coordinator");
    (endpoint, conn)
}

/// A live control session.
pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: SendStream,
    pub recv: RecvStream,
}

impl Session {
    pub async fn open(
        coord: &Coord,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        listen_port: u16,
    ) -> Session {
        let (endpoint, conn) = connect(coord, identity).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = NodeMsg::Hello(Hello {
            protocol: ztnet_proto::PROTOCOL_VERSION,
            have_version: None,
            report: Report {
                listen_port,
                endpoints: vec![format!("10.1.2.3:{listen_port}").parse().unwrap()],
                version: "test".into(),
            },
            reauthenticates: false,
            replaces: false,
            features: Vec::new(),
        });
        frame::write(&mut send, &hello).await.unwrap();
        Session {
            endpoint,
            conn,
            send,
            recv,
        }
    }

    /// The next message, within the deadline.
    pub async fn next(&mut self) -> ServerMsg {
        tokio::time::timeout(DEADLINE, frame::read::<_, ServerMsg>(&mut self.recv))
            .await
            .expect("a message in time")
            .expect("message readable")
            .expect("a message, not the end of the stream")
    }

    /// The next message, expected to be a full netmap.
    pub async fn full(&mut self) -> Netmap {
        match self.next().await {
            ServerMsg::Netmap(NetmapUpdate::Full(n)) => n,
            other => panic!("expected a full netmap, got {other:?}"),
        }
    }

    pub async fn ack(&mut self, version: u64) {
        let msg = NodeMsg::Ack {
            version: ztnet_proto::control::NetmapVersion(version),
        };
        frame::write(&mut self.send, &msg).await.unwrap();
    }

    pub async fn send(&mut self, msg: &NodeMsg) {
        frame::write(&mut self.send, msg).await.unwrap();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Peer names of a netmap.
pub fn peer_names(n: &Netmap) -> Vec<String> {
    n.peers.iter().map(|p| p.name.clone()).collect()
}
