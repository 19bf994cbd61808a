//! The coordinator's certificate authorities: made in the data directory, used to sign the
//! server certificate, node certificates and X.509-SVIDs, and rotated in stages.
//!
//! Usually one CA signs and is the whole trust bundle. A rotation goes through three states:
//!
//! 1. [`Ca::stage_next`]: a new CA is made and added to the bundle (`ca.pem`); the old one still
//!    signs. The coordinator trusts both for client certificates from then on.
//! 2. [`Ca::activate`]: the new CA signs everything, the server certificate included; its chain
//!    also carries the new CA cross-signed by the old one, so a client that still trusts only
//!    the old CA (a node that was offline, a CLI with an old `ca.pem`, a token with the old
//!    fingerprint) verifies it. The old CA gets a retirement time: when the last certificate
//!    it signed has expired.
//! 3. [`Ca::retire_due`]: past that time the old CA leaves the bundle and its key is deleted.
//!
//! Files: `ca.pem` is the bundle (every trusted CA, oldest first); each CA has its certificate
//! in `ca-N.pem` and its key in `ca-N.key` (0600), except the first, whose key is `ca.key`;
//! `ca-state.json` says which CAs exist and which signs. A data directory from before
//! rotation existed (`ca.pem` and `ca.key` only) is read as generation 1. Does file I/O when
//! loading, staging, activating and retiring; signing does none.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::DistinguishedName as TlsName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Lifetime of a node certificate unless `ZTNET_NODE_CERT_LIFETIME_SECS` says otherwise.
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far certificates are back-dated, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the server certificate, re-issued at every start and every CA change.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of a CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Margin after the last certificate of a retiring CA expires before it leaves the bundle.
const RETIRE_MARGIN_SECS: u64 = 5;
/// The environment variable that shortens node certificates (seconds, 60 to 86400).
pub const NODE_CERT_LIFETIME_ENV: &str = "ZTNET_NODE_CERT_LIFETIME_SECS";
/// How long past NotAfter an expired node certificate may still renew itself, unless
/// [`RENEW_GRACE_ENV`] says otherwise (FC-22).
pub const RENEW_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The environment variable that sets the renewal window for expired node certificates
/// (seconds, 0 to 31536000; 0 turns renewal of expired certificates off).
pub const RENEW_GRACE_ENV: &str = "ZTNET_EXPIRED_RENEW_GRACE_SECS";

const BUNDLE_FILE: &str = "ca.pem";
const STATE_FILE: &str = "ca-state.json";

/// Why the CA could not be loaded, changed, or a certificate not issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A CA file exists but does not hold what it should.
    #[error("{path} is not a usable CA file: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The certificate request is malformed or its signature does not verify.
    #[error("certificate request refused: {0}")]
    BadCsr(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// The rotation step asked for does not fit the state the CAs are in.
    #[error("{0}")]
    Conflict(String),
    /// TLS refused a certificate or key the CA made.
    #[error("tls: {0}")]
    Tls(String),
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One CA signs and is the whole bundle.
    Steady,
    /// A new CA is in the bundle but does not sign yet.
    Staged,
    /// The new CA signs; the old one stays in the bundle until its certificates expire.
    Retiring,
}

/// One CA as the status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityView {
    /// 1 for the first CA, then one more per rotation.
    pub generation: u32,
    /// SHA-256 fingerprint of its certificate, as join tokens carry it.
    pub fingerprint: String,
    /// Its subject common name.
    pub subject: String,
    /// `signing`, `staged` or `retiring`.
    pub role: String,
    /// Validity of the CA certificate, Unix seconds.
    pub not_before: u64,
    /// Validity of the CA certificate, Unix seconds.
    pub not_after: u64,
    /// When it was made (Unix seconds; 0 when unknown, for a CA from before rotation).
    pub added_at: u64,
    /// When it began to sign, if it has.
    pub activated_at: Option<u64>,
    /// When it leaves the bundle (retiring CAs only).
    pub retire_at: Option<u64>,
}

