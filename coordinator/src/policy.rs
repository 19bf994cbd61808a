//! Which policy is in force for a network. A version is in force only if it parses, validates
//! and passes its own tests. At start every network's latest stored version is checked again:
//! one that no longer validates (stored by an older build, or written into the database by
//! hand) is skipped for the newest version that still does, or for deny-all when none does,
//! and the problem is reported. Never allow-all.

use std::sync::Arc;

use netpolicy::{Diagnostic, Policy, Severity, TestReport};

use crate::store::policies::StoredPolicy;

/// The policy in force for one network.
#[derive(Debug, Clone, Default)]
pub struct Effective {
    /// Its version; 0 when none is in force (deny all).
    pub version: u64,
    /// The policy, `None` for deny-all.
    pub policy: Option<Arc<Policy>>,
}

/// A document that passed.
#[derive(Debug)]
pub struct Accepted {
    /// The policy.
    pub policy: Policy,
    /// Its warnings.
    pub warnings: Vec<Diagnostic>,
    /// Number of tests that ran.
    pub tests_passed: usize,
}

/// Why a document was refused.
#[derive(Debug)]
pub struct Refused {
    /// One sentence.
    pub message: String,
    /// The findings: validation diagnostics, or one per failed test.
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses, validates and tests a document.
pub fn check(source: &str) -> Result<Accepted, Refused> {
    let checked = match Policy::parse(source) {
        Ok(c) => c,
        Err(e) => {
            let errors = e
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            let first = e
                .diagnostics
                .iter()
                .find(|d| d.severity == Severity::Error)
                .map(|d| format!(": line {} column {}: {}", d.line, d.column, d.message))
                .unwrap_or_default();
            return Err(Refused {
                message: format!("policy refused: {errors} error(s){first}"),
                diagnostics: e.diagnostics,
            });
        }
    };
    let report = checked.policy.run_tests();
    if !report.passed() {
        return Err(failed_tests(&report));
    }
    Ok(Accepted {
        tests_passed: report.results.len(),
        policy: checked.policy,
        warnings: checked.warnings,
    })
}

/// Chooses the version in force from a network's history (newest first), with the problem
/// to report when the newest one is not usable.
pub fn choose(history: &[StoredPolicy]) -> (Effective, Option<String>) {
    let Some(latest) = history.first() else {
        return (Effective::default(), None);
    };
    let mut skipped = Vec::new();
    for stored in history {
        match check(&stored.source) {
            Ok(ok) => {
                let problem = (!skipped.is_empty()).then(|| {
                    format!(
                        "stored policy version {} no longer validates ({}); version {} is in \
                         force until a fixed policy is applied",
                        latest.version,
                        skipped.join("; "),
                        stored.version
                    )
                });
                let effective = Effective {
                    version: stored.version,
                    policy: Some(Arc::new(ok.policy)),
                };
                return (effective, problem);
            }
            Err(refused) => skipped.push(format!("v{}: {}", stored.version, refused.message)),
        }
    }
    let problem = format!(
        "no stored policy version validates ({}); denying all traffic until a valid policy is \
         applied",
        skipped.join("; ")
    );
    (Effective::default(), Some(problem))
}

fn failed_tests(report: &TestReport) -> Refused {
    let failed: Vec<_> = report.results.iter().filter(|r| !r.passed).collect();
    let diagnostics = failed
        .iter()
        .map(|r| Diagnostic {
            severity: Severity::Error,
            line: r.line,
            column: 1,
            text: r.description.clone(),
            message: format!(
                "test failed: {} (decided by {})",
                r.description, r.decided_by
            ),
        })
        .collect();
    Refused {
        message: format!(
            "policy refused: {} of {} test(s) failed",
            failed.len(),
            report.results.len()
        ),
        diagnostics,
    }
}
