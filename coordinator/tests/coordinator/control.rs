//! Enrollment and sessions over QUIC: tokens enforced atomically, refusals that store nothing,
//! certificates that map to their node.

use serde_json::json;
use ztnet_proto::control::{NetmapUpdate, NodeMsg, ServerMsg};

use crate::common::{Session, TestNode, send_first, start};

fn code(msg: &ServerMsg) -> String {
    match msg {
        ServerMsg::Error(e) => e.code.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn message(msg: &ServerMsg) -> String {
    match msg {
        ServerMsg::Error(e) => e.message.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn enrollment_issues_addresses_and_a_spiffe_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, id) = api.token("prod-vpc", "production", &["web"], 2).await;

    let mut web1 = TestNode::new("web1", 51820);
    let r = web1.enroll(&coord, &token).await;
    assert_eq!(r.spiffe_id, "spiffe://corp.example/ns/production/node/web1");
    assert_eq!(r.network, "prod-vpc");
    assert_eq!(r.addresses[0].to_string(), "100.64.0.1/16");
    assert!(
        r.addresses[1].to_string().ends_with("::1/64"),
        "{:?}",
        r.addresses
    );
    assert_eq!(r.ca_pem, coord.ca_pem);

    let der = web1.identity().0.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains("spiffe://corp.example/ns/production/node/web1"));
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 60, "24 h, back-dated 60 s");

    let mut web2 = TestNode::new("web2", 51821);
    let r2 = web2.enroll(&coord, &token).await;
    assert_eq!(r2.addresses[0].to_string(), "100.64.0.2/16");

    let nodes = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    let n = &nodes[0];
    assert_eq!(n["name"], "web1");
    assert_eq!(n["tags"], json!(["web"]));
    assert_eq!(n["public_key"], web1.public_key().to_base64());
    assert_eq!(n["endpoints"], json!(["127.0.0.1:51820", "10.1.2.3:51820"]));
    // A zero-trust network: the key's age and expiry are shown, 24 h by default.
    let made = n["key_created_at"].as_u64().expect("key_created_at");
    assert!(made > 0, "{n}");
    assert_eq!(n["key_expires_at"].as_u64(), Some(made + 24 * 3600), "{n}");
    let tokens = api.ok("GET", "/v1/networks/prod-vpc/tokens", None).await;
    assert_eq!(tokens[0]["id"], id);
    assert_eq!(tokens[0]["uses_left"], 0);
    assert_eq!(tokens[0]["used_by"], json!(["web1", "web2"]));
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let enrolls: Vec<_> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.enroll")
        .map(|e| e["actor"].clone())
        .collect();
    assert_eq!(enrolls, vec![json!("node:web1"), json!("node:web2")]);
    let secret = ztnet_proto::JoinToken::parse(&token).unwrap().secret;
    assert!(
        !coord.log().contains(&secret),
        "the token secret was logged"
    );
    assert!(!audit.to_string().contains(&secret));
}

#[tokio::test]
async fn two_concurrent_enrollments_on_a_one_use_token_admit_exactly_one() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;

    for round in 0..3 {
        let (token, _) = api.token("prod-vpc", "production", &[], 1).await;
        let a = TestNode::new(&format!("a{round}"), 51820);
        let b = TestNode::new(&format!("b{round}"), 51820);
        let ma = serde_json::to_value(NodeMsg::Enroll(a.enroll_request(&token))).unwrap();
        let mb = serde_json::to_value(NodeMsg::Enroll(b.enroll_request(&token))).unwrap();
        let (ra, rb) = tokio::join!(send_first(&coord, None, &ma), send_first(&coord, None, &mb));
        let won = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, ServerMsg::Enrolled(_)))
            .count();
        assert_eq!(won, 1, "round {round}: {ra:?} / {rb:?}");
        let lost = if matches!(ra, ServerMsg::Enrolled(_)) {
            &rb
        } else {
            &ra
        };
        assert_eq!(code(lost), "token-used-up");
    }
    let nodes = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 3);
    let mut addrs: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["addresses"][0].as_str().unwrap().to_string())
        .collect();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "an address was issued twice: {addrs:?}");
}