/// The CA state as the status shows it.
#[derive(Debug, Clone)]
pub struct CaView {
    /// Where a rotation stands.
    pub phase: Phase,
    /// Oldest first.
    pub authorities: Vec<AuthorityView>,
    /// In [`Phase::Staged`]: the earliest activation, once every SVID issued before the new CA
    /// was staged has expired (so every workload holds a bundle with both).
    pub activate_after: Option<u64>,
    /// The trust bundle, PEM.
    pub bundle_pem: String,
}

/// A freshly signed certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM form.
    pub pem: String,
    /// Serial number, lowercase hex: how a session is mapped to its node.
    pub serial: String,
    /// Unix seconds after which it is no longer valid.
    pub not_after: u64,
}

/// The CAs. Cheap to clone: every clone shares one state, so the TLS configurations built
/// from [`Ca::server_resolver`] and [`Ca::client_verifier`] follow every rotation step.
#[derive(Clone)]
pub struct Ca {
    dir: PathBuf,
    state: Arc<RwLock<State>>,
}

struct State {
    /// Oldest first.
    authorities: Vec<Arc<Authority>>,
    stored: Stored,
    bundle_pem: String,
    server: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

struct Authority {
    generation: u32,
    issuer: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    der: CertificateDer<'static>,
    subject: String,
    not_before: u64,
    not_after: u64,
}

/// `ca-state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The generation that signs.
    signer: u32,
    /// Oldest first.
    cas: Vec<StoredCa>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCa {
    generation: u32,
    #[serde(default)]
    added_at: u64,
    #[serde(default)]
    activated_at: Option<u64>,
    #[serde(default)]
    activate_after: Option<u64>,
    #[serde(default)]
    retire_at: Option<u64>,
}

impl Ca {
    /// Loads the CAs from the data directory, creating the first when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let state_path = dir.join(STATE_FILE);
        let stored = if state_path.exists() {
            let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
            let stored: Stored =
                serde_json::from_str(&text).map_err(|e| corrupt(&state_path, e.to_string()))?;
            if stored.cas.is_empty() || !stored.cas.iter().any(|c| c.generation == stored.signer) {
                return Err(corrupt(&state_path, "the signing CA is not listed".into()));
            }
            stored
        } else {
            let cert_path = dir.join(BUNDLE_FILE);
            let key_path = key_path(dir, 1);
            match (cert_path.exists(), key_path.exists()) {
                (false, false) => create_first(&cert_path, &key_path)?,
                (true, true) => {}
                _ => {
                    return Err(CaError::Corrupt {
                        path: dir.display().to_string(),
                        reason: "exactly one of ca.pem and ca.key exists; restore the other".into(),
                    });
                }
            }
            Stored {
                signer: 1,
                cas: vec![StoredCa {
                    generation: 1,
                    added_at: 0,
                    activated_at: None,
                    activate_after: None,
                    retire_at: None,
                }],
            }
        };
        let mut authorities = Vec::with_capacity(stored.cas.len());
        for c in &stored.cas {
            authorities.push(Arc::new(load_authority(dir, c.generation)?));
        }
        let state = State::build(authorities, stored)?;
        let ca = Ca {
            dir: dir.to_path_buf(),
            state: Arc::new(RwLock::new(state)),
        };
        // A bundle file that lags behind the state (a crash between the two writes) is
        // rewritten; the state file is the truth.
        let on_disk = fs::read_to_string(dir.join(BUNDLE_FILE)).unwrap_or_default();
        if on_disk != ca.read().bundle_pem {
            write_atomic(
                &dir.join(BUNDLE_FILE),
                ca.read().bundle_pem.as_bytes(),
                0o644,
            )?;
        }
        Ok(ca)
    }

    /// The trust bundle in PEM: every CA that nodes and workloads must trust.
    pub fn ca_pem(&self) -> String {
        self.read().bundle_pem.clone()
    }

