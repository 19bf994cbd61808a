//! FC-22 on the control channel: a node certificate that expired (the machine was off longer
//! than its life) opens a renewal-only session for an active node within the renewal window:
//! no netmap, `Renew` answered and audited, anything else refused. A revoked node's expired
//! certificate, and one expired beyond the window, are refused with their reason, and so is one
//! with the node's serial but another key than the node's TLS key on record (issue 5). A node
//! with no key on record (enrolled before keys were recorded) renews on its serial, with a
//! warning, and its renewal records its key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ztnet_proto::control::{NodeMsg, ServerMsg};

use crate::common::{Coord, DEADLINE, TestNode, start_env};

fn refusal(msg: &ServerMsg) -> (String, String) {
    match msg {
        ServerMsg::Error(e) => (e.code.clone(), e.message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Replaces the node's certificate with one like it (same key, serial, SAN and usages,
/// signed by the coordinator's CA) that expired `ago` ago.
fn expire(coord: &Coord, node: &mut TestNode, ago: Duration) {
    let key = KeyPair::from_pem(&node.tls_key.serialize_pem()).unwrap();
    expire_for(coord, node, ago, key);
}

/// [`expire`], but for `key` instead of the node's own: a certificate with the node's serial,
/// SAN and usages, signed by the coordinator's CA, for a key that is not the one on record.
/// The node then holds `key`, so that the TLS handshake itself succeeds.
fn expire_for(coord: &Coord, node: &mut TestNode, ago: Duration, key: KeyPair) {
    let der = node.identity().0.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let serial = cert.raw_serial().to_vec();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap();

    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(coord.dir.join("ca.key")).unwrap()).unwrap();
    let issuer = CertificateParams::from_ca_cert_pem(&coord.ca_pem)
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, uri.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(2 * 86_400);
    params.not_after = now - ago;
    params.serial_number = Some(SerialNumber::from(serial));
    let cert = params.signed_by(&key, &issuer, &ca_key).unwrap();
    node.tls_key = key;
    node.cert_pem = Some(cert.pem());
}

/// A CSR for a fresh key; returns both.
fn fresh_csr() -> (KeyPair, String) {
    let fresh = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&fresh)
        .unwrap()
        .pem()
        .unwrap();
    (fresh, csr)
}

async fn clear_key_on_record(coord: &Coord, name: &str) {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(coord.dir.join("coordinator.db"));
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query("UPDATE nodes SET tls_spki_sha256 = NULL WHERE name = ?")
        .bind(name)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

async fn key_on_record(coord: &Coord, name: &str) -> Option<String> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(coord.dir.join("coordinator.db"));
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let (key,): (Option<String>,) =
        sqlx::query_as("SELECT tls_spki_sha256 FROM nodes WHERE name = ?")
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    key
}

/// The lowercase hex SHA-256 of the SubjectPublicKeyInfo of a PEM certificate, computed here
/// with openssl, not with the coordinator's code.
fn spki_sha256(cert_pem: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let run = |args: &[&str], input: &[u8]| {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?}");
        out.stdout
    };
    let spki = run(&["x509", "-noout", "-pubkey"], cert_pem.as_bytes());
    let der = run(&["pkey", "-pubin", "-outform", "DER"], &spki);
    let digest = run(&["dgst", "-sha256", "-r"], &der);
    String::from_utf8(digest).unwrap()[..64].to_string()
}

#[tokio::test]
async fn an_expired_certificate_renews_only_for_the_key_on_record() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start_env(tmp.path(), &[("ZTNET_EXPIRED_RENEW_GRACE_SECS", "7200")]);
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &["web"], 3).await;
    let mut web1 = TestNode::new("web1", 51820);
    web1.enroll(&coord, &token).await;
    let mut web2 = TestNode::new("web2", 51821);
    web2.enroll(&coord, &token).await;
    let enrolled = web1.cert_pem.clone().unwrap();
    assert_eq!(
        key_on_record(&coord, "web1").await.as_deref(),
        Some(spki_sha256(&enrolled).as_str()),
        "enrollment records the key of the certificate it issued"
    );

    // web1's serial, the coordinator's CA, but another key: refused, nothing renewed.
    expire_for(
        &coord,
        &mut web1,
        Duration::from_secs(3600),
        KeyPair::generate().unwrap(),
    );
    let mut s = web1.connect(&coord).await;
    let (_, csr) = fresh_csr();
    s.send(&NodeMsg::Renew { csr_pem: csr }).await;
    let (code, message) = refusal(&s.next().await);
    assert_eq!(code, "cert-key-mismatch", "{message}");
    assert!(
        message.contains("web1") && message.contains("not for the TLS key on record"),
        "{message}"
    );
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    assert!(
        !audit.to_string().contains("node.cert-renew-expired"),
        "a refused renewal was audited as done: {audit}"
    );

    // web2 with its own key: the normal renewal, and the new key is on record from then on.
    let (old_key, old_cert) = (web2.tls_key.serialize_pem(), web2.cert_pem.clone());
    expire(&coord, &mut web2, Duration::from_secs(3600));
    let mut s = web2.connect(&coord).await;
    let (fresh, csr) = fresh_csr();
    s.send(&NodeMsg::Renew { csr_pem: csr }).await;
    let ServerMsg::Renewed { cert_pem, .. } = s.next().await else {
        panic!("the key on record renews");
    };
    assert_eq!(
        key_on_record(&coord, "web2").await.as_deref(),
        Some(spki_sha256(&cert_pem).as_str()),
        "the renewal records the new key"
    );
    let renewed = (fresh, cert_pem);

    // The key it renewed away from no longer renews, though its serial is still on record.
    web2.cert_pem = old_cert;
    let old = KeyPair::from_pem(&old_key).unwrap();
    expire_for(&coord, &mut web2, Duration::from_secs(3600), old);
    let mut s = web2.connect(&coord).await;
    s.send(&NodeMsg::Renew {
        csr_pem: fresh_csr().1,
    })
    .await;
    assert_eq!(refusal(&s.next().await).0, "cert-key-mismatch");
    (web2.tls_key, web2.cert_pem) = (renewed.0, Some(renewed.1));
    web2.connect(&coord).await.full().await;

    // No key on record (enrolled before keys were recorded): renewed on its serial, with a
    // warning naming the node, and its new key is on record from then on.
    let mut web3 = TestNode::new("web3", 51822);
    web3.enroll(&coord, &token).await;
    clear_key_on_record(&coord, "web3").await;
    expire(&coord, &mut web3, Duration::from_secs(3600));
    let mut s = web3.connect(&coord).await;
    s.send(&NodeMsg::Renew {
        csr_pem: fresh_csr().1,
    })
    .await;
    let ServerMsg::Renewed { cert_pem, .. } = s.next().await else {
        panic!("a node without a key on record renews on its serial");
    };
    assert_eq!(
        key_on_record(&coord, "web3").await.as_deref(),
        Some(spki_sha256(&cert_pem).as_str())
    );
    let log = coord.log();
    assert!(
        log.contains("node web3 has no TLS key on record"),
        "the fallback is not warned about: {log}"
    );

    // A node without a key on record that connects with a valid certificate gets it recorded.
    clear_key_on_record(&coord, "web2").await;
    web2.connect(&coord).await.full().await;
    assert_eq!(
        key_on_record(&coord, "web2").await.as_deref(),
        web2.cert_pem.as_deref().map(spki_sha256).as_deref()
    );

    assert!(
        log.contains("expired node certificate refused"),
        "the refusal is logged: {log}"
    );
    assert!(!log.contains("BEGIN"), "key material in the log");
}