#[tokio::test]
async fn expired_revoked_and_unknown_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;

    let created = api
        .ok(
            "POST",
            "/v1/networks/prod-vpc/tokens",
            Some(json!({"namespace": "ns", "tags": [], "uses": 5, "ttl_secs": 1})),
        )
        .await;
    let short = created["token"].as_str().unwrap().to_string();
    let expires_at = created["info"]["expires_at"].as_u64().unwrap();
    crate::common::eventually("the token's expiry to pass", || async {
        (ztnet_coordinator::store::unix_now() > expires_at).then_some(())
    })
    .await;
    let mut n = TestNode::new("late", 51820);
    let req = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&short))).unwrap();
    assert_eq!(code(&send_first(&coord, None, &req).await), "token-expired");

    let (token, id) = api.token("prod-vpc", "ns", &[], 5).await;
    api.ok(
        "DELETE",
        &format!("/v1/networks/prod-vpc/tokens/{id}"),
        None,
    )
    .await;
    let req = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&token))).unwrap();
    assert_eq!(code(&send_first(&coord, None, &req).await), "token-invalid");

    let forged = ztnet_proto::JoinToken::generate(coord.addr.to_string(), "ab".repeat(32));
    let req = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&forged.encode()))).unwrap();
    assert_eq!(code(&send_first(&coord, None, &req).await), "token-invalid");

    let nodes = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    assert_eq!(nodes, json!([]));
    let (ok_token, _) = api.token("prod-vpc", "ns", &[], 1).await;
    n.enroll(&coord, &ok_token).await;
}

#[tokio::test]
async fn bad_key_bad_csr_and_taken_names_are_refused_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &["db"], 10).await;
    let mut db1 = TestNode::new("db1", 51820);
    db1.enroll(&coord, &token).await;

    // FC-31: keys that look like base64 but are not a canonical 32-byte key.
    let good = "YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GI=".to_string();
    assert!(ztnet_proto::WgKey::parse(&good).is_ok());
    let bad_keys = [
        good[..43].to_string(),
        format!("{good}A"),
        format!("\"{good}\""),
        format!("{good}\r\n"),
        good.replace('+', "-").replace('/', "_"),
        "A".repeat(43) + "=",
        "00".repeat(32),
        String::new(),
    ];
    for (i, key) in bad_keys.iter().enumerate() {
        let n = TestNode::new(&format!("k{i}"), 51820);
        let mut msg = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&token))).unwrap();
        msg["wg_public_key"] = json!(key);
        let answer = send_first(&coord, None, &msg).await;
        assert_eq!(code(&answer), "bad-request", "key {key:?}");
        assert!(message(&answer).contains("key"), "{}", message(&answer));
    }
    // 'I' -> 'J' at position 43 sets a padding bit: lax decoders accept it, we do not.
    let noncanonical = format!("{}J=", &good[..42]);
    let n = TestNode::new("kx", 51820);
    let mut msg = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&token))).unwrap();
    msg["wg_public_key"] = json!(noncanonical);
    let answer = send_first(&coord, None, &msg).await;
    assert_eq!(code(&answer), "bad-request");
    assert!(
        message(&answer).contains("canonical"),
        "{}",
        message(&answer)
    );

    let n = TestNode::new("csr1", 51820);
    let mut req = n.enroll_request(&token);
    req.csr_pem =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let answer = send_first(
        &coord,
        None,
        &serde_json::to_value(NodeMsg::Enroll(req)).unwrap(),
    )
    .await;
    assert_eq!(code(&answer), "bad-request");
    assert!(
        message(&answer).contains("certificate request"),
        "{}",
        message(&answer)
    );

    // A CSR whose signature does not match its key.
    let mut req = n.enroll_request(&token);
    let other = TestNode::new("other", 1).csr();
    req.csr_pem = tamper(&other);
    let answer = send_first(
        &coord,
        None,
        &serde_json::to_value(NodeMsg::Enroll(req)).unwrap(),
    )
    .await;
    assert_eq!(code(&answer), "bad-request");

    for name in ["DB1", "db1", "Caf\u{e9}", "Cafe\u{301}", "-x", "a.b", ""] {
        let n = TestNode::new(name, 51820);
        let req = serde_json::to_value(NodeMsg::Enroll(n.enroll_request(&token))).unwrap();
        let answer = send_first(&coord, None, &req).await;
        let expected = if name.eq_ignore_ascii_case("db1") {
            "name-taken"
        } else {
            "bad-request"
        };
        assert_eq!(
            code(&answer),
            expected,
            "name {name:?}: {}",
            message(&answer)
        );
    }

    // The same WireGuard key under a second name would give two peers one key.
    let mut dup = TestNode::new("db2", 51820);
    dup.wg = db1.wg.clone();
    let req = serde_json::to_value(NodeMsg::Enroll(dup.enroll_request(&token))).unwrap();
    assert_eq!(code(&send_first(&coord, None, &req).await), "bad-request");

    let nodes = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    let tokens = api.ok("GET", "/v1/networks/prod-vpc/tokens", None).await;
    assert_eq!(
        tokens[0]["uses_left"], 9,
        "a refused enrollment used the token"
    );
    let mut ok = TestNode::new("db2", 51820);
    let r = ok.enroll(&coord, &token).await;
    assert_eq!(
        r.addresses[0].to_string(),
        "100.64.0.2/16",
        "a refusal used an address"
    );
}

