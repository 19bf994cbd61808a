//! The `ztnet` binary against a real `ztnet-coordinator` process on 127.0.0.1.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Coordinator, WEB_DB_POLICY, assert_success, expect_failure, isolated_cli};

#[test]
fn network_token_policy_and_audit_round_trip() {
    let c = Coordinator::start();

    let created = c.json(&["network", "create", "--name", "prod-vpc", "--zero-trust"]);
    assert_eq!(created["name"], "prod-vpc");
    assert_eq!(created["zero_trust"], true);
    let table = c.ok(&["network", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("prod-vpc") && table.contains("zero-trust"),
        "{table}"
    );
    let shown = c.ok(&["network", "show", "prod-vpc"]);
    assert!(shown.contains("none (deny all)"), "{shown}");

    // The token alone on stdout; its id and expiry on stderr.
    let out = c
        .cli()
        .args([
            "token",
            "create",
            "--network",
            "prod-vpc",
            "--namespace",
            "production",
        ])
        .args(["--tag", "web", "--uses", "2", "--ttl", "30m"])
        .output()
        .expect("runs");
    assert_success(&out, &["token", "create"]);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let token = stdout.trim_end_matches('\n');
    assert!(
        token.starts_with("ztjoin1_") && !token.contains(char::is_whitespace),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 use(s)") && stderr.contains("expires"),
        "{stderr}"
    );

    let tokens = c.json(&["token", "list", "--network", "prod-vpc"]);
    let id = tokens[0]["id"].as_str().expect("id").to_string();
    assert_eq!(tokens[0]["uses_left"], 2);
    let table = c.ok(&["token", "list", "--network", "prod-vpc"]);
    assert!(
        table.contains(&id) && table.contains("2/2") && table.contains("valid"),
        "{table}"
    );
    let revoked = c.json(&["token", "revoke", "--network", "prod-vpc", &id]);
    assert_eq!(revoked["revoked"], true);
    let table = c.ok(&["token", "list", "--network", "prod-vpc"]);
    assert!(table.contains("revoked"), "{table}");

    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, WEB_DB_POLICY).expect("write");
    let policy_arg = policy.to_str().expect("utf-8 path");
    let applied = c.ok(&["policy", "apply", "--network", "prod-vpc", "-f", policy_arg]);
    assert!(
        applied.contains("applied policy v1") && applied.contains("2 test(s)"),
        "{applied}"
    );
    let shown = c.ok(&["policy", "show", "--network", "prod-vpc"]);
    assert!(
        shown.contains("version:") && shown.contains("tag:db"),
        "{shown}"
    );
    let history = c.json(&["policy", "history", "--network", "prod-vpc"]);
    assert_eq!(history.as_array().map(Vec::len), Some(1));

    let audit = c.ok(&["audit", "--network", "prod-vpc"]);
    for action in [
        "network.create",
        "token.create",
        "token.revoke",
        "policy.apply",
    ] {
        assert!(audit.contains(action), "{action} missing from:\n{audit}");
    }
    assert!(
        !audit.contains(token),
        "the audit log must never hold a token"
    );
    assert_eq!(
        c.ok(&["node", "list", "--network", "prod-vpc"]),
        "no nodes\n"
    );
}

#[test]
fn refused_policy_prints_diagnostics_and_keeps_the_old_one() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "lab", "--zero-trust"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, WEB_DB_POLICY).expect("write");
    c.ok(&[
        "policy",
        "apply",
        "-n",
        "lab",
        "-f",
        good.to_str().expect("path"),
    ]);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"rol:db\"]\nports = [\"any\"]\n",
    )
    .expect("write");
    let stderr = expect_failure(
        c.cli().args([
            "policy",
            "apply",
            "-n",
            "lab",
            "-f",
            bad.to_str().expect("path"),
        ]),
        1,
    );
    assert!(stderr.contains("bad.toml:3:"), "{stderr}");
    assert!(stderr.contains("to = [\"rol:db\"]"), "{stderr}");
    assert!(
        stderr.contains("error: coordinator refused the policy"),
        "{stderr}"
    );

    let failing = dir.path().join("failing.toml");
    std::fs::write(
        &failing,
        WEB_DB_POLICY.replace("expect = \"deny\"", "expect = \"allow\""),
    )
    .expect("write");
    let stderr = expect_failure(
        c.cli().args([
            "policy",
            "apply",
            "-n",
            "lab",
            "-f",
            failing.to_str().expect("path"),
        ]),
        1,
    );
    assert!(stderr.contains("error:"), "{stderr}");

    let history = c.json(&["policy", "history", "--network", "lab"]);
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(1),
        "refused applies store nothing"
    );
    let current = c.json(&["policy", "show", "--network", "lab"]);
    assert_eq!(current["version"], 1);
}

