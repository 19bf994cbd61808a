//! The state directory of coordinator mode (mode 0700): what a node keeps between starts.
//!
//! | file | mode | content |
//! | --- | --- | --- |
//! | `wg.key` | 0600 | WireGuard private key, made here on first start, never sent |
//! | `tls.key` | 0600 | private key of the node certificate (PKCS#8 PEM) |
//! | `node.pem` | 0644 | node certificate from the coordinator |
//! | `ca.pem` | 0644 | the coordinator's CA (trust bundle) |
//! | `enrollment.json` | 0644 | name, network, SPIFFE ID, addresses, coordinator address |
//! | `netmap.json` | 0600 | the last netmap applied, for fail-static restarts |
//!
//! Every write goes to a temporary file that is synced and then renamed over the old one, so a
//! crash leaves either the old or the new content. Plain file I/O; no network.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use ztnet_proto::PrivateKey;
use ztnet_proto::control::Netmap;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file's content is not what this node wrote.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another node process holds the directory.
    #[error(
        "another ztnet-node{} is running on the state directory {}: two processes with one \
         identity would take the control channel from each other and change each other's \
         routes; stop it first, or give this one another --state-dir",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .dir.display()
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
    },
}

/// Name of the lock file in the state directory.
const LOCK_FILE: &str = "node.lock";

/// What the node learned at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Node name as the coordinator recorded it.
    pub name: String,
    /// Network name.
    pub network: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Overlay addresses with the network's prefix length.
    pub addresses: Vec<IpNet>,
    /// Coordinator address, `HOST:PORT`.
    pub coordinator: String,
}

/// An opened state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

const WG_KEY: &str = "wg.key";
const TLS_KEY: &str = "tls.key";
const NODE_CERT: &str = "node.pem";
const CA_CERT: &str = "ca.pem";
const ENROLLMENT: &str = "enrollment.json";
const NETMAP: &str = "netmap.json";

