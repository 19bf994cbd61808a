//! The library entry point: `run` in the test's own process, as embedders would use it.

use std::time::Duration;

use ztnet_coordinator::{Config, run};

use crate::common::Api;

#[tokio::test]
async fn run_starts_in_process_and_shuts_down_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let running = run(Config {
        data_dir: tmp.path().join("d"),
        trust_domain: "corp.example".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: Some("coord.corp.example:7443".into()),
    })
    .await
    .expect("starts");
    assert_ne!(running.local_addr.port(), 0);
    let ca_pem = std::fs::read_to_string(tmp.path().join("d/ca.pem")).unwrap();
    let key = std::fs::read_to_string(tmp.path().join("d/admin.key")).unwrap();
    let api = Api::new(running.local_addr, &ca_pem, Some(key.trim().to_string()));
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "ns", &[], 1).await;
    let parsed = ztnet_proto::JoinToken::parse(&token).unwrap();
    assert_eq!(
        parsed.coordinator, "coord.corp.example:7443",
        "--advertise goes into tokens"
    );
    assert_eq!(parsed.ca_fingerprint, running.ca_fingerprint);

    let addr = running.local_addr;
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown finishes");
    // The ports are free again: a new coordinator can take the same one.
    let again = run(Config {
        data_dir: tmp.path().join("d"),
        trust_domain: "corp.example".into(),
        listen: addr,
        advertise: None,
    })
    .await
    .expect("restarts on the same port");
    again.shutdown().await;
}

#[tokio::test]
async fn a_bad_trust_domain_or_a_damaged_ca_stops_the_start_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = |td: &str| Config {
        data_dir: tmp.path().join("d"),
        trust_domain: td.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
    };
    let Err(e) = run(config("Corp Example")).await else {
        panic!("a trust domain with a space was accepted");
    };
    assert!(e.to_string().contains("trust domain"), "{e}");

    run(config("corp.example")).await.unwrap().shutdown().await;
    std::fs::remove_file(tmp.path().join("d/ca.key")).unwrap();
    let Err(e) = run(config("corp.example")).await else {
        panic!("started without its CA key");
    };
    assert!(e.to_string().contains("ca.key"), "{e}");
}