    /// The DER certificates of the bundle, oldest first.
    pub fn bundle_der(&self) -> Vec<CertificateDer<'static>> {
        self.read()
            .authorities
            .iter()
            .map(|a| a.der.clone())
            .collect()
    }

    /// SHA-256 fingerprint of the signing CA's certificate, as carried in new join tokens.
    pub fn fingerprint(&self) -> String {
        let state = self.read();
        ztnet_proto::token::fingerprint(&state.signer().der)
    }

    /// Where a rotation stands, and every CA.
    pub fn view(&self) -> CaView {
        self.read().view()
    }

    /// Resolves the server certificate of the moment (for QUIC and the admin API).
    pub fn server_resolver(&self) -> Arc<dyn ResolvesServerCert> {
        Arc::new(ServerCerts {
            state: self.state.clone(),
        })
    }

    /// Verifies client certificates against every CA in the bundle of the moment; a client
    /// without a certificate is let through the TLS layer (enrollment).
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(ClientCerts {
            state: self.state.clone(),
        })
    }

    /// Stage 1 of a rotation: makes the next CA and adds it to the bundle. `activate_after` is
    /// the earliest time it may sign (when every SVID issued before now has expired).
    pub fn stage_next(&self, now: u64, activate_after: u64) -> Result<CaView, CaError> {
        let mut state = self.write();
        if state.phase() != Phase::Steady {
            return Err(CaError::Conflict(format!(
                "a rotation is already under way ({}); see `ztnet ca status`",
                phase_word(state.phase())
            )));
        }
        let signer = state.signer();
        // Every CA gets its own certificate file, the first too, so that the bundle can be
        // rebuilt from the files alone.
        let first_pem = dir_cert_path(&self.dir, signer.generation);
        if !first_pem.exists() {
            write_atomic(&first_pem, signer.pem.as_bytes(), 0o644)?;
        }
        let generation = state
            .authorities
            .iter()
            .map(|a| a.generation)
            .max()
            .unwrap_or(1)
            + 1;
        create_ca(&self.dir, generation)?;
        let next = load_authority(&self.dir, generation)?;

        let mut stored = state.stored.clone();
        stored.cas.push(StoredCa {
            generation,
            added_at: now,
            activated_at: None,
            activate_after: Some(activate_after),
            retire_at: None,
        });
        let mut authorities = state.authorities.clone();
        authorities.push(Arc::new(next));
        self.commit(&mut state, authorities, stored)?;
        Ok(state.view())
    }

    /// Stage 2: the staged CA signs from now on, the server certificate first. The old one
    /// retires `retire_after` from now, when everything it signed has expired.
    pub fn activate(&self, now: u64, retire_after: Duration) -> Result<CaView, CaError> {
        let mut state = self.write();
        if state.phase() != Phase::Staged {
            return Err(CaError::Conflict(format!(
                "there is no staged CA to activate ({}); start with `ztnet ca rotate`",
                phase_word(state.phase())
            )));
        }
        let mut stored = state.stored.clone();
        let old = stored.signer;
        let newest = stored.cas.iter().map(|c| c.generation).max().unwrap_or(old);
        stored.signer = newest;
        for c in &mut stored.cas {
            if c.generation == newest {
                c.activated_at = Some(now);
                c.activate_after = None;
            } else if c.generation == old {
                c.retire_at = Some(now + retire_after.as_secs() + RETIRE_MARGIN_SECS);
            }
        }
        let authorities = state.authorities.clone();
        self.commit(&mut state, authorities, stored)?;
        Ok(state.view())
    }

    /// Stage 3: drops every retiring CA whose time has come, deleting its key. Returns the
    /// generations dropped (none most of the time).
    pub fn retire_due(&self, now: u64) -> Result<Vec<u32>, CaError> {
        let mut state = self.write();
        let due: Vec<u32> = state
            .stored
            .cas
            .iter()
            .filter(|c| c.retire_at.is_some_and(|t| t <= now))
            .map(|c| c.generation)
            .collect();
        if due.is_empty() {
            return Ok(due);
        }
        let mut stored = state.stored.clone();
        stored.cas.retain(|c| !due.contains(&c.generation));
        let mut authorities = state.authorities.clone();
        authorities.retain(|a| !due.contains(&a.generation));
        self.commit(&mut state, authorities, stored)?;
        // The state no longer names them: their keys can go. A failure here leaves an unused
        // key file behind, which is logged by the caller and harms nothing else.
        for g in &due {
            for path in [key_path(&self.dir, *g), dir_cert_path(&self.dir, *g)] {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        }
        Ok(due)
    }

    /// Signs a node certificate for the public key in `csr_pem`: client-auth only, URI SAN =
    /// `spiffe_id`, valid from 60 s ago for the node certificate lifetime (24 h by default).
    /// Nothing in the request but its key is used.
    pub fn issue_node(&self, csr_pem: &str, spiffe_id: &str) -> Result<IssuedCert, CaError> {
        let csr = parse_csr(csr_pem)?;
        let uri = rcgen::Ia5String::try_from(spiffe_id.to_string())
            .map_err(|e| CaError::BadCsr(format!("spiffe id is not ASCII: {e}")))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spiffe_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(params, &csr.public_key, node_cert_lifetime())
    }

    /// Signs an X.509-SVID for the public key in `csr_pem`: exactly one URI SAN (`spiffe_id`),
    /// digitalSignature only, not a CA, server and client auth, back-dated 60 s, valid for
    /// `lifetime`. Nothing in the request but its key is used.
    pub fn issue_svid(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let csr = parse_csr(csr_pem)?;
        let uri = rcgen::Ia5String::try_from(spiffe_id.to_string())
            .map_err(|e| CaError::BadCsr(format!("spiffe id is not ASCII: {e}")))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ztnet workload");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign_leaf(params, &csr.public_key, lifetime)
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let state = self.read();
        let signer = state.signer();
        let cert = params.signed_by(key, &signer.issuer, &signer.key)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: hex::encode(serial.as_ref()),
            not_after: u64::try_from((now + lifetime).unix_timestamp()).unwrap_or(0),
        })
    }

    /// Writes the new state (state file, then bundle) and puts it in force; on a failure
    /// nothing changes in memory.
    fn commit(
        &self,
        state: &mut State,
        authorities: Vec<Arc<Authority>>,
        stored: Stored,
    ) -> Result<(), CaError> {
        let next = State::build(authorities, stored)?;
        let json = serde_json::to_vec_pretty(&next.stored)
            .map_err(|e| corrupt(&self.dir.join(STATE_FILE), e.to_string()))?;
        write_atomic(&self.dir.join(STATE_FILE), &json, 0o600)?;
        write_atomic(
            &self.dir.join(BUNDLE_FILE),
            next.bundle_pem.as_bytes(),
            0o644,
        )?;
        *state = next;
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every writer replaces the state whole or not at all, so a poisoned lock still
        // holds a consistent state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn build(authorities: Vec<Arc<Authority>>, stored: Stored) -> Result<State, CaError> {
        let bundle_pem: String = authorities.iter().map(|a| a.pem.as_str()).collect();
        let provider = provider();
        let mut roots = rustls::RootCertStore::empty();
        for a in &authorities {
            roots
                .add(a.der.clone())
                .map_err(|e| CaError::Tls(format!("CA {} refused: {e}", a.generation)))?;
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| CaError::Tls(e.to_string()))?;
        let mut state = State {
            authorities,
            stored,
            bundle_pem,
            server: Arc::new(CertifiedKey::new(Vec::new(), placeholder_key(&provider)?)),
            client_verifier,
        };
        state.server = Arc::new(state.issue_server(&provider)?);
        Ok(state)
    }

    fn signer(&self) -> &Authority {
        self.authorities
            .iter()
            .find(|a| a.generation == self.stored.signer)
            // `Ca::load_or_create` and every step check that the signer is listed.
            .unwrap_or_else(|| &self.authorities[0])
    }

    fn phase(&self) -> Phase {
        if self.authorities.len() <= 1 {
            Phase::Steady
        } else if self
            .authorities
            .iter()
            .any(|a| a.generation > self.stored.signer)
        {
            Phase::Staged
        } else {
            Phase::Retiring
        }
    }

    /// A server certificate for [`ztnet_proto::COORDINATOR_SERVER_NAME`] from the signer. Its
    /// chain is `[leaf, signer]`, and while an older CA is still in the bundle also the signer
    /// cross-signed by that CA, and that CA: clients that trust only the old CA, and tokens
    /// that pin it, still verify the chain.
    fn issue_server(&self, provider: &CryptoProvider) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(vec![ztnet_proto::COORDINATOR_SERVER_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ztnet_proto::COORDINATOR_SERVER_NAME);
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + SERVER_CERT_LIFETIME;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let signer = self.signer();
        let leaf = params.signed_by(&key, &signer.issuer, &signer.key)?;

        let mut chain = vec![leaf.der().clone()];
        for older in self
            .authorities
            .iter()
            .filter(|a| a.generation < signer.generation)
        {
            let mut cross = CertificateParams::from_ca_cert_pem(&signer.pem)?;
            cross.serial_number = Some(random_serial());
            let cross = cross.signed_by(&signer.key, &older.issuer, &older.key)?;
            chain.push(cross.der().clone());
        }
        chain.push(signer.der.clone());
        for older in self
            .authorities
            .iter()
            .filter(|a| a.generation < signer.generation)
        {
            chain.push(older.der.clone());
        }
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| CaError::Tls(e.to_string()))?;
        Ok(CertifiedKey::new(chain, signing))
    }

    fn view(&self) -> CaView {
        let phase = self.phase();
        let authorities = self
            .authorities
            .iter()
            .map(|a| {
                let stored = self
                    .stored
                    .cas
                    .iter()
                    .find(|c| c.generation == a.generation);
                let role = if a.generation == self.stored.signer {
                    "signing"
                } else if a.generation > self.stored.signer {
                    "staged"
                } else {
                    "retiring"
                };
                AuthorityView {
                    generation: a.generation,
                    fingerprint: ztnet_proto::token::fingerprint(&a.der),
                    subject: a.subject.clone(),
                    role: role.into(),
                    not_before: a.not_before,
                    not_after: a.not_after,
                    added_at: stored.map_or(0, |c| c.added_at),
                    activated_at: stored.and_then(|c| c.activated_at),
                    retire_at: stored.and_then(|c| c.retire_at),
                }
            })
            .collect();
        let activate_after = self
            .stored
            .cas
            .iter()
            .filter(|c| c.generation > self.stored.signer)
            .find_map(|c| c.activate_after);
        CaView {
            phase,
            authorities,
            activate_after,
            bundle_pem: self.bundle_pem.clone(),
        }
    }
}

