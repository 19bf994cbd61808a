//! `ztnet-node` in coordinator mode refuses a bad node name, a damaged join token, or a state
//! directory that another node process holds, before it makes a key file or an interface:
//! nothing is left behind to clean up but the lock file.

use std::path::Path;
use std::process::Command;

fn up(state: &Path, iface: &str, name: &str, token: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztnet-node"))
        .args(["--interface", iface, "--listen-port", "0"])
        .arg("--state-dir")
        .arg(state)
        .args(["--name", name, "--token", token])
        .output()
        .expect("run ztnet-node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn left_behind(state: &Path, iface: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(state)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name != "node.lock")
                .collect()
        })
        .unwrap_or_default();
    if Path::new("/sys/class/net").join(iface).exists() {
        found.push(format!("interface {iface}"));
    }
    found
}

#[test]
fn a_bad_name_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let token = "ztjoin1_e30";
    let (ok, err) = up(&state, "zupref0", "web.1", token);
    assert!(!ok, "a dotted name was accepted");
    assert!(
        err.contains("node name \"web.1\" has '.' at position 4"),
        "{err}"
    );
    assert_eq!(left_behind(&state, "zupref0"), Vec::<String>::new());
}

#[test]
fn a_damaged_token_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let (ok, err) = up(&state, "zupref1", "web-1", "ztjoin1_ab!c");
    assert!(!ok, "a damaged token was accepted");
    assert!(
        err.contains("--token") && err.contains("corrupted"),
        "{err}"
    );
    let (ok, err) = up(&state, "zupref1", "web-1", "not-a-token");
    assert!(!ok);
    assert!(err.contains("not a ztnet join token"), "{err}");
    assert_eq!(left_behind(&state, "zupref1"), Vec::<String>::new());
}

#[test]
fn a_second_node_on_one_state_directory_is_refused_before_anything_is_made() {
    use std::io::Write;

    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    // This test holds the lock as a running node would, with a pid written in it.
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(state.join("node.lock"))
        .expect("lock file");
    held.try_lock().expect("the lock is free");
    writeln!(held, "4242").expect("pid");

    let (ok, err) = up(&state, "zupref2", "web-1", "ztjoin1_e30");
    assert!(!ok, "a second node on one state directory started");
    assert!(
        err.contains("another ztnet-node (pid 4242) is running on the state directory"),
        "{err}"
    );
    assert_eq!(left_behind(&state, "zupref2"), Vec::<String>::new());

    // Once the holder is gone the directory is free again (the token then fails, as it should).
    drop(held);
    let (ok, err) = up(&state, "zupref2", "web-1", "ztjoin1_e30");
    assert!(!ok);
    assert!(!err.contains("another ztnet-node"), "{err}");
    assert!(!Path::new("/sys/class/net/zupref2").exists());
}
