//! The admin API client: HTTPS with rustls trusting exactly the coordinator's CA and checking
//! the certificate against the name `ztnet-coordinator`, whatever address was dialled.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use ztnet_proto::COORDINATOR_SERVER_NAME;
use ztnet_proto::admin::ApiError;

use crate::config::Resolved;

/// A refusal from the coordinator, kept whole so the caller can render its diagnostics.
#[derive(Debug)]
pub struct ApiFailure(pub ApiError);

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coordinator refused: {}", self.0)
    }
}

impl std::error::Error for ApiFailure {}

/// A connection to the admin API.
pub struct ApiClient {
    http: Client,
    base: String,
    api_key: zeroize::Zeroizing<String>,
    ca_path: PathBuf,
    stale_ca: Arc<AtomicBool>,
    warned: AtomicBool,
}

impl ApiClient {
    /// Builds the client; nothing is dialled yet.
    pub fn new(config: &Resolved) -> Result<ApiClient> {
        let (tls, stale_ca) = tls_config(&config.ca_pem)
            .with_context(|| format!("CA certificate {}", config.ca_path.display()))?;
        let http = Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ztnet/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTPS client")?;
        Ok(ApiClient {
            http,
            base: format!("https://{}", config.coordinator),
            api_key: config.api_key.clone(),
            ca_path: config.ca_path.clone(),
            stale_ca,
            warned: AtomicBool::new(false),
        })
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(Method::GET, path))
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::POST, path).json(body))
    }

    /// `PUT path` with a JSON body.
    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::PUT, path).json(body))
    }

    /// `PATCH path` with a JSON body.
    pub fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::PATCH, path).json(body))
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(Method::DELETE, path))
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.api_key.as_str())
    }

    fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = req
            .send()
            .map_err(|e| anyhow!("{}", describe_transport_error(&e)))
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        let status = resp.status();
        let body = resp.bytes().context("reading the coordinator's answer")?;
        self.warn_stale_ca();
        if !status.is_success() {
            let err = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(300)
                    .collect(),
                diagnostics: Vec::new(),
            });
            return Err(ApiFailure(err).into());
        }
        serde_json::from_slice(&body).with_context(|| {
            format!("the coordinator's answer ({status}) is not what this ztnet expects")
        })
    }
}

impl ApiClient {
    /// Says once, on stderr, that the pinned `ca.pem` lacks the CA that signs now.
    fn warn_stale_ca(&self) {
        if self.stale_ca.load(Ordering::Relaxed) && !self.warned.swap(true, Ordering::Relaxed) {
            crate::output::noteln!(
                "warning: {} does not hold the CA that now signs the coordinator's certificate \
                 (a CA rotation is under way); it keeps working only until the old CA retires \
                 (`ztnet ca status` says when). Refresh it now: ztnet ca bundle --file {}",
                self.ca_path.display(),
                self.ca_path.display()
            );
        }
    }
}

/// Parses a PEM bundle of CA certificates.
pub fn parse_ca(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .context("not a PEM certificate file")?;
    if certs.is_empty() {
        bail!("no certificate in the file (expected the coordinator's ca.pem)");
    }
    Ok(certs)
}

/// A rustls client config that trusts exactly `ca_pem` and verifies the server as
/// `ztnet-coordinator`, with a flag that is set when the server's chain verified only through
/// an intermediate: the leaf is signed by a CA that `ca_pem` lacks, cross-signed by one it
/// holds (the coordinator is in the middle of a CA rotation).
fn tls_config(ca_pem: &[u8]) -> Result<(rustls::ClientConfig, Arc<AtomicBool>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in parse_ca(ca_pem)? {
        roots
            .add(cert)
            .context("the CA certificate is not usable as a trust anchor")?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the certificate verifier")?;
    let stale = Arc::new(AtomicBool::new(false));
    let verifier = Arc::new(FixedNameVerifier {
        inner,
        stale: stale.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((config, stale))
}

/// Checks the chain with webpki as usual, but always against the coordinator's fixed name:
/// operators dial an IP address or any DNS name, and the coordinator's certificate names
/// `ztnet-coordinator`. Trust still comes only from the configured CA.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    stale: Arc<AtomicBool>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(COORDINATOR_SERVER_NAME)
            .map_err(|_| rustls::Error::General("invalid fixed server name".into()))?;
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        if !intermediates.is_empty()
            && self
                .inner
                .verify_server_cert(end_entity, &[], &name, ocsp_response, now)
                .is_err()
        {
            self.stale.store(true, Ordering::Relaxed);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Turns reqwest's nested error into one readable clause, naming certificate problems plainly.
fn describe_transport_error(e: &reqwest::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    let all = parts.join(": ");
    if all.contains("UnknownIssuer") || all.contains("invalid peer certificate") {
        return format!(
            "{all} (the coordinator's certificate does not chain to the configured CA: \
             is --ca-cert the ca.pem of this coordinator? If its CA was rotated and the old \
             one has retired, copy its current DATA_DIR/ca.pem again)"
        );
    }
    all
}