impl StateDir {
    /// Opens the directory, creating it with mode 0700; an existing one is tightened to 0700.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| io(root, e))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(|e| io(root, e))?;
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// Takes an exclusive lock (`flock`) on `node.lock` in the directory and writes this
    /// process's pid into it; held while the returned file lives, and dropped by the kernel
    /// when the process ends, however it ends.
    pub fn lock(&self) -> Result<fs::File, StateError> {
        use std::io::{Read, Seek};

        let path = self.root.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StateError::Locked {
                    dir: self.root.clone(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&path, e)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| io(&path, e))?;
        Ok(file)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Loads the WireGuard key, or makes one on first start.
    pub fn wg_key(&self) -> Result<PrivateKey, StateError> {
        let path = self.root.join(WG_KEY);
        match fs::read_to_string(&path) {
            Ok(text) => {
                check_private_mode(&path)?;
                PrivateKey::parse_file_content(&text).map_err(|e| corrupt(&path, e.to_string()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                let mut text = key.to_base64_secret();
                text.push('\n');
                write_atomic(&path, text.as_bytes(), 0o600)?;
                Ok(key)
            }
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Loads the TLS key PEM, or makes a key pair on first start.
    pub fn tls_key(&self) -> Result<rcgen::KeyPair, StateError> {
        let path = self.root.join(TLS_KEY);
        match fs::read_to_string(&path) {
            Ok(pem) => {
                check_private_mode(&path)?;
                rcgen::KeyPair::from_pem(&pem).map_err(|e| corrupt(&path, e.to_string()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let key = new_tls_key().map_err(|e| corrupt(&path, e))?;
                self.save_tls_key(&key)?;
                Ok(key)
            }
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Replaces the TLS key (after a renewal).
    pub fn save_tls_key(&self, key: &rcgen::KeyPair) -> Result<(), StateError> {
        let pem = zeroize::Zeroizing::new(key.serialize_pem());
        write_atomic(&self.root.join(TLS_KEY), pem.as_bytes(), 0o600)
    }

    /// The node certificate and CA PEMs, if enrolled.
    pub fn certs(&self) -> Result<Option<NodeCerts>, StateError> {
        let Some(cert_pem) = read_optional(&self.root.join(NODE_CERT))? else {
            return Ok(None);
        };
        let ca = self.root.join(CA_CERT);
        let ca_pem = read_optional(&ca)?
            .ok_or_else(|| corrupt(&ca, "missing beside node.pem".to_string()))?;
        Ok(Some(NodeCerts { cert_pem, ca_pem }))
    }

    /// Stores a node certificate and the trust bundle.
    pub fn save_certs(&self, certs: &NodeCerts) -> Result<(), StateError> {
        write_atomic(&self.root.join(CA_CERT), certs.ca_pem.as_bytes(), 0o644)?;
        write_atomic(&self.root.join(NODE_CERT), certs.cert_pem.as_bytes(), 0o644)
    }

    /// What enrollment recorded, if the node is enrolled.
    pub fn enrollment(&self) -> Result<Option<Enrollment>, StateError> {
        let path = self.root.join(ENROLLMENT);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt(&path, e.to_string()))
    }

    /// Records enrollment.
    pub fn save_enrollment(&self, e: &Enrollment) -> Result<(), StateError> {
        let path = self.root.join(ENROLLMENT);
        let json = serde_json::to_vec_pretty(e).map_err(|e| corrupt(&path, e.to_string()))?;
        write_atomic(&path, &json, 0o644)
    }

    /// The last netmap applied, if any.
    pub fn netmap(&self) -> Result<Option<Netmap>, StateError> {
        let path = self.root.join(NETMAP);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt(&path, e.to_string()))
    }

    /// Persists a netmap atomically.
    pub fn save_netmap(&self, netmap: &Netmap) -> Result<(), StateError> {
        let path = self.root.join(NETMAP);
        let json = serde_json::to_vec(netmap).map_err(|e| corrupt(&path, e.to_string()))?;
        write_atomic(&path, &json, 0o600)
    }

    /// Forgets the netmap (on revocation), so a restart passes nothing.
    pub fn remove_netmap(&self) -> Result<(), StateError> {
        let path = self.root.join(NETMAP);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, e)),
        }
    }
}

/// The node's certificate and its trust bundle, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCerts {
    /// Node certificate.
    pub cert_pem: String,
    /// CA certificate(s).
    pub ca_pem: String,
}

/// Makes a fresh ECDSA P-256 key pair for the node certificate.
pub fn new_tls_key() -> Result<rcgen::KeyPair, String> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())
}

/// Writes `data` to `path` through a synced temporary file and a rename, with `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    // The mode given to open only applies to a new file; set it for a leftover one too.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(data))
        .and_then(|()| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Some(dir) = path.parent() {
        // Syncing the directory makes the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn read_optional(path: &Path) -> Result<Option<String>, StateError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Refuses a private key file that others can read.
fn check_private_mode(path: &Path) -> Result<(), StateError> {
    let meta = fs::metadata(path).map_err(|e| io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(corrupt(
            path,
            format!("mode is {mode:04o}; a private key file must be 0600 (chmod 600 it)"),
        ));
    }
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: String) -> StateError {
    StateError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_with_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("state");
        let state = StateDir::open(&root).expect("opens");
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);

        let k1 = state.wg_key().expect("made");
        let k2 = state.wg_key().expect("loaded");
        assert_eq!(k1.public_key(), k2.public_key());
        assert_eq!(mode(&root.join(WG_KEY)), 0o600);

        let t1 = state.tls_key().expect("made");
        let t2 = state.tls_key().expect("loaded");
        assert_eq!(t1.public_key_der(), t2.public_key_der());
        assert_eq!(mode(&root.join(TLS_KEY)), 0o600);
    }

    #[test]
    fn readable_private_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("opens");
        state.wg_key().expect("made");
        let p = dir.path().join(WG_KEY);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = state.wg_key().expect_err("refused").to_string();
        assert!(err.contains("must be 0600"), "{err}");
    }

    #[test]
    fn corrupt_key_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("opens");
        write_atomic(&dir.path().join(WG_KEY), b"\"abc\"\n", 0o600).expect("written");
        let err = state.wg_key().expect_err("refused").to_string();
        assert!(
            err.contains("wg.key is corrupt") && err.contains("quotes"),
            "{err}"
        );
    }

    #[test]
    fn missing_files_read_as_not_enrolled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("opens");
        assert!(state.certs().expect("reads").is_none());
        assert!(state.enrollment().expect("reads").is_none());
        assert!(state.netmap().expect("reads").is_none());
        state.remove_netmap().expect("no file is fine");
    }

    #[test]
    fn corrupt_netmap_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("opens");
        write_atomic(&dir.path().join(NETMAP), b"{\"version\":", 0o600).expect("written");
        assert!(matches!(state.netmap(), Err(StateError::Corrupt { .. })));
    }
}
