//! The document: what parses, what is refused, and where each finding points.

use netpolicy::{Diagnostic, Policy, Severity, render_diagnostics};

use crate::common::parse;

const EXAMPLE: &str = r#"
[groups]
frontend = ["tag:web", "node:edge-1"]

[[grant]]
from = ["group:frontend"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[deny]]
from = ["tag:contractor"]
to = ["tag:db"]
ports = ["any"]

[[test]]
from = { name = "web1", namespace = "production", tags = ["web"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "allow"

[[test]]
from = { name = "c1", namespace = "production", tags = ["web", "contractor"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "deny"
"#;

/// The errors of a refused document.
fn errors(source: &str) -> Vec<Diagnostic> {
    match Policy::parse(source) {
        Ok(c) => panic!("accepted, warnings: {:#?}", c.warnings),
        Err(e) => e
            .diagnostics
            .into_iter()
            .filter(|d| d.severity == Severity::Error)
            .collect(),
    }
}

/// The single error of a refused document.
fn error(source: &str) -> Diagnostic {
    let mut errs = errors(source);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.remove(0)
}

fn rule_with(from: &str, to: &str, ports: &str) -> String {
    format!("[[grant]]\nfrom = [{from}]\nto = [{to}]\nports = [{ports}]\n")
}

#[test]
fn the_issue_example_parses_and_its_tests_pass() {
    let checked = parse(EXAMPLE);

    let report = checked.policy.run_tests();

    assert!(checked.warnings.is_empty(), "{:#?}", checked.warnings);
    assert_eq!(checked.policy.grant_count(), 2);
    assert_eq!(checked.policy.deny_count(), 1);
    assert_eq!(report.results.len(), 2);
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.results[0].line, 20);
    assert_eq!(report.results[0].decided_by, "grant[0] (line 5)");
    assert_eq!(report.results[1].decided_by, "deny[0] (line 15)");
}

#[test]
fn an_empty_document_is_valid_and_denies_everything() {
    let checked = parse("");
    assert_eq!(checked.policy.grant_count(), 0);
    assert!(checked.policy.run_tests().passed());
}

#[test]
fn a_failing_test_is_reported_with_its_line() {
    let src = format!(
        "{}\n[[test]]\nfrom = {{ name = \"a\", tags = [\"web\"] }}\nto = {{ name = \"b\", tags = [\"db\"] }}\nport = \"tcp:22\"\nexpect = \"allow\"\n",
        rule_with("\"tag:web\"", "\"tag:db\"", "\"tcp:5432\"")
    );
    let report = parse(&src).policy.run_tests();
    assert!(!report.passed());
    assert_eq!(report.results[0].line, 6);
    assert_eq!(report.results[0].decided_by, "default deny");
    assert_eq!(
        report.results[0].description,
        "a -> b tcp:22 (expect allow)"
    );
}

#[test]
fn toml_syntax_errors_have_a_position() {
    let d = error("[[grant]\nfrom = [\"*\"]\n");
    assert_eq!(d.line, 1);
    assert!(d.column >= 1);
}

#[test]
fn unknown_top_level_key_is_an_error_with_its_span() {
    let d = error("[[grants]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n");
    assert_eq!((d.line, d.column), (1, 3));
    assert_eq!(d.text, "grants");
    assert!(
        d.message.contains("unknown field `grants`"),
        "{}",
        d.message
    );
}

#[test]
fn unknown_key_in_an_entry_is_an_error_with_its_span() {
    let d = error("[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nport = [\"any\"]\n");
    assert_eq!((d.line, d.column), (4, 1));
    assert_eq!(d.text, "port");
    assert!(d.message.contains("unknown field `port`"), "{}", d.message);
}

#[test]
fn a_missing_key_is_an_error() {
    let d = error("[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\n");
    assert!(d.message.contains("missing field `ports`"), "{}", d.message);
    assert_eq!(d.line, 1);
}

#[test]
fn a_test_that_misses_a_key_is_an_error() {
    let d = error("[[test]]\nfrom = { name = \"a\" }\nto = { name = \"b\" }\nport = \"tcp:1\"\n");
    assert!(
        d.message.contains("missing field `expect`"),
        "{}",
        d.message
    );
    let d = error(
        "[[test]]\nfrom = { namespace = \"x\" }\nto = { name = \"b\" }\nport = \"tcp:1\"\nexpect = \"deny\"\n",
    );
    assert!(d.message.contains("missing field `name`"), "{}", d.message);
}

#[test]
fn a_test_with_bad_values_is_refused() {
    let base =
        "[[test]]\nfrom = { name = \"a\" }\nto = { name = \"b\", addresses = [\"10.0.0.1\"] }\n";
    let d = error(&format!("{base}port = \"tcp:1\"\nexpect = \"maybe\"\n"));
    assert_eq!((d.line, d.column, d.text.as_str()), (5, 10, "\"maybe\""));
    let d = error(&format!("{base}port = \"tcp:1-5\"\nexpect = \"deny\"\n"));
    assert!(d.message.contains("a probe is one flow"), "{}", d.message);
    let d = error(&format!(
        "{base}port = \"tcp:1\"\nexpect = \"deny\"\ndst = \"10.0.0.2\"\n"
    ));
    assert!(
        d.message.contains("not one of `to`'s addresses"),
        "{}",
        d.message
    );
}

#[test]
fn unknown_selector_kind_is_an_error_at_the_selector() {
    let src = rule_with("\"user:op\"", "\"*\"", "\"any\"");
    let d = error(&src);
    assert_eq!((d.line, d.column), (2, 9));
    assert_eq!(d.text, "\"user:op\"");
    assert!(
        d.message.contains("unknown selector kind `user`"),
        "{}",
        d.message
    );
}

#[test]
fn undefined_group_is_an_error() {
    let d = error(&rule_with("\"group:nope\"", "\"*\"", "\"any\""));
    assert!(
        d.message.contains("group `nope` is not defined"),
        "{}",
        d.message
    );
    assert_eq!(d.line, 2);
}

#[test]
fn cyclic_groups_are_an_error_naming_the_cycle() {
    let src = format!(
        "[groups]\na = [\"group:b\"]\nb = [\"tag:x\", \"group:a\"]\n{}",
        rule_with("\"group:a\"", "\"*\"", "\"any\"")
    );
    let errs = errors(&src);
    assert!(!errs.is_empty());
    assert!(
        errs.iter().all(|d| d.message.contains("includes itself")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|d| d.message.contains("group:a -> group:b -> group:a")
                || d.message.contains("group:b -> group:a -> group:b"))
    );
    let d = error("[groups]\na = [\"group:a\"]\n");
    assert_eq!((d.line, d.column), (2, 6));
}

#[test]
fn nested_groups_expand() {
    let src = format!(
        "[groups]\ninner = [\"tag:web\"]\nouter = [\"group:inner\", \"node:edge\"]\n{}",
        rule_with("\"group:outer\"", "\"*\"", "\"any\"")
    );
    let checked = parse(&src);
    assert!(checked.warnings.is_empty(), "{:#?}", checked.warnings);
}

#[test]
fn an_empty_group_used_in_a_rule_can_never_match() {
    let src = format!(
        "[groups]\nnobody = []\n{}",
        rule_with("\"group:nobody\"", "\"*\"", "\"any\"")
    );
    let d = error(&src);
    assert!(d.message.contains("can never match"), "{}", d.message);
}

#[test]
fn an_unused_group_is_a_warning() {
    let src = format!(
        "[groups]\nspare = [\"tag:x\"]\n{}",
        rule_with("\"*\"", "\"*\"", "\"any\"")
    );
    let checked = parse(&src);
    assert_eq!(checked.warnings.len(), 1);
    assert!(checked.warnings[0].message.contains("not used"));
    assert_eq!(
        (checked.warnings[0].line, checked.warnings[0].column),
        (2, 1)
    );
}

#[test]
fn out_of_range_ports_and_reversed_ranges_are_errors() {
    for (ports, want) in [
        ("\"tcp:0\"", "port 0"),
        ("\"tcp:65536\"", "out of range"),
        ("\"udp:70000\"", "out of range"),
        (
            "\"tcp:5000-4000\"",
            "reversed range in `tcp:5000-4000`: write `tcp:4000-5000`",
        ),
        ("\"tcp\"", "needs a port"),
        ("\"http:80\"", "unknown protocol `http`"),
    ] {
        let d = error(&rule_with("\"*\"", "\"*\"", ports));
        assert!(d.message.contains(want), "{ports}: {}", d.message);
        assert_eq!((d.line, d.column, d.text.as_str()), (4, 10, ports));
    }
}

#[test]
fn empty_from_to_or_ports_are_errors() {
    for (src, key) in [
        (rule_with("", "\"*\"", "\"any\""), "`from` is empty"),
        (rule_with("\"*\"", "", "\"any\""), "`to` is empty"),
        (rule_with("\"*\"", "\"*\"", ""), "`ports` is empty"),
    ] {
        let d = error(&src);
        assert!(d.message.contains(key), "{}", d.message);
        assert_eq!(d.text, "[]");
    }
}

#[test]
fn invalid_prefixes_are_errors() {
    for (sel, want) in [
        ("\"cidr:10.0.0.0/33\"", "not between 0 and 32"),
        ("\"cidr:fd00::/129\"", "not between 0 and 128"),
        ("\"cidr:10.0.0/8\"", "not an IPv4 or IPv6 address"),
        ("\"cidr:10.0.0.1\"", "needs a prefix length"),
        (
            "\"cidr:10.91.1.113/25\"",
            "the prefix is `cidr:10.91.1.0/25`",
        ),
        (
            "\"cidr:fd00:90::5/64\"",
            "the prefix is `cidr:fd00:90::/64`",
        ),
    ] {
        let d = error(&rule_with("\"*\"", sel, "\"any\""));
        assert!(d.message.contains(want), "{sel}: {}", d.message);
        assert_eq!(d.text, sel);
    }
}

#[test]
fn selectors_that_can_never_match_are_errors() {
    for sel in [
        "\"tag:\"",
        "\"node:web 1\"",
        "\"spiffe://corp.example\"",
        "\"spiffe://corp.example/ns/*/sa/api\"",
        "\"spiffe://Corp/ns/x\"",
        "\"spiffe://corp.example//x\"",
    ] {
        let d = error(&rule_with(sel, "\"*\"", "\"any\""));
        assert_eq!(d.text, sel, "{}", d.message);
    }
}

#[test]
fn spiffe_selectors_are_accepted() {
    let src = rule_with(
        "\"spiffe://corp.example/ns/production/sa/api\", \"spiffe://corp.example/ns/ops/*\"",
        "\"*\"",
        "\"any\"",
    );
    assert!(parse(&src).warnings.is_empty());
}

#[test]
fn wildcard_beside_other_selectors_is_a_warning_that_says_what_it_means() {
    // FC-09: selectors in a list are OR'ed; `*` swallows the group, and the check says so.
    let src = format!(
        "[groups]\nteam1 = [\"tag:t1\"]\n{}",
        rule_with("\"*\", \"group:team1\"", "\"node:svc1\"", "\"any\"")
    );
    let checked = parse(&src);
    assert_eq!(checked.warnings.len(), 1, "{:#?}", checked.warnings);
    let w = &checked.warnings[0];
    assert_eq!(
        (w.line, w.column, w.text.as_str()),
        (4, 14, "\"group:team1\"")
    );
    assert!(w.message.contains("OR'ed"), "{}", w.message);
    assert!(w.message.contains("every node"), "{}", w.message);
}

#[test]
fn duplicates_and_any_beside_ports_are_warnings() {
    let checked = parse(&rule_with(
        "\"tag:a\", \"tag:a\"",
        "\"*\"",
        "\"any\", \"tcp:22\"",
    ));
    assert_eq!(checked.warnings.len(), 2, "{:#?}", checked.warnings);
    assert!(
        checked
            .warnings
            .iter()
            .any(|w| w.message.contains("appears twice"))
    );
    assert!(
        checked
            .warnings
            .iter()
            .any(|w| w.message.contains("`any` in the same list"))
    );
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let src = format!(
        "{}{}",
        rule_with("\"user:x\"", "\"cidr:10.0.0.1/8\"", "\"tcp:0\""),
        rule_with("\"group:none\"", "\"*\"", "\"udp:9-1\"")
    );
    let errs = errors(&src);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let lines: Vec<usize> = errs.iter().map(|d| d.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 6, 8]);
}

#[test]
fn addresses_with_ports_glued_on_are_errors_naming_the_token() {
    // FC-11: every such form is refused, never split on a colon; the error names the token and
    // says that the port goes in `ports`.
    for sel in [
        "cidr:fd00:90::5/128:22",
        "cidr:[fd00:90::5]:22",
        "cidr:[fd00:90::5]:80,443",
        "cidr:fd00:90::/64:*",
        "cidr:::/0:*",
        "cidr:[fd00:90::5]:1000-2000",
        "cidr:[fd00:90::5:22",
        "cidr:[::1]:",
        "cidr:[::1]:99999",
        "fd00:90::5/128:22",
        "[fd00:90::5]:22",
        "[fd00:90::5]:80,443",
        "fd00:90::/64:*",
        "::/0:*",
        "[fd00:90::5]:1000-2000",
        "10.0.0.1:22",
        "[fd00:90::5:22",
        "[::1]:",
        "[::1]:99999",
    ] {
        let quoted = format!("\"{sel}\"");
        let d = error(&rule_with("\"*\"", &quoted, "\"any\""));
        assert_eq!(d.text, quoted, "{}", d.message);
        assert!(d.message.contains(sel), "{sel}: {}", d.message);
        assert!(d.message.contains("`ports`"), "{sel}: {}", d.message);
    }
}

#[test]
fn an_ambiguous_ipv6_address_without_length_is_refused() {
    // `fd00:90::5:22` is a valid address, and could also be fd00:90::5 with port 22.
    for sel in ["cidr:fd00:90::5:22", "fd00:90::5:22"] {
        let d = error(&rule_with("\"*\"", &format!("\"{sel}\""), "\"any\""));
        assert!(d.message.contains(sel), "{}", d.message);
        assert!(d.message.contains("port"), "{}", d.message);
    }
}

#[test]
fn the_renderer_points_at_the_offending_text() {
    let src = rule_with("\"*\"", "\"*\"", "\"tcp:0\"");
    let Err(err) = Policy::parse(&src) else {
        panic!("accepted")
    };

    let text = render_diagnostics(&src, "policy.toml", &err.diagnostics);

    let want = "error: port 0 in `tcp:0` is out of range: ports are 1 to 65535\n \
                --> policy.toml:4:10\n  |\n4 | ports = [\"tcp:0\"]\n  |          ^^^^^^^\n";
    assert_eq!(text.trim_end(), want.trim_end(), "\n{text}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let src = "[groups]\n# café\n\"é\" = [\"tag:x\"]\n[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    let d = error(src);
    assert_eq!((d.line, d.column, d.text.as_str()), (3, 1, "\"é\""));
    let text = render_diagnostics(src, "p.toml", &[d]);
    assert!(
        text.contains("3 | \"é\" = [\"tag:x\"]\n  | ^^^\n"),
        "{text}"
    );
}

#[test]
fn garbage_never_panics() {
    for src in [
        "\u{0}",
        "[[",
        "a = 1",
        "[groups]\nx = 5",
        "[[test]]\nfrom = 1",
        "grant = 3",
        "\u{feff}[[grant]]",
    ] {
        let _ = Policy::parse(src);
    }
}

#[test]
fn deep_or_wide_group_graphs_are_refused_or_expanded_without_blowing_up() {
    // A chain deeper than the limit is an error, not a stack overflow.
    let mut deep = String::from("[groups]\n");
    for i in 0..5000 {
        deep += &format!("g{i} = [\"group:g{}\", \"tag:t{i}\"]\n", i + 1);
    }
    deep += "g5000 = [\"tag:end\"]\n";
    deep += &rule_with("\"group:g0\"", "\"*\"", "\"any\"");
    let errs = errors(&deep);
    assert!(
        errs.iter()
            .any(|d| d.message.contains("nested more than 32")),
        "{:?}",
        errs.first()
    );

    // A diamond that doubles at every level expands once per group.
    let mut wide = String::from("[groups]\n");
    for i in 0..30 {
        wide += &format!(
            "d{i} = [\"group:d{}\", \"group:e{}\"]\ne{i} = [\"group:d{}\"]\n",
            i + 1,
            i,
            i + 1
        );
    }
    wide += "d30 = [\"tag:leaf\"]\n";
    wide += &rule_with("\"group:d0\"", "\"*\"", "\"any\"");
    let checked = parse(&wide);
    assert!(
        checked.warnings.is_empty(),
        "{:?}",
        checked.warnings.first()
    );
}