/// The word for a phase in messages.
pub fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Steady => "one CA, no rotation under way",
        Phase::Staged => "a new CA is staged and waits for every node",
        Phase::Retiring => "the new CA signs and the old one waits for its certificates to expire",
    }
}

/// The lifetime of node certificates: 24 h, or `ZTNET_NODE_CERT_LIFETIME_SECS` (60 to 86400
/// seconds; anything else is ignored with a warning). Read once.
pub fn node_cert_lifetime() -> Duration {
    static LIFETIME: OnceLock<Duration> = OnceLock::new();
    *LIFETIME.get_or_init(|| match std::env::var(NODE_CERT_LIFETIME_ENV) {
        Err(_) => NODE_CERT_LIFETIME,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if (60..=86_400).contains(&s) => Duration::from_secs(s),
            _ => {
                tracing::warn!(
                    value = %v,
                    "{NODE_CERT_LIFETIME_ENV} must be 60 to 86400 seconds; using 24 h"
                );
                NODE_CERT_LIFETIME
            }
        },
    })
}

/// The renewal window for expired node certificates: 30 days, or `ZTNET_EXPIRED_RENEW_GRACE_SECS`
/// (0 to 31536000 seconds; anything else is ignored with a warning). Read once.
pub fn renew_grace() -> Duration {
    static GRACE: OnceLock<Duration> = OnceLock::new();
    *GRACE.get_or_init(|| match std::env::var(RENEW_GRACE_ENV) {
        Err(_) => RENEW_GRACE,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s <= 365 * 24 * 3600 => Duration::from_secs(s),
            _ => {
                tracing::warn!(
                    value = %v,
                    "{RENEW_GRACE_ENV} must be 0 to 31536000 seconds; using 30 days"
                );
                RENEW_GRACE
            }
        },
    })
}

