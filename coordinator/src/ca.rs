//! The coordinator's certificate authority: made once in the data directory, then used to sign
//! the server certificate at every start and node certificates at enrollment and renewal.
//! Does file I/O only when loading or creating the CA.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// Lifetime of a node certificate.
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far node certificates are back-dated, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the server certificate, re-issued at every start.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of the CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA could not be loaded, or a certificate not issued.
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
}

/// The CA: its certificate and key, loaded from the data directory.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate exactly as stored in `ca.pem` (the trust bundle).
    ca_pem: String,
    ca_der: CertificateDer<'static>,
}

/// A freshly signed node certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM form.
    pub pem: String,
    /// Serial number, lowercase hex: how a session is mapped to its node.
    pub serial: String,
    /// Unix seconds after which it is no longer valid.
    pub not_after: u64,
}

/// The server's certificate chain `[leaf, CA]` and its key.
pub struct ServerIdentity {
    /// `[leaf, CA]`.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Ca {
    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`, creating both when neither exists.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => create(&cert_path, &key_path)?,
            (true, true) => {}
            _ => {
                return Err(CaError::Corrupt {
                    path: dir.display().to_string(),
                    reason: "exactly one of ca.pem and ca.key exists; restore the other".into(),
                });
            }
        }
        load(&cert_path, &key_path)
    }

    /// The CA certificate in PEM (the trust bundle handed to nodes).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// SHA-256 fingerprint of the CA certificate, as carried in join tokens.
    pub fn fingerprint(&self) -> String {
        ztnet_proto::token::fingerprint(&self.ca_der)
    }

    /// Issues a fresh server certificate for [`ztnet_proto::COORDINATOR_SERVER_NAME`].
    pub fn issue_server(&self) -> Result<ServerIdentity, CaError> {
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
        let leaf = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(ServerIdentity {
            chain: vec![leaf.der().clone(), self.ca_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Signs a node certificate for the public key in `csr_pem`: client-auth only, URI SAN =
    /// `spiffe_id`, valid from 60 s ago for 24 h. Nothing in the request but its key is used.
    pub fn issue_node(&self, csr_pem: &str, spiffe_id: &str) -> Result<IssuedCert, CaError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(CaError::BadCsr("request is over 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(format!("not a valid signed PEM request ({e})")))?;
        let uri = rcgen::Ia5String::try_from(spiffe_id.to_string())
            .map_err(|e| CaError::BadCsr(format!("spiffe id is not ASCII: {e}")))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spiffe_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + NODE_CERT_LIFETIME;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: hex::encode(serial.as_ref()),
            not_after: params_not_after(now),
        })
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
        if csr_pem.len() > 16 * 1024 {
            return Err(CaError::BadCsr("request is over 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(format!("not a valid signed PEM request ({e})")))?;
        let uri = rcgen::Ia5String::try_from(spiffe_id.to_string())
            .map_err(|e| CaError::BadCsr(format!("spiffe id is not ASCII: {e}")))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ztnet workload");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: hex::encode(serial.as_ref()),
            not_after: u64::try_from((now + lifetime).unix_timestamp()).unwrap_or(0),
        })
    }
}

/// Serial number of a DER certificate in the form [`IssuedCert::serial`] uses.
pub fn serial_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

fn params_not_after(now: OffsetDateTime) -> u64 {
    let end = now + NODE_CERT_LIFETIME;
    u64::try_from(end.unix_timestamp()).unwrap_or(0)
}

/// A positive 16-byte random serial (the top bit cleared, so DER keeps it 16 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from(bytes.to_vec())
}

fn create(cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ztnet coordinator CA");
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
    let cert = params.self_signed(&key)?;

    // Key first, so a crash between the two writes leaves a state that load() reports plainly.
    write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaError::Io { path, source }
    };
    let corrupt = |path: &Path, reason: String| CaError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    let mode = fs::metadata(key_path)
        .map_err(io(key_path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(corrupt(
            key_path,
            format!(
                "mode is {:o}; it must be readable by its owner only (0600)",
                mode & 0o777
            ),
        ));
    }
    let key_pem = fs::read_to_string(key_path).map_err(io(key_path))?;
    let ca_pem = fs::read_to_string(cert_path).map_err(io(cert_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(key_path, e.to_string()))?;

    let mut reader = ca_pem.as_bytes();
    let ca_der = rustls_pemfile::certs(&mut reader)
        .next()
        .ok_or_else(|| corrupt(cert_path, "no certificate in it".into()))?
        .map_err(|e| corrupt(cert_path, e.to_string()))?;
    let params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| corrupt(cert_path, e.to_string()))?;
    // Re-signing the parsed parameters gives an issuer with the stored subject and key; the
    // certificates it signs chain to the stored ca.pem.
    let cert = params
        .self_signed(&key)
        .map_err(|e| corrupt(key_path, format!("does not match ca.pem: {e}")))?;
    if cert.params().distinguished_name.iter().count() == 0 {
        return Err(corrupt(cert_path, "empty subject".into()));
    }
    check_key_matches(&ca_der, &key).map_err(|r| corrupt(key_path, r))?;
    Ok(Ca {
        cert,
        key,
        ca_pem,
        ca_der,
    })
}

fn check_key_matches(ca_der: &[u8], key: &KeyPair) -> Result<(), String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(ca_der)
        .map_err(|e| format!("ca.pem does not parse: {e}"))?;
    let spki = cert.public_key().subject_public_key.data.as_ref();
    if spki != key.public_key_raw() {
        return Err("the key does not belong to the certificate in ca.pem".into());
    }
    Ok(())
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
