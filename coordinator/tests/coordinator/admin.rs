//! The admin API: keys, networks, tokens, and what the first start leaves on disk.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::common::start;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn first_start_creates_private_files_and_keeps_them_on_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let coord = start(&dir);

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("admin.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    let key = coord.api_key.clone();
    assert!(key.starts_with("ztkey_") && key.len() == 6 + 64, "{key}");
    assert!(key[6..].chars().all(|c| c.is_ascii_hexdigit()));
    let fingerprint = ztnet_proto::token::fingerprint(&coord.ca_der());
    let log = coord.log();
    assert!(log.contains(&fingerprint), "fingerprint not logged:\n{log}");
    assert!(!log.contains(&key[6..]), "the API key was logged");
    let ca_before = coord.ca_pem.clone();
    coord.stop();

    let again = start(&dir);
    assert_eq!(again.ca_pem, ca_before, "the CA changed on restart");
    assert_eq!(again.api_key, key, "a second admin key was made");
    let (status, _) = again.api().get("/v1/networks").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn api_refuses_missing_and_bad_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();

    let (status, body) = api.with_key(None).get("/v1/networks").await;
    assert_eq!(status, 401);
    assert_eq!(body["status"], 401);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("missing API key")
    );

    let wrong = format!("ztkey_{}", "0".repeat(64));
    let (status, body) = api.with_key(Some(&wrong)).get("/v1/networks").await;
    assert_eq!(status, 401);
    assert!(body["message"].as_str().unwrap().contains("not recognised"));

    let (status, _) = api
        .with_key(Some(&wrong))
        .call(
            "POST",
            "/v1/networks",
            Some(json!({"name": "x", "zero_trust": true})),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(api.ok("GET", "/v1/networks", None).await, json!([]));

    let (status, health) = api.with_key(None).get("/v1/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn networks_get_prefixes_and_names_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();

    let prod = api.network("prod-vpc").await;
    assert_eq!(prod["cidr"], "100.64.0.0/16");
    let cidr6 = prod["cidr6"].as_str().unwrap();
    assert!(
        cidr6.starts_with("fd") && cidr6.ends_with("::/64"),
        "{cidr6}"
    );
    assert_eq!(prod["policy_version"], 0);
    assert_eq!(prod["zero_trust"], true);
    let dev = api.network("dev").await;
    assert_eq!(dev["cidr"], "100.65.0.0/16");
    assert_ne!(dev["cidr6"], prod["cidr6"]);

    let create = |body| api.call("POST", "/v1/networks", Some(body));
    let (status, body) = create(json!({"name": "prod-vpc", "zero_trust": true})).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) =
        create(json!({"name": "lab", "cidr": "10.0.0.0/16", "zero_trust": true})).await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("100.64.0.0/10"),
        "{body}"
    );
    let (status, body) =
        create(json!({"name": "lab", "cidr": "100.64.128.0/24", "zero_trust": true})).await;
    assert_eq!(status, 409);
    assert!(
        body["message"].as_str().unwrap().contains("prod-vpc"),
        "{body}"
    );
    let (status, _) = create(json!({"name": "Bad_Name", "zero_trust": true})).await;
    assert_eq!(status, 400);
    let (status, body) = create(json!({"name": "lab"})).await;
    assert_eq!(status, 400, "a missing field is a bad request: {body}");
    let lab = api
        .ok(
            "POST",
            "/v1/networks",
            Some(json!({"name": "lab", "cidr": "100.100.0.0/24", "zero_trust": false})),
        )
        .await;
    assert_eq!(lab["cidr"], "100.100.0.0/24");

    // A key life has an effect only in a zero-trust network: elsewhere it is refused, not
    // stored in silence; in a zero-trust network it is taken.
    let (status, body) = api
        .call(
            "PATCH",
            "/v1/networks/lab",
            Some(json!({"key_ttl_secs": 3600})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.to_string().contains("not a --zero-trust network"),
        "{body}"
    );
    let prod = api
        .ok(
            "PATCH",
            "/v1/networks/prod-vpc",
            Some(json!({"key_ttl_secs": 3600})),
        )
        .await;
    assert_eq!(prod["key_ttl_secs"], 3600, "{prod}");

    let all = api.ok("GET", "/v1/networks", None).await;
    let names: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("dev"), json!("lab"), json!("prod-vpc")]);
    let (status, _) = api.get("/v1/networks/nope").await;
    assert_eq!(status, 404);
    let (status, _) = api.get("/v1/networks/nope/nodes").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tokens_carry_address_and_fingerprint_and_only_their_hash_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;

    let created = api
        .ok(
            "POST",
            "/v1/networks/prod-vpc/tokens",
            Some(
                json!({"namespace": "production", "tags": ["web", "web"], "uses": 3,
                        "ttl_secs": 600}),
            ),
        )
        .await;
    let token = ztnet_proto::JoinToken::parse(created["token"].as_str().unwrap()).unwrap();
    assert_eq!(token.coordinator, coord.addr.to_string());
    assert_eq!(
        token.ca_fingerprint,
        ztnet_proto::token::fingerprint(&coord.ca_der())
    );
    let info = &created["info"];
    let hash = ztnet_proto::token::secret_hash(&token.secret);
    assert_eq!(info["id"], hash[..12]);
    assert_eq!(info["tags"], json!(["web"]));
    assert_eq!(info["uses_left"], 3);
    assert_eq!(info["created_by"], "admin");

    let list = api.ok("GET", "/v1/networks/prod-vpc/tokens", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&token.secret));
    let (status, _) = api
        .call(
            "POST",
            "/v1/networks/prod-vpc/tokens",
            Some(json!({"namespace": "production", "tags": [], "uses": 0, "ttl_secs": 60})),
        )
        .await;
    assert_eq!(status, 400);

    let id = info["id"].as_str().unwrap();
    let revoked = api
        .ok(
            "DELETE",
            &format!("/v1/networks/prod-vpc/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(revoked["revoked"], true);
    // A second revoke answers the same and audits nothing more.
    let again = api
        .ok(
            "DELETE",
            &format!("/v1/networks/prod-vpc/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(again["revoked"], true);
    let (status, _) = api
        .call("DELETE", "/v1/networks/prod-vpc/tokens/000000000000", None)
        .await;
    assert_eq!(status, 404);

    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let actions: Vec<_> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions,
        vec!["network.create", "token.create", "token.revoke"]
    );
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "admin")
    );
    assert!(!audit.to_string().contains(&token.secret));
    assert!(
        !coord.log().contains(&token.secret),
        "the token secret was logged"
    );

    coord.stop();
    for file in ["coordinator.db", "coordinator.db-wal"] {
        if let Ok(bytes) = std::fs::read(tmp.path().join(file)) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(&token.secret),
                "token secret stored in {file}"
            );
        }
    }
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_cannot_talk() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let other = rcgen::generate_simple_self_signed(vec!["ztnet-coordinator".into()]).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(other.cert.pem().as_bytes()).unwrap())
        .resolve("ztnet-coordinator", coord.addr)
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let url = format!("https://ztnet-coordinator:{}/v1/health", coord.addr.port());
    assert!(client.get(url).send().await.is_err());
}