#[test]
fn api_errors_are_one_line_with_the_servers_message() {
    let c = Coordinator::start();
    let stderr = expect_failure(c.cli().args(["network", "show", "nope"]), 1);
    assert!(
        stderr.starts_with("error: coordinator refused: "),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 404"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let stderr = expect_failure(
        c.cli().args([
            "network",
            "create",
            "--name",
            "lab",
            "--cidr",
            "10.0.0.0/16",
        ]),
        1,
    );
    assert!(stderr.contains("HTTP 4"), "{stderr}");

    // A well-formed key the coordinator does not know.
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, format!("ztkey_{}\n", "1f".repeat(32))).expect("write");
    let stderr = expect_failure(
        c.cli()
            .env("ZTNET_API_KEY_FILE", &wrong)
            .args(["network", "list"]),
        1,
    );
    assert!(stderr.contains("HTTP 401"), "{stderr}");

    let stderr = expect_failure(
        c.cli()
            .args(["node", "show", "--network", "x", "../../v1/health"]),
        1,
    );
    assert!(stderr.contains("invalid character '/'"), "{stderr}");
}

#[test]
fn only_the_configured_ca_is_trusted() {
    let c = Coordinator::start();
    let other = Coordinator::start();
    let stderr = expect_failure(
        c.cli()
            .env("ZTNET_CA_CERT", other.ca())
            .args(["network", "list"]),
        1,
    );
    assert!(stderr.contains("cannot reach the coordinator"), "{stderr}");
    assert!(
        stderr.contains("does not chain to the configured CA"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").expect("write");
    let stderr = expect_failure(
        c.cli()
            .env("ZTNET_CA_CERT", &junk)
            .args(["network", "list"]),
        1,
    );
    assert!(stderr.contains("no certificate in the file"), "{stderr}");

    // The name checked is ztnet-coordinator whatever is dialled: "localhost" works too.
    let out = c
        .cli()
        .env("ZTNET_COORDINATOR", format!("localhost:{}", c.addr.port()))
        .args(["network", "list"])
        .output()
        .expect("runs");
    assert_success(&out, &["network", "list"]);
}

#[test]
fn login_saves_a_private_config_that_later_commands_use() {
    let c = Coordinator::start();
    let home = tempfile::tempdir().expect("tempdir");
    let config = home.path().join("cfg/ztnet.toml");
    let out = isolated_cli(home.path())
        .env("ZTNET_CONFIG", &config)
        .args([
            "login",
            "--coordinator",
            &c.addr.to_string(),
            "--api-key-file",
        ])
        .arg(c.admin_key())
        .arg("--ca-cert")
        .arg(c.ca())
        .output()
        .expect("runs");
    assert_success(&out, &["login"]);
    let mode = std::fs::metadata(&config)
        .expect("written")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(
        !text.contains("ztkey_"),
        "the key itself is never saved: {text}"
    );

    let out = isolated_cli(home.path())
        .env("ZTNET_CONFIG", &config)
        .args(["network", "create", "--name", "via-config"])
        .output()
        .expect("runs");
    assert_success(&out, &["network", "create"]);

    // Flags win over the file.
    let stderr = expect_failure(
        isolated_cli(home.path())
            .env("ZTNET_CONFIG", &config)
            .args(["network", "list", "--coordinator", "127.0.0.1:1"]),
        1,
    );
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");

    // A login that cannot be verified saves nothing.
    std::fs::remove_file(&config).expect("rm");
    let stderr = expect_failure(
        isolated_cli(home.path())
            .env("ZTNET_CONFIG", &config)
            .args(["login", "--coordinator", "127.0.0.1:1", "--api-key-file"])
            .arg(c.admin_key())
            .arg("--ca-cert")
            .arg(c.ca()),
        1,
    );
    assert!(stderr.contains("checking the settings"), "{stderr}");
    assert!(!config.exists());
}

#[test]
fn a_key_file_readable_by_others_is_warned_about_and_still_used() {
    let c = Coordinator::start();
    let loose = c.dir.path().join("loose.key");
    std::fs::copy(c.admin_key(), &loose).expect("copy");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let out = c
        .cli()
        .env("ZTNET_API_KEY_FILE", &loose)
        .args(["network", "list"])
        .output()
        .expect("runs");

    assert_success(&out, &["network", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("readable by others (mode 644)"), "{stderr}");
    let quiet = c.cli().args(["network", "list"]).output().expect("runs");
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
}

#[test]
fn the_key_file_wins_over_the_key_variable() {
    let c = Coordinator::start();
    let wrong = format!("ztkey_{}", "0".repeat(64));

    let out = c
        .cli()
        .env("ZTNET_API_KEY", &wrong)
        .args(["network", "list"])
        .output()
        .expect("runs");

    assert_success(&out, &["network", "list"]);
}