/// NotAfter of a DER certificate, Unix seconds.
pub fn not_after_of(der: &[u8]) -> Option<u64> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// Serial number of a DER certificate in the form [`IssuedCert::serial`] uses.
pub fn serial_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

/// Resolves the server certificate from the shared state at every handshake.
#[derive(Debug)]
struct ServerCerts {
    state: Arc<RwLock<State>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("signer", &self.stored.signer)
            .field("cas", &self.authorities.len())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        Some(state.server.clone())
    }
}

/// Verifies client certificates with the verifier of the bundle in force.
#[derive(Debug)]
struct ClientCerts {
    state: Arc<RwLock<State>>,
}

impl ClientCerts {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.client_verifier.clone()
    }
}

impl ClientCertVerifier for ClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        // No hints: the set changes with rotation, and nodes hold one certificate anyway.
        &[]
    }

    /// Verifies as the bundle's verifier does, with one exception (FC-22): a certificate whose
    /// only fault is that it has expired is accepted when it verifies in full at its own
    /// NotAfter (same chain, signature and key usage, by a CA still in the bundle). The control
    /// channel, the only user of these certificates, then allows such a session nothing but a
    /// renewal, and only within the renewal window ([`renew_grace`]) for an active node whose
    /// certificate is on record; see `crate::control`.
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.current();
        match verifier.verify_client_cert(end_entity, intermediates, now) {
            Err(e) if matches!(&e, rustls::Error::InvalidCertificate(why) if is_expiry(why)) => {
                let Some(not_after) = not_after_of(end_entity) else {
                    return Err(e);
                };
                if not_after >= now.as_secs() {
                    return Err(e);
                }
                let then = UnixTime::since_unix_epoch(Duration::from_secs(not_after));
                verifier
                    .verify_client_cert(end_entity, intermediates, then)
                    .map_err(|_| e)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Whether a certificate error says "expired" and nothing else.
fn is_expiry(e: &rustls::CertificateError) -> bool {
    matches!(
        e,
        rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
    )
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throw-away signing key for the moment between building a state and issuing its server
/// certificate; never served.
fn placeholder_key(
    provider: &CryptoProvider,
) -> Result<Arc<dyn rustls::sign::SigningKey>, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| CaError::Tls(e.to_string()))
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(CaError::BadCsr("request is over 16 KiB".into()));
    }
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::BadCsr(format!("not a valid signed PEM request ({e})")))
}

