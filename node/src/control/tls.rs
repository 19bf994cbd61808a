//! TLS for the control channel: the enrollment verifier that pins the CA by the token's
//! fingerprint, and the mutual-TLS client configuration of a session. No I/O.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use ztnet_proto::token::fingerprint;
use ztnet_proto::{CONTROL_ALPN, COORDINATOR_SERVER_NAME};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file holds no usable certificate or key.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The QUIC layer refused the configuration.
    #[error("quic tls configuration: {0}")]
    Quic(String),
}

/// A QUIC client configuration for enrollment: no client certificate; the server must present
/// a chain whose CA has `ca_fingerprint` and whose leaf chains to it for `ztnet-coordinator`.
pub fn enroll_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider.clone(),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    quic_config(tls)
}

/// A QUIC client configuration for a session: trusts `ca_pem` only and presents the node
/// certificate with its key.
pub fn session_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem, "ca.pem")? {
        roots.add(ca)?;
    }
    let chain = certs(cert_pem, "node.pem")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| pem_err("tls.key", e.to_string()))?
        .ok_or_else(|| pem_err("tls.key", "no private key in the file".into()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    quic_config(tls)
}

/// Parses the DER certificates of a PEM bundle.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(what, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(what, "no certificate in the file".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn quic_config(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Keepalives well inside the idle timeout hold NAT bindings and notice a dead coordinator.
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(20))
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn pem_err(what: &'static str, reason: String) -> TlsError {
    TlsError::Pem { what, reason }
}

/// Verifies the coordinator at enrollment, before any secret is sent: one certificate of the
/// presented chain (not the leaf) must have the token's CA fingerprint, and the leaf must chain
/// to exactly that CA (through the other certificates of the chain) for the name
/// `ztnet-coordinator`.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c.as_ref()) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not have the fingerprint in the join token \
                     (wrong coordinator address, a token from another coordinator, or a token \
                     made before a CA rotation whose old CA has since retired: make a new one)"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        let name = ServerName::try_from(COORDINATOR_SERVER_NAME)
            .map_err(|_| rustls::Error::General("invalid fixed server name".into()))?;
        // During a CA rotation the chain also holds the next CA cross-signed by this one, so
        // a token made before the rotation still pins a CA the leaf chains to.
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| c.as_ref() != ca.as_ref())
            .cloned()
            .collect();
        inner.verify_server_cert(end_entity, &others, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
