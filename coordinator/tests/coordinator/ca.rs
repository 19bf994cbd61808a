//! CA rotation against the real binary: staging pushes the two-CA bundle in the netmap, the
//! switch waits for every active node (an offline one is named, and connects when it comes
//! back), the new CA then signs the server certificate and renewals while clients that trust
//! only the old CA still connect, and the old CA leaves the bundle once what it signed has
//! expired. Node certificates live 60 s here so that the retirement comes within the test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use ztnet_proto::control::{NetmapUpdate, NodeMsg, ServerMsg};
use ztnet_proto::frame;

use crate::common::{Api, Coord, Session, TestNode, start_env};

/// Long enough for the 65 s retirement, with room for a loaded machine.
const RETIRE_DEADLINE: Duration = Duration::from_secs(150);

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.expect("PEM certificate"))
        .collect()
}

fn issuer_cn(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    cert.issuer()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .expect("issuer CN")
        .to_string()
}

/// A QUIC handshake with the coordinator as a client trusting exactly `roots`; returns the
/// server's chain, or the handshake error.
async fn handshake(
    coord: &Coord,
    roots: &[CertificateDer<'static>],
    identity: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        Vec<CertificateDer<'static>>,
    ),
    String,
> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store);
    let mut tls = match identity {
        Some((c, k)) => builder.with_client_auth_cert(c, k).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ztnet_proto::CONTROL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(coord.addr, ztnet_proto::COORDINATOR_SERVER_NAME)
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let chain = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default();
    Ok((endpoint, conn, chain))
}

async fn status(api: &Api) -> Value {
    api.ok("GET", "/v1/ca", None).await
}

/// Polls the CA status until `done` holds, or panics with the last status.
async fn until(api: &Api, what: &str, deadline: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + deadline;
    loop {
        let s = status(api).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; last status: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pending(s: &Value) -> Vec<String> {
    s["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect()
}

/// The next netmap on a session whose bundle differs from `than`, skipping other messages.
async fn next_bundle(s: &mut Session, than: &str) -> (u64, String) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < end, "no netmap with a new bundle");
        let (version, bundle) = match s.next().await {
            ServerMsg::Netmap(NetmapUpdate::Full(n)) => (n.version.0, n.bundle_pem),
            ServerMsg::Netmap(NetmapUpdate::Delta(d)) => (d.version.0, d.bundle_pem),
            _ => continue,
        };
        s.ack(version).await;
        if let Some(b) = bundle.filter(|b| b != than) {
            return (version, b);
        }
    }
}

