//! The ztnet coordinator: the store, the CA, enrollment, netmap computation and push, the
//! admin API and the audit log. [`run`] starts it all on one port number: the control channel
//! (QUIC) on UDP and the admin API (HTTPS) on TCP. The `ztnet-coordinator` binary is a thin
//! shell around it.
//!
//! Layout: [`store`] (SQLite tables, migrations), [`ca`] (certificates), [`policy`] (which
//! policy is in force), [`netmap`] (pure netmap building), [`hub`] (live state, recompute,
//! sessions), [`enroll`] and [`control`] (QUIC side), [`api`] (HTTP side).

pub mod api;
pub mod ca;
pub mod control;
pub mod enroll;
pub mod hub;
pub mod names;
pub mod netmap;
pub mod policy;
pub mod posture;
pub mod preview;
pub mod rotation;
pub mod store;
pub mod workload;

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring::default_provider;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::ca::{Ca, CaError};
use crate::hub::Hub;
use crate::store::{Store, StoreError, keys};

/// Name of the file holding the first admin API key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// How often expiring netmaps are re-issued.
const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// What the coordinator needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory (created 0700 when missing).
    pub data_dir: PathBuf,
    /// Trust domain of SPIFFE IDs, e.g. `corp.example`.
    pub trust_domain: String,
    /// Address to listen on, UDP and TCP. Port 0 picks a free port number for both.
    pub listen: SocketAddr,
    /// Address written into join tokens; the listen address when `None`.
    pub advertise: Option<String>,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA could not be loaded or made.
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// TLS set-up failed.
    #[error("tls: {0}")]
    Tls(String),
    /// Another coordinator holds the data directory.
    #[error(
        "another ztnet-coordinator{} is running on the data directory {}: two on one database \
         would split the state; stop it first, or give this one another --data-dir",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .dir.display()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
    },
}

/// A running coordinator.
pub struct Running {
    /// The bound address (UDP and TCP share the port number).
    pub local_addr: SocketAddr,
    /// SHA-256 fingerprint of the CA certificate.
    pub ca_fingerprint: String,
    /// Where the pre-migration backup went, when migrations ran on an existing database.
    pub backup: Option<PathBuf>,
    /// The first admin key file, when it is still there.
    pub admin_key: Option<PathBuf>,
    /// The live state.
    pub hub: Arc<Hub>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    /// Held for the coordinator's life: the exclusive lock on the data directory.
    _lock: fs::File,
}

impl Running {
    /// Stops accepting, closes every control connection and the database.
    pub async fn shutdown(self) {
        self.endpoint
            .close(0u32.into(), b"coordinator shutting down");
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.wait_idle().await;
        self.hub.store.close().await;
    }
}

/// Starts the coordinator: data directory, CA, database, first API key, then the control
/// server and the admin API on one port number.
pub async fn run(config: Config) -> Result<Running, StartError> {
    check_trust_domain(&config.trust_domain)?;
    let dir = &config.data_dir;
    make_data_dir(dir)?;
    let lock = lock_data_dir(dir)?;
    let ca = Ca::load_or_create(dir)?;
    let fingerprint = ca.fingerprint();

    let opened = Store::open(dir).await?;
    if let Some(b) = &opened.backup {
        info!(backup = %b.display(), "database backed up before migrating");
    }
    if !opened.applied.is_empty() {
        info!(migrations = ?opened.applied, "database migrated");
    }
    let store = opened.store;
    check_stored_trust_domain(&store, &config.trust_domain).await?;
    let admin_key = ensure_admin_key(&store, dir).await?;

    let (udp, tcp) = bind_pair(config.listen)?;
    let local_addr = udp.local_addr().map_err(io("reading the bound address"))?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    if config.advertise.is_none() && local_addr.ip().is_unspecified() {
        warn!(
            %local_addr,
            "listening on an unspecified address without --advertise: join tokens will carry \
             {local_addr}, which nodes cannot dial"
        );
    }

    let quic = quic_config(&ca)?;
    let admin = admin_tls(&ca)?;
    let hub = Arc::new(Hub::new(store, ca, config.trust_domain.clone(), advertise).await?);

    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(quic),
        udp,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io("starting the QUIC endpoint"))?;
    let listener = tokio::net::TcpListener::from_std(tcp).map_err(io("admin listener"))?;

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(control::serve(endpoint.clone(), hub.clone())));
    let app = api::router(hub.clone());
    tasks.push(tokio::spawn(api::serve(listener, admin, app)));
    tasks.push(tokio::spawn(rotation::watch_expiry(hub.clone())));
    tasks.push(tokio::spawn(posture::watch_sessions(hub.clone())));
    tasks.push(tokio::spawn(api::drive_ca_rotation(hub.clone())));
    let refresher = hub.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = refresher.recompute_all().await {
                warn!(error = %e, "netmap refresh failed");
            }
        }
    }));

    info!(listen = %local_addr, ca_fingerprint = %fingerprint, "coordinator started");
    Ok(Running {
        local_addr,
        ca_fingerprint: fingerprint,
        backup: opened.backup,
        admin_key,
        hub,
        endpoint,
        tasks,
        _lock: lock,
    })
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        context: context.to_string(),
        source,
    }
}

