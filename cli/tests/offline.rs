//! The `ztnet` binary on commands that need no coordinator: policy check and explain, bad
//! flags, and keys in every form FC-31 lists.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{VALID_KEY, WEB_DB_POLICY, assert_success, expect_failure, isolated_cli};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn good_policy_checks_clean_and_lists_its_tests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "policy.toml", WEB_DB_POLICY);
    let out = isolated_cli(dir.path())
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .expect("runs");
    assert_success(&out, &["policy", "check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 test(s), 2 passed, 0 failed"), "{stdout}");
    assert!(stdout.contains("tests ok"), "{stdout}");

    let out = isolated_cli(dir.path())
        .args(["policy", "check", "--output", "json"])
        .arg(&file)
        .output()
        .expect("runs");
    assert_success(&out, &["policy", "check", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["tests"]["results"].as_array().map(Vec::len), Some(2));
}

#[test]
fn invalid_policy_is_reported_with_line_column_and_caret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:0\"]\n";
    let file = write(&dir, "bad.toml", bad);
    let mut cmd = isolated_cli(dir.path());
    cmd.args(["policy", "check"]).arg(&file);
    let out = cmd.output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("bad.toml:4:"), "{stdout}");
    assert!(stdout.contains("ports = [\"tcp:0\"]"), "{stdout}");
    assert!(stdout.contains('^'), "{stdout}");
    assert!(stdout.contains("tests not run"), "{stdout}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("error(s)"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
}

#[test]
fn failing_policy_test_exits_non_zero_and_names_the_test() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = WEB_DB_POLICY.replace(
        "port = \"tcp:22\"\nexpect = \"deny\"",
        "port = \"tcp:22\"\nexpect = \"allow\"",
    );
    let file = write(&dir, "p.toml", &policy);
    let mut cmd = isolated_cli(dir.path());
    cmd.args(["policy", "check"]).arg(&file);
    let out = cmd.output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("1 failed"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 policy test(s) failed"), "{stderr}");
}

#[test]
fn missing_policy_file_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = expect_failure(
        isolated_cli(dir.path()).args(["policy", "check", "/nonexistent/p.toml"]),
        1,
    );
    assert!(
        stderr.starts_with("error: reading policy /nonexistent/p.toml"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn explain_says_allowed_or_denied_and_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "policy.toml", WEB_DB_POLICY);
    let run = |from: &str, to: &str, port: &str| {
        let out = isolated_cli(dir.path())
            .args(["policy", "explain"])
            .arg(&file)
            .args(["--from", from, "--to", to, "--port", port])
            .output()
            .expect("runs");
        assert_success(&out, &["policy", "explain"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let allowed = run("web-1,ns=production,tags=web", "db-1,tags=db", "tcp:5432");
    assert!(
        allowed.starts_with("ALLOWED: web-1 -> db-1 on tcp:5432"),
        "{allowed}"
    );
    assert!(allowed.contains("grant"), "{allowed}");

    let denied = run("web-1,tags=web", "db-1,tags=db", "tcp:22");
    assert!(denied.starts_with("DENIED"), "{denied}");
    assert!(denied.contains("default deny"), "{denied}");

    let reverse = run("db-1,tags=db", "web-1,tags=web", "tcp:5432");
    assert!(reverse.starts_with("DENIED"), "{reverse}");

    let out = isolated_cli(dir.path())
        .args(["policy", "explain", "-o", "json"])
        .arg(&file)
        .args([
            "--from",
            "web-1,tags=web",
            "--to",
            "db-1,tags=db",
            "--port",
            "tcp:5432",
        ])
        .output()
        .expect("runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["allowed"], true);
}

#[test]
fn explain_refuses_bad_identities_and_probes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "policy.toml", WEB_DB_POLICY);
    let explain = |from: &str, port: &str| {
        let mut cmd = isolated_cli(dir.path());
        cmd.args(["policy", "explain"])
            .arg(&file)
            .args(["--from", from, "--to", "db-1", "--port", port]);
        expect_failure(&mut cmd, 1)
    };
    assert!(explain("web-1,role=x", "tcp:5432").contains("unknown key \"role\""));
    assert!(explain("web-1", "tcp:0").contains("--port"));
    assert!(explain("web-1", "tcp:1-5").contains("--port"));
    assert!(explain("web-1,ip=1.2.3", "icmp").contains("not an address"));
}

#[test]
fn bad_flags_exit_2_with_usage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &["token", "create", "--namespace", "x"],
        &[
            "token",
            "create",
            "--network",
            "n",
            "--namespace",
            "x",
            "--ttl",
            "soon",
        ],
        &[
            "token",
            "create",
            "--network",
            "n",
            "--namespace",
            "x",
            "--ttl",
            "0s",
        ],
        &[
            "token",
            "create",
            "--network",
            "n",
            "--namespace",
            "x",
            "--uses",
            "-1",
        ],
        &[
            "network",
            "create",
            "--name",
            "x",
            "--cidr",
            "100.64.0.0/99",
        ],
        &[
            "policy",
            "apply",
            "--network",
            "n",
            "-f",
            "p.toml",
            "--timeout",
            "5s",
        ],
        &["node", "frobnicate"],
        &["status", "--output", "yaml"],
    ];
    for args in cases {
        let stderr = expect_failure(isolated_cli(dir.path()).args(*args), 2);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
}

#[test]
fn every_command_help_has_an_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["network", "create", "--help"][..],
        &["token", "create", "--help"],
        &["policy", "explain", "--help"],
        &["status", "--help"],
        &["node", "delete", "--help"],
    ] {
        let out = isolated_cli(dir.path()).args(args).output().expect("runs");
        assert_success(&out, args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Example"), "{args:?}: {text}");
    }
}