async fn end_of_stream(s: &mut crate::common::Session) -> bool {
    let read = ztnet_proto::frame::read::<_, ServerMsg>(&mut s.recv);
    match tokio::time::timeout(DEADLINE, read).await {
        Ok(Ok(None)) | Ok(Err(_)) => true,
        Ok(Ok(Some(m))) => panic!("a renewal-only session got {m:?}"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn an_expired_certificate_may_only_renew_and_not_when_revoked_or_too_old() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start_env(tmp.path(), &[("ZTNET_EXPIRED_RENEW_GRACE_SECS", "7200")]);
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &["web"], 3).await;
    let mut web1 = TestNode::new("web1", 51820);
    web1.enroll(&coord, &token).await;
    let mut web2 = TestNode::new("web2", 51821);
    web2.enroll(&coord, &token).await;
    let mut web3 = TestNode::new("web3", 51822);
    web3.enroll(&coord, &token).await;

    // Within the window: anything but Renew is refused, and no netmap comes first.
    expire(&coord, &mut web1, Duration::from_secs(3600));
    let mut s = web1.connect(&coord).await;
    s.send(&NodeMsg::Ack {
        version: ztnet_proto::control::NetmapVersion(1),
    })
    .await;
    let (code, message) = refusal(&s.next().await);
    assert_eq!(code, "renewal-only", "{message}");
    assert!(
        message.contains("expired at") && message.contains("ack"),
        "{message}"
    );
    let listed = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    assert_eq!(listed[0]["name"], "web1");
    assert_eq!(listed[0]["online"], false, "{listed}");

    // Renew is answered with a valid certificate for the key sent, then the session ends.
    let mut s = web1.connect(&coord).await;
    let fresh = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&fresh)
        .unwrap()
        .pem()
        .unwrap();
    s.send(&NodeMsg::Renew { csr_pem: csr }).await;
    let ServerMsg::Renewed { cert_pem, ca_pem } = s.next().await else {
        panic!("expected the renewed certificate first");
    };
    assert_eq!(ca_pem, coord.ca_pem);
    assert!(
        end_of_stream(&mut s).await,
        "the renewal-only session stayed open"
    );
    let mut r = cert_pem.as_bytes();
    let der = rustls_pemfile::certs(&mut r).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(cert.validity().not_after.timestamp() > now + 3600);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        fresh.public_key_raw()
    );
    // With it, a normal session with its netmap.
    web1.tls_key = fresh;
    web1.cert_pem = Some(cert_pem);
    let mut s = web1.connect(&coord).await;
    s.full().await;
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let text = audit.to_string();
    assert!(
        text.contains("node.cert-renew-expired") && text.contains("web1"),
        "{text}"
    );

    // Revoked: its expired certificate is refused with the reason, and renews nothing.
    expire(&coord, &mut web2, Duration::from_secs(3600));
    api.ok(
        "POST",
        "/v1/networks/prod-vpc/nodes/web2/revoke",
        Some(serde_json::json!({"reason": "laptop lost"})),
    )
    .await;
    let mut s = web2.connect(&coord).await;
    s.send(&NodeMsg::Renew {
        csr_pem: web2.csr(),
    })
    .await;
    let (code, message) = refusal(&s.next().await);
    assert_eq!(code, "revoked");
    assert!(message.contains("laptop lost"), "{message}");

    // Beyond the window (2 h here): refused in plain words.
    expire(&coord, &mut web3, Duration::from_secs(3 * 3600));
    let mut s = web3.connect(&coord).await;
    s.send(&NodeMsg::Renew {
        csr_pem: web3.csr(),
    })
    .await;
    let (code, message) = refusal(&s.next().await);
    assert_eq!(code, "cert-expired");
    assert!(
        message.contains("expired beyond the renewal window; enroll again"),
        "{message}"
    );
    let log = coord.log();
    assert!(log.contains("renewal-only session"), "{log}");
}