fn check_trust_domain(td: &str) -> Result<(), StartError> {
    names::trust_domain(td).map_err(StartError::Config)
}

/// Name of the lock file in the data directory.
const LOCK_FILE: &str = "coordinator.lock";

/// Takes an exclusive lock (`flock`) on `DIR/coordinator.lock` and writes this process's pid
/// into it; the kernel drops the lock when the process ends, however it ends.
fn lock_data_dir(dir: &Path) -> Result<fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;

    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io("opening the data directory's lock file"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StartError::Locked {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("locking the data directory")(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io("writing the data directory's lock file"))?;
    Ok(file)
}

fn make_data_dir(dir: &Path) -> Result<(), StartError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(io("creating the data directory")(e)),
    }
    let meta = fs::metadata(dir).map_err(io("reading the data directory"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "data directory is readable by others; setting it to 0700"
        );
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("restricting the data directory"))?;
    }
    Ok(())
}

/// Stores the trust domain at the first start and refuses a later start with another one:
/// SPIFFE IDs already issued carry the first, and the two would mix.
async fn check_stored_trust_domain(store: &Store, trust_domain: &str) -> Result<(), StartError> {
    let mut tx = store.write().await?;
    let stored: Option<(String,)> =
        sqlx::query_as("SELECT value FROM settings WHERE key = 'trust_domain'")
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    match stored {
        Some((stored,)) if stored == trust_domain => Ok(()),
        Some((stored,)) => Err(StartError::Config(format!(
            "this data directory belongs to trust domain {stored:?}, not {trust_domain:?}: \
             identities of the two would mix; start with --trust-domain {stored} or use \
             another data directory"
        ))),
        None => {
            sqlx::query("INSERT INTO settings (key, value) VALUES ('trust_domain', ?)")
                .bind(trust_domain)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            tx.commit().await.map_err(StoreError::from)?;
            Ok(())
        }
    }
}

/// Makes the first admin key when the database has none, and returns the key file's path
/// when it exists. The key file is written first under a temporary name and renamed into
/// place only once its hash is stored, so a crash never leaves a key file that does not work.
async fn ensure_admin_key(store: &Store, dir: &Path) -> Result<Option<PathBuf>, StartError> {
    let path = dir.join(ADMIN_KEY_FILE);
    if keys::count(store).await? > 0 {
        let mut conn = store.pool().acquire().await.map_err(StoreError::from)?;
        if let Some(first) = keys::find(&mut conn, "admin").await?
            && first.revoked_at.is_some()
        {
            // The file names a key that no longer opens anything: do not point people at it.
            info!(
                path = %path.display(),
                "the first admin key (admin.key) was revoked; use a key made with `ztnet \
                 api-key create`"
            );
            return Ok(None);
        }
        if path.exists() {
            return Ok(Some(path));
        }
        warn!(
            path = %path.display(),
            "the first admin key file is gone, but the database has admin keys: use another \
             key you made, or restore admin.key from a backup (the database stores only hashes \
             and cannot show it again)"
        );
        return Ok(None);
    }
    let key = keys::NewKey::generate();
    let tmp = dir.join(format!("{ADMIN_KEY_FILE}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing a stale admin.key.tmp")(e)),
    }
    ca::write_file(&tmp, format!("{}\n", key.expose()).as_bytes(), 0o600)?;
    keys::insert(store, "admin", &key).await?;
    fs::rename(&tmp, &path).map_err(io("writing admin.key"))?;
    info!(path = %path.display(), "first admin API key written");
    Ok(Some(path))
}

/// Binds UDP and TCP on the same port number. With port 0 the UDP socket picks the number and
/// TCP follows, retrying when another program holds that TCP port.
fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, StdTcpListener), StartError> {
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).map_err(io("binding the UDP (QUIC) socket"))?;
        let port = udp.local_addr().map_err(io("reading the UDP port"))?.port();
        match StdTcpListener::bind(SocketAddr::new(listen.ip(), port)) {
            Ok(tcp) => {
                tcp.set_nonblocking(true).map_err(io("admin listener"))?;
                return Ok((udp, tcp));
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no attempt made"));
    Err(io("binding the TCP (admin API) socket")(e))
}

/// The control channel's TLS: the server certificate and the client verifier both follow the
/// CA's rotation steps (see [`ca`]).
fn quic_config(ca: &Ca) -> Result<quinn::ServerConfig, StartError> {
    let provider = Arc::new(default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_client_cert_verifier(ca.client_verifier())
        .with_cert_resolver(ca.server_resolver());
    tls.alpn_protocols = vec![ztnet_proto::CONTROL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Nodes use the same timers: a dead node (or, seen from a node, a dead coordinator) is
    // noticed within 8 s of silence.
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(8))
            .map_err(|e| StartError::Tls(e.to_string()))?,
    ));
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(1u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn admin_tls(ca: &Ca) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(ca.server_resolver());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}