/// A positive 16-byte random serial (the top bit cleared, so DER keeps it 16 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from(bytes.to_vec())
}

fn key_path(dir: &Path, generation: u32) -> PathBuf {
    if generation == 1 {
        dir.join("ca.key")
    } else {
        dir.join(format!("ca-{generation}.key"))
    }
}

fn dir_cert_path(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("ca-{generation}.pem"))
}

fn ca_params(generation: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let name = if generation == 1 {
        "ztnet coordinator CA".to_string()
    } else {
        format!("ztnet coordinator CA {generation}")
    };
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial());
    params
}

fn create_first(cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(1).self_signed(&key)?;
    // Key first, so a crash between the two writes leaves a state that load reports plainly.
    write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn create_ca(dir: &Path, generation: u32) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(generation).self_signed(&key)?;
    let kp = key_path(dir, generation);
    let cp = dir_cert_path(dir, generation);
    // Left-overs of a rotation that failed half-way are replaced: no state names them.
    for p in [&kp, &cp] {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p)(e)),
        }
    }
    write_file(&kp, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cp, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Loads one CA: its certificate from `ca-N.pem` (for generation 1 from the first
/// certificate of `ca.pem` when `ca-1.pem` does not exist) and its key.
fn load_authority(dir: &Path, generation: u32) -> Result<Authority, CaError> {
    let key_path = key_path(dir, generation);
    let mut cert_path = dir_cert_path(dir, generation);
    if generation == 1 && !cert_path.exists() {
        cert_path = dir.join(BUNDLE_FILE);
    }
    let mode = fs::metadata(&key_path)
        .map_err(io_err(&key_path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(corrupt(
            &key_path,
            format!(
                "mode is {:o}; it must be readable by its owner only (0600)",
                mode & 0o777
            ),
        ));
    }
    let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let file_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(&key_path, e.to_string()))?;

    let mut reader = file_pem.as_bytes();
    let der = rustls_pemfile::certs(&mut reader)
        .next()
        .ok_or_else(|| corrupt(&cert_path, "no certificate in it".into()))?
        .map_err(|e| corrupt(&cert_path, e.to_string()))?;
    let pem = pem_of(&der);
    let params = CertificateParams::from_ca_cert_pem(&pem)
        .map_err(|e| corrupt(&cert_path, e.to_string()))?;
    // Re-signing the parsed parameters gives an issuer with the stored subject and key; the
    // certificates it signs chain to the stored certificate.
    let issuer = params
        .self_signed(&key)
        .map_err(|e| corrupt(&key_path, format!("does not match the certificate: {e}")))?;
    if issuer.params().distinguished_name.iter().count() == 0 {
        return Err(corrupt(&cert_path, "empty subject".into()));
    }
    let facts = facts_of(&der, &key).map_err(|r| corrupt(&key_path, r))?;
    Ok(Authority {
        generation,
        issuer,
        key,
        pem,
        der,
        subject: facts.subject,
        not_before: facts.not_before,
        not_after: facts.not_after,
    })
}

struct Facts {
    subject: String,
    not_before: u64,
    not_after: u64,
}

fn facts_of(ca_der: &[u8], key: &KeyPair) -> Result<Facts, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(ca_der)
        .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
    let spki = cert.public_key().subject_public_key.data.as_ref();
    if spki != key.public_key_raw() {
        return Err("the key does not belong to the CA certificate".into());
    }
    let subject = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let validity = cert.validity();
    Ok(Facts {
        subject,
        not_before: validity.not_before.timestamp().max(0).unsigned_abs(),
        not_after: validity.not_after.timestamp().max(0).unsigned_abs(),
    })
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, reason: String) -> CaError {
    CaError::Corrupt {
        path: path.display().to_string(),
        reason,
    }
}

/// Writes a new file with `mode`, refusing to follow or replace an existing one.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    // The umask may have narrowed the mode on create; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(())
}