/// Flips one byte inside the signature of a PEM CSR.
fn tamper(pem: &str) -> String {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x55;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
}

#[tokio::test]
async fn sessions_need_a_certificate_of_an_active_node() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &[], 2).await;

    let mut anon = Session::open(&coord, None, 51820).await;
    assert_eq!(code(&anon.next().await), "unknown-node");

    let mut n = TestNode::new("n1", 51820);
    n.enroll(&coord, &token).await;
    let mut s = n.connect(&coord).await;
    let full = s.full().await;
    assert_eq!(full.node.name, "n1");
    assert_eq!(full.version.0, 1);
    assert!(full.peers.is_empty(), "no policy: nobody learns any peer");

    api.ok("DELETE", "/v1/networks/prod-vpc/nodes/n1", None)
        .await;
    assert_eq!(code(&s.next().await), "revoked");
    let mut again = n.connect(&coord).await;
    assert_eq!(code(&again.next().await), "revoked");
    let (status, _) = api.get("/v1/networks/prod-vpc/nodes/n1").await;
    assert_eq!(status, 404);

    // The name is free again, but the old certificate stays refused.
    let mut n2 = TestNode::new("n1", 51820);
    let r = n2.enroll(&coord, &token).await;
    assert_eq!(
        r.addresses[0].to_string(),
        "100.64.0.2/16",
        "a deleted node's address came back"
    );
    let mut old = n.connect(&coord).await;
    assert_eq!(code(&old.next().await), "revoked");
    let mut fresh = n2.connect(&coord).await;
    assert_eq!(fresh.full().await.node.name, "n1");
}

#[tokio::test]
async fn renewal_issues_a_certificate_that_opens_a_session() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &[], 1).await;
    let mut n = TestNode::new("n1", 51820);
    n.enroll(&coord, &token).await;
    let mut s = n.connect(&coord).await;
    s.full().await;

    n.tls_key = rcgen::KeyPair::generate().unwrap();
    s.send(&NodeMsg::Renew { csr_pem: n.csr() }).await;
    let cert = match s.next().await {
        ServerMsg::Renewed { cert_pem, ca_pem } => {
            assert_eq!(ca_pem, coord.ca_pem);
            cert_pem
        }
        other => panic!("expected Renewed, got {other:?}"),
    };
    assert_ne!(Some(&cert), n.cert_pem.as_ref());
    n.cert_pem = Some(cert);
    let mut s2 = n.connect(&coord).await;
    assert!(matches!(
        s2.next().await,
        ServerMsg::Netmap(NetmapUpdate::Full(_))
    ));
}
