//! Workload registrations through the admin API, and SVID signing over the control channel:
//! only a SPIFFE ID registered for the asking node is signed, and the certificate follows the
//! X.509-SVID rules.

use serde_json::json;
use ztnet_proto::control::{NodeMsg, ServerMsg};

use crate::common::*;

fn workload_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

#[tokio::test]
async fn registrations_are_validated_listed_audited_and_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &[], 1).await;
    let mut n = TestNode::new("web1", 51820);
    n.enroll(&coord, &token).await;
    let path = "/v1/networks/prod-vpc/workloads";
    let body = |id: &str, node: &str, sel: &[&str], ttl: u64| {
        Some(json!({"spiffe_id": id, "node": node, "selectors": sel, "ttl_secs": ttl}))
    };

    let refused = [
        (
            body(
                "spiffe://other.example/ns/p/sa/a",
                "web1",
                &["unix:uid:1"],
                60,
            ),
            400,
            "trust domain",
        ),
        (
            body(
                "spiffe://corp.example/ns/p/node/x",
                "web1",
                &["unix:uid:1"],
                60,
            ),
            400,
            "node",
        ),
        (
            body("spiffe://corp.example/a//b", "web1", &["unix:uid:1"], 60),
            400,
            "empty",
        ),
        (
            body("spiffe://corp.example/ns/p/sa/a", "web1", &[], 60),
            400,
            "at least one",
        ),
        (
            body(
                "spiffe://corp.example/ns/p/sa/a",
                "web1",
                &["unix:uid:x"],
                60,
            ),
            400,
            "decimal",
        ),
        (
            body(
                "spiffe://corp.example/ns/p/sa/a",
                "web1",
                &["unix:uid:1"],
                5,
            ),
            400,
            "ttl",
        ),
        (
            body(
                "spiffe://corp.example/ns/p/sa/a",
                "nope",
                &["unix:uid:1"],
                60,
            ),
            404,
            "nope",
        ),
    ];
    for (req, status, needle) in refused {
        let (got, v) = api.call("POST", path, req.clone()).await;
        assert_eq!(got, status, "{req:?}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    let typo = json!({"spiffe_id": "spiffe://corp.example/ns/p/sa/a", "node": "web1",
        "selectors": ["unix:uid:1"], "ttl": 60});
    let (status, v) = api.call("POST", path, Some(typo)).await;
    assert_eq!(status, 400, "a misspelt field is refused: {v}");
    let (_, list) = api.get(path).await;
    assert_eq!(list, json!([]), "a refused registration stores nothing");

    let w = api
        .ok(
            "POST",
            path,
            body(
                "spiffe://corp.example/ns/p/sa/a",
                "web1",
                &["unix:uid:7"],
                60,
            ),
        )
        .await;
    assert_eq!(w["selectors"], json!(["unix:uid:7"]));
    let (status, _) = api
        .call(
            "POST",
            path,
            body(
                "spiffe://corp.example/ns/p/sa/a",
                "web1",
                &["unix:uid:8"],
                60,
            ),
        )
        .await;
    assert_eq!(status, 409);
    let id = w["id"].as_u64().unwrap();
    let shown = api.ok("GET", &format!("{path}/{id}"), None).await;
    assert_eq!(shown["node"], "web1");
    api.ok("DELETE", &format!("{path}/{id}"), None).await;
    let (status, _) = api.get(&format!("{path}/{id}")).await;
    assert_eq!(status, 404);
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("workload."))
        .collect();
    assert_eq!(actions, ["workload.register", "workload.delete"]);
}

#[tokio::test]
async fn a_node_gets_svids_only_for_its_own_registrations() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &[], 2).await;
    let mut n1 = TestNode::new("web1", 51820);
    n1.enroll(&coord, &token).await;
    let mut n2 = TestNode::new("web2", 51821);
    n2.enroll(&coord, &token).await;
    let path = "/v1/networks/prod-vpc/workloads";
    let api_id = "spiffe://corp.example/ns/production/sa/api";
    let db_id = "spiffe://corp.example/ns/production/sa/db";
    for (id, node) in [(api_id, "web1"), (db_id, "web2")] {
        let req = json!({"spiffe_id": id, "node": node, "selectors": ["unix:uid:1001"]});
        api.ok("POST", path, Some(req)).await;
    }

    let mut s = n1.connect(&coord).await;
    s.full().await;
    s.send(&NodeMsg::WorkloadList { request_id: 1 }).await;
    match s.next().await {
        ServerMsg::Workloads {
            request_id,
            entries,
        } => {
            assert_eq!(request_id, 1);
            let ids: Vec<&str> = entries.iter().map(|e| e.spiffe_id.as_str()).collect();
            assert_eq!(ids, [api_id], "web1 learns only its own registrations");
            assert_eq!(entries[0].ttl_secs, 3600);
        }
        other => panic!("expected Workloads, got {other:?}"),
    }

    // web2's identity is refused to web1, and the session goes on.
    let (_, csr) = workload_csr();
    s.send(&NodeMsg::SignSvid {
        request_id: 2,
        spiffe_id: db_id.into(),
        csr_pem: csr,
    })
    .await;
    match s.next().await {
        ServerMsg::WorkloadRefused { request_id, error } => {
            assert_eq!((request_id, error.code.as_str()), (2, "not-registered"));
        }
        other => panic!("expected WorkloadRefused, got {other:?}"),
    }

    let (key, csr) = workload_csr();
    s.send(&NodeMsg::SignSvid {
        request_id: 3,
        spiffe_id: api_id.into(),
        csr_pem: csr,
    })
    .await;
    let (cert_pem, bundle_pem) = match s.next().await {
        ServerMsg::Svid {
            request_id,
            cert_pem,
            bundle_pem,
        } => {
            assert_eq!(request_id, 3);
            (cert_pem, bundle_pem)
        }
        other => panic!("expected Svid, got {other:?}"),
    };
    assert_eq!(bundle_pem, coord.ca_pem);
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert_eq!(names, [format!("URI({api_id})")]);
    let bc = cert.basic_constraints().unwrap().map(|b| b.value.ca);
    assert_ne!(bc, Some(true), "an SVID is not a CA");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let v = cert.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert!(
        (3600..=3660).contains(&life),
        "1 h plus at most 60 s back-dating: {life}"
    );

    // A malformed request is refused without ending the session.
    s.send(&NodeMsg::SignSvid {
        request_id: 4,
        spiffe_id: api_id.into(),
        csr_pem: "x".into(),
    })
    .await;
    assert!(matches!(
        s.next().await,
        ServerMsg::WorkloadRefused { request_id: 4, .. }
    ));
    s.send(&NodeMsg::WorkloadList { request_id: 5 }).await;
    assert!(matches!(
        s.next().await,
        ServerMsg::Workloads { request_id: 5, .. }
    ));
}
