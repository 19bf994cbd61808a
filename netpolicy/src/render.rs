//! Plain-text rendering of diagnostics and test reports against the policy source, for
//! `ztnet policy check` to print. Returns strings; prints nothing.

use std::fmt::Write as _;

use crate::{Diagnostic, Severity, TestReport};

/// Renders diagnostics against their source: severity and message, `file:line:column`, the
/// source line and a caret under the offending text.
///
/// ```text
/// error: port 0 in `tcp:0` is out of range: ports are 1 to 65535
///  --> policy.toml:7:10
///   |
/// 7 | ports = ["tcp:0"]
///   |          ^^^^^^^
/// ```
pub fn render_diagnostics(source: &str, file: &str, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    let width = diagnostics
        .iter()
        .map(|d| d.line.to_string().len())
        .max()
        .unwrap_or(1);
    for d in diagnostics {
        let severity = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let pad = " ".repeat(width);
        let _ = writeln!(out, "{severity}: {}", d.message);
        let _ = writeln!(out, "{pad}--> {file}:{}:{}", d.line, d.column);
        let Some(line) = source.lines().nth(d.line.saturating_sub(1)) else {
            out.push('\n');
            continue;
        };
        let line = line.trim_end_matches('\r');
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{:>width$} | {line}", d.line);
        let before: String = line
            .chars()
            .take(d.column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let room = line
            .chars()
            .count()
            .saturating_sub(d.column.saturating_sub(1));
        let carets = d.text.chars().count().clamp(1, room.max(1));
        let _ = writeln!(out, "{pad} | {before}{}", "^".repeat(carets));
        out.push('\n');
    }
    out
}

/// Renders a test report: one line per test, `ok` or `FAILED`, with the rule that decided, and
/// a summary line.
pub fn render_test_report(file: &str, report: &TestReport) -> String {
    let mut out = String::new();
    for r in &report.results {
        let status = if r.passed { "ok" } else { "FAILED" };
        let _ = writeln!(
            out,
            "{status:>6}  {file}:{}  {}  (decided by {})",
            r.line, r.description, r.decided_by
        );
    }
    let failed = report.results.iter().filter(|r| !r.passed).count();
    let _ = writeln!(
        out,
        "{} test(s), {} passed, {failed} failed",
        report.results.len(),
        report.results.len() - failed
    );
    out
}