#[test]
fn admin_commands_without_settings_say_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = expect_failure(isolated_cli(dir.path()).args(["network", "list"]), 1);
    assert!(stderr.contains("no coordinator address"), "{stderr}");
    let stderr = expect_failure(
        isolated_cli(dir.path())
            .env("ZTNET_COORDINATOR", "127.0.0.1:9")
            .args(["network", "list"]),
        1,
    );
    assert!(stderr.contains("no API key"), "{stderr}");
}

/// FC-31 (a)-(j) through `ztnet key check`, the CLI's entry point for WireGuard keys.
#[test]
fn wireguard_keys_are_checked_like_everywhere_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = isolated_cli(dir.path())
        .args(["key", "check", VALID_KEY])
        .output()
        .expect("runs");
    assert_success(&out, &["key", "check"]);

    let noncanonical = format!("{}J=", &VALID_KEY[..42]);
    let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string();
    let cases = [
        (VALID_KEY[..43].to_string(), "43 characters"),
        (format!("{VALID_KEY}A"), "45 characters"),
        (noncanonical, "not canonical"),
        (format!("\"{VALID_KEY}\""), "quotes"),
        (format!("{VALID_KEY}\r\n"), "line break at position 45"),
        (VALID_KEY.replace('+', "-"), "invalid character '-'"),
        (zero, "all zeros"),
        ("00".repeat(32), "64 characters"),
        (String::new(), "empty"),
    ];
    for (key, expected) in &cases {
        let stderr = expect_failure(isolated_cli(dir.path()).args(["key", "check", key]), 1);
        assert!(stderr.contains(expected), "{key:?}: {stderr}");
        assert!(
            stderr.starts_with("error: invalid WireGuard key"),
            "{stderr}"
        );
    }

    // From stdin, one trailing newline is the end of the line; a CR before it is not.
    let piped = |input: &str| {
        let mut child = isolated_cli(dir.path())
            .args(["key", "check", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawns");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writes");
        child.wait_with_output().expect("ends")
    };
    assert!(piped(&format!("{VALID_KEY}\n")).status.success());
    let out = piped(&format!("{VALID_KEY}\r\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("position 45"));
}

/// The same rules for the API key, wherever the CLI takes one (file or environment).
#[test]
fn api_keys_in_bad_forms_are_refused_before_dialling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(&dir, "ca.pem", "not used");
    let good = format!("ztkey_{}", "0a".repeat(32));
    let cases = [
        (format!("\"{good}\""), "quotes"),
        (format!("{good}\r\n"), "line break at position 71"),
        (good[..60].to_string(), "60 characters"),
        (good.replace("ztkey_", "Bearer "), "whitespace"),
        (String::new(), "empty"),
    ];
    for (key, expected) in &cases {
        let file = write(&dir, "api.key", key);
        let stderr = expect_failure(
            isolated_cli(dir.path())
                .env("ZTNET_COORDINATOR", "127.0.0.1:9")
                .env("ZTNET_CA_CERT", &ca)
                .env("ZTNET_API_KEY_FILE", &file)
                .args(["network", "list"]),
            1,
        );
        assert!(stderr.contains("API key file"), "{key:?}: {stderr}");
        assert!(stderr.contains(expected), "{key:?}: {stderr}");

        let stderr = expect_failure(
            isolated_cli(dir.path())
                .env("ZTNET_COORDINATOR", "127.0.0.1:9")
                .env("ZTNET_CA_CERT", &ca)
                .env("ZTNET_API_KEY", key)
                .args(["network", "list"]),
            1,
        );
        assert!(
            stderr.contains("ZTNET_API_KEY is not a valid API key"),
            "{key:?}: {stderr}"
        );
    }
}

#[test]
fn status_without_a_node_names_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let stderr = expect_failure(
        isolated_cli(dir.path())
            .args(["status", "--socket"])
            .arg(&sock),
        1,
    );
    assert!(stderr.contains("cannot open the status socket"), "{stderr}");
    assert!(stderr.contains("none.sock"), "{stderr}");
}

/// `ztnet policy check x.toml 2>&1 | true`: stdout and stderr are a pipe nobody reads.
#[test]
fn a_closed_stderr_and_stdout_end_quietly_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);

    let status = isolated_cli(dir.path())
        .args(["policy", "check"])
        .arg(&missing)
        .stdout(writer.try_clone().expect("clone"))
        .stderr(writer)
        .status()
        .expect("runs");

    assert_eq!(status.code(), Some(1), "{status}");
}

/// The same with a good policy: the report cannot be written, and that is no panic either.
#[test]
fn a_closed_stdout_on_success_is_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "policy.toml", WEB_DB_POLICY);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);

    let status = isolated_cli(dir.path())
        .args(["policy", "check"])
        .arg(&file)
        .stdout(writer.try_clone().expect("clone"))
        .stderr(writer)
        .status()
        .expect("runs");

    assert_ne!(status.code(), Some(101), "{status}");
}
