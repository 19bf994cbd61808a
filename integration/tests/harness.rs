//! Checks the harness itself: namespaces, links, captures and cleanup.

use std::time::Duration;

use ztnet_integration::pcap::FrameKind;
use ztnet_integration::{Capture, Netns, require_root, veth, wait_for};

#[test]
fn namespaces_link_capture_and_clean_up() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Netns::new("zth-a").expect("ns a");
    let b = Netns::new("zth-b").expect("ns b");
    veth(&a, "va", &b, "vb").expect("veth");
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "va"])
        .expect("addr a");
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", "vb"])
        .expect("addr b");

    let cap = Capture::start(&b, "vb", &dir.path().join("cap.pcap")).expect("capture");
    wait_for("ping across the veth", Duration::from_secs(10), || {
        Ok(a.output("ping", &["-c1", "-W1", "192.0.2.2"])?
            .status
            .success()
            .then_some(()))
    })
    .expect("ping");
    cap.wait_until("the echo in the capture", Duration::from_secs(5), |f| {
        f.iter().any(|f| f.kind == FrameKind::Icmp)
    })
    .expect("capture saw the ping");
    let frames = cap.finish().expect("pcap");
    let kinds: Vec<_> = frames.iter().map(|f| f.kind.clone()).collect();
    assert!(
        kinds.contains(&FrameKind::Icmp),
        "capture saw the ping: {kinds:?}"
    );

    let name = a.name().to_string();
    drop(a);
    let list = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    assert!(!list.contains(&name), "namespace {name} removed on drop");
}