/// Replaces `path` atomically: a temporary file beside it, fsynced, renamed over it, and the
/// directory fsynced.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    write_file(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        let d = fs::File::open(parent).map_err(io_err(parent))?;
        d.sync_all().map_err(io_err(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::ServerName;

    fn chain(ca: &Ca) -> Vec<CertificateDer<'static>> {
        ca.read().server.cert.clone()
    }

    /// Verifies `chain` as a client trusting exactly `roots` would.
    fn verifies(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> bool {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).expect("a CA certificate");
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .expect("verifier");
        let name = ServerName::try_from(ztnet_proto::COORDINATOR_SERVER_NAME).expect("name");
        v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .is_ok()
    }

    fn csr() -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    fn issuer_cn(pem: &str) -> String {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("parses");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        cert.issuer()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .expect("issuer CN")
            .to_string()
    }

    #[test]
    fn rotation_stages_activates_and_retires_with_every_client_verifying() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("first CA");
        let old = ca.bundle_der();
        assert_eq!(old.len(), 1);
        assert_eq!(ca.view().phase, Phase::Steady);
        let old_fp = ca.fingerprint();

        let view = ca.stage_next(1_000, 1_000).expect("staged");
        assert_eq!(view.phase, Phase::Staged);
        let both = ca.bundle_der();
        assert_eq!(both.len(), 2);
        let new = vec![both[1].clone()];
        assert_eq!(
            ca.fingerprint(),
            old_fp,
            "the old CA still signs while staged"
        );
        assert!(verifies(&chain(&ca), &old));
        assert!(
            !verifies(&chain(&ca), &new),
            "nothing is signed by the new CA yet"
        );
        assert_eq!(
            issuer_cn(&ca.issue_node(&csr(), "spiffe://td/n").expect("node").pem),
            "ztnet coordinator CA"
        );
        assert!(matches!(
            ca.stage_next(1_001, 1_001),
            Err(CaError::Conflict(_))
        ));
        let on_disk = fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        assert_eq!(on_disk, ca.ca_pem(), "ca.pem is the two-CA bundle");

        let view = ca
            .activate(2_000, Duration::from_secs(60))
            .expect("activated");
        assert_eq!(view.phase, Phase::Retiring);
        assert_ne!(ca.fingerprint(), old_fp);
        let retire_at = view.authorities[0].retire_at.expect("old CA retires");
        assert_eq!(retire_at, 2_000 + 60 + RETIRE_MARGIN_SECS);
        // The server chain verifies for a client with only the old CA (cross-signed), only
        // the new one, or both.
        assert!(verifies(&chain(&ca), &old));
        assert!(verifies(&chain(&ca), &new));
        assert!(verifies(&chain(&ca), &both));
        let svid = ca
            .issue_svid(&csr(), "spiffe://td/sa/x", Duration::from_secs(60))
            .expect("svid");
        assert_eq!(issuer_cn(&svid.pem), "ztnet coordinator CA 2");

        // A restart in the middle keeps the state.
        drop(ca);
        let ca = Ca::load_or_create(dir.path()).expect("reloaded");
        assert_eq!(ca.view().phase, Phase::Retiring);
        assert_eq!(ca.bundle_der(), both);
        assert!(verifies(&chain(&ca), &old));

        assert!(ca.retire_due(retire_at - 1).expect("not yet").is_empty());
        assert_eq!(ca.retire_due(retire_at).expect("due"), vec![1]);
        assert_eq!(ca.view().phase, Phase::Steady);
        assert_eq!(ca.bundle_der(), new);
        assert!(
            !dir.path().join("ca.key").exists(),
            "the old key is deleted"
        );
        assert!(verifies(&chain(&ca), &new));
        assert!(
            !verifies(&chain(&ca), &old),
            "the old CA is trusted no more"
        );
        let reloaded = Ca::load_or_create(dir.path()).expect("reloaded after retiring");
        assert_eq!(reloaded.bundle_der(), new);
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem"),
            reloaded.ca_pem()
        );
    }

    #[test]
    fn activate_without_a_staged_ca_is_a_conflict_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("first CA");
        let before = ca.ca_pem();
        let e = ca
            .activate(1, Duration::from_secs(1))
            .expect_err("nothing staged");
        assert!(e.to_string().contains("ztnet ca rotate"), "{e}");
        assert_eq!(ca.ca_pem(), before);
        assert!(!dir.path().join(STATE_FILE).exists());
    }

    #[test]
    fn a_corrupt_state_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        Ca::load_or_create(dir.path()).expect("first CA");
        fs::write(dir.path().join(STATE_FILE), b"{\"signer\": 7, \"cas\": []}").expect("write");
        let e = Ca::load_or_create(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("ca-state.json"), "{e}");
    }
}