#[tokio::test]
async fn ca_rotation_waits_for_every_node_keeps_old_clients_working_and_retires_the_old_ca() {
    let dir = tempfile::tempdir().unwrap();
    let coord = start_env(dir.path(), &[("ZTNET_NODE_CERT_LIFETIME_SECS", "60")]);
    let api = coord.api();
    api.network("rot").await;
    let (t1, _) = api.token("rot", "prod", &["web"], 1).await;
    let (t2, _) = api.token("rot", "prod", &["db"], 1).await;
    let old_token = ztnet_proto::JoinToken::parse(&t1).unwrap();
    let mut n1 = TestNode::new("n1", 51820);
    let mut n2 = TestNode::new("n2", 51821);
    n1.enroll(&coord, &t1).await;
    n2.enroll(&coord, &t2).await;
    let old_ca = certs(&coord.ca_pem);
    assert_eq!(old_ca.len(), 1);

    let s = status(&api).await;
    assert_eq!(s["phase"], "steady", "{s}");
    let mut s1 = n1.connect(&coord).await;
    let full = s1.full().await;
    assert_eq!(full.bundle_pem.as_deref(), Some(coord.ca_pem.as_str()));
    s1.ack(full.version.0).await;

    // Stage: the two-CA bundle goes to n1 at once; n2 is offline and named.
    let s = api.ok("POST", "/v1/ca/rotate", Some(json!({}))).await;
    assert_eq!(s["phase"], "staged", "{s}");
    let (_, bundle) = next_bundle(&mut s1, &coord.ca_pem).await;
    let both = certs(&bundle);
    assert_eq!(both.len(), 2, "the bundle holds the old and the new CA");
    assert_eq!(both[0], old_ca[0], "the old CA stays first");
    let new_ca = vec![both[1].clone()];
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        bundle,
        "the data directory's ca.pem is the bundle"
    );
    let s = until(&api, "only n2 pending", Duration::from_secs(20), |s| {
        pending(s) == ["n2"]
    })
    .await;
    assert_eq!(s["pending"][0]["online"], false, "{s}");
    assert!(
        s["summary"].as_str().unwrap().contains("rot/n2 (offline)"),
        "{s}"
    );
    let (code, body) = api.call("POST", "/v1/ca/rotate", Some(json!({}))).await;
    assert_eq!(
        code, 409,
        "a second rotation is refused while one runs: {body}"
    );
    let (code, body) = api.call("POST", "/v1/ca/activate", Some(json!({}))).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("n2"), "{body}");
    // Nothing is signed by the new CA yet: a client trusting only it is refused.
    assert!(handshake(&coord, &new_ca, None).await.is_err());

    // n2 comes back with its old certificate: it connects, gets the bundle and acknowledges;
    // then the coordinator switches by itself.
    let mut s2 = n2.connect(&coord).await;
    let full2 = s2.full().await;
    assert_eq!(full2.bundle_pem.as_deref(), Some(bundle.as_str()));
    s2.ack(full2.version.0).await;
    let s = until(&api, "the new CA signing", Duration::from_secs(20), |s| {
        s["phase"] == "retiring"
    })
    .await;
    let roles: Vec<&str> = s["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["retiring", "signing"], "{s}");

    // The server certificate is the new CA's; clients with only the old CA, only the new one,
    // or both, all verify it.
    for (what, roots) in [("old", &old_ca), ("new", &new_ca), ("both", &both)] {
        let (_e, conn, chain) = handshake(&coord, roots, None)
            .await
            .unwrap_or_else(|e| panic!("a client trusting the {what} CA is refused: {e}"));
        assert_eq!(issuer_cn(&chain[0]), "ztnet coordinator CA 2");
        conn.close(0u32.into(), b"done");
    }
    // The admin API too, with the operator's old ca.pem.
    let old_api = Api::new(coord.addr, &coord.ca_pem, Some(coord.api_key.clone()));
    old_api.ok("GET", "/v1/ca", None).await;
    // New tokens pin the new CA; the old token still names a CA in the served chain.
    let (t3, _) = api.token("rot", "prod", &["web"], 1).await;
    let new_fp = ztnet_proto::token::fingerprint(&new_ca[0]);
    assert_eq!(
        ztnet_proto::JoinToken::parse(&t3).unwrap().ca_fingerprint,
        new_fp
    );
    let (_e, _c, chain) = handshake(&coord, &old_ca, None).await.unwrap();
    let fps: Vec<String> = chain
        .iter()
        .map(|c| ztnet_proto::token::fingerprint(c))
        .collect();
    assert!(
        fps.contains(&old_token.ca_fingerprint),
        "old token's CA is in the chain"
    );
    assert!(fps.contains(&new_fp), "new token's CA is in the chain");

    // n2's certificate from the old CA is still accepted (a fresh session), and a renewal is
    // signed by the new CA and comes with the bundle.
    let mut again = n2.connect(&coord).await;
    again.full().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    frame::write(&mut s1.send, &NodeMsg::Renew { csr_pem: csr })
        .await
        .unwrap();
    let (cert_pem, ca_pem) = loop {
        match s1.next().await {
            ServerMsg::Renewed { cert_pem, ca_pem } => break (cert_pem, ca_pem),
            ServerMsg::Netmap(_) => continue,
            other => panic!("expected a renewal, got {other:?}"),
        }
    };
    assert_eq!(issuer_cn(&certs(&cert_pem)[0]), "ztnet coordinator CA 2");
    assert_eq!(ca_pem, bundle);
    let renewed = (
        certs(&cert_pem),
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    );
    let (_e, conn, _) = handshake(&coord, &new_ca, Some(renewed))
        .await
        .expect("a node certificate of the new CA is accepted");
    conn.close(0u32.into(), b"done");

    // Retirement: 60 s node certificates + 5 s after the switch, the old CA leaves the
    // bundle, the netmaps carry the new one, and its key is deleted. The phase turns steady a
    // moment before the audit entry is committed (the coordinator records the retirement
    // right after making it), so the wait is for both.
    let s = until(
        &api,
        "the old CA retired and audited",
        RETIRE_DEADLINE,
        |s| {
            s["phase"] == "steady"
                && s["history"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|e| e["action"] == "ca.retire"))
        },
    )
    .await;
    assert_eq!(s["authorities"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(certs(s["bundle_pem"].as_str().unwrap()), new_ca);
    let (_, last) = next_bundle(&mut s1, &bundle).await;
    assert_eq!(certs(&last), new_ca, "n1 is told the one-CA bundle");
    assert!(
        !dir.path().join("ca.key").exists(),
        "the old CA key is deleted"
    );
    assert!(
        handshake(&coord, &old_ca, None).await.is_err(),
        "the old CA alone is trusted no more"
    );
    let actions: Vec<&str> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["ca.stage", "ca.activate", "ca.retire"], "{s}");
    assert_eq!(s["history"][1]["actor"], "coordinator", "{s}");
    drop(s2);
    coord.stop();
}

#[tokio::test]
async fn a_restart_mid_rotation_keeps_the_staged_ca_and_forced_activation_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let coord = start_env(dir.path(), &[]);
    let api = coord.api();
    api.network("rs").await;
    let (t, _) = api.token("rs", "prod", &["web"], 1).await;
    let mut n = TestNode::new("n", 51830);
    n.enroll(&coord, &t).await;
    let staged = api.ok("POST", "/v1/ca/rotate", Some(json!({}))).await;
    assert_eq!(pending(&staged), ["n"], "{staged}");
    let before = staged["authorities"].clone();
    let key = coord.api_key.clone();
    coord.stop();

    let coord = start_env(dir.path(), &[]);
    assert_eq!(coord.api_key, key);
    let api = coord.api();
    let s = status(&api).await;
    assert_eq!(s["phase"], "staged", "{s}");
    assert_eq!(
        s["authorities"], before,
        "the same two CAs after the restart"
    );
    assert_eq!(certs(&coord.ca_pem).len(), 2, "ca.pem holds both");

    let s = api
        .ok("POST", "/v1/ca/activate", Some(json!({"force": true})))
        .await;
    assert_eq!(s["phase"], "retiring", "{s}");
    let detail = s["history"][1]["detail"].as_str().unwrap();
    assert!(detail.contains("(forced)"), "{detail}");
    // The node that never saw the bundle still connects with its old certificate and its
    // old ca.pem (the first CA only): the chain carries the cross-signed new CA.
    let old_only = vec![certs(&coord.ca_pem)[0].clone()];
    let (_e, conn, _) = handshake(&coord, &old_only, Some(n.identity()))
        .await
        .expect("the lagging node connects");
    conn.close(0u32.into(), b"done");
    coord.stop();
}
