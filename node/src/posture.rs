//! Posture (issue 6): what the node reports about itself on every check-in, for the
//! coordinator to judge against the policy's `[[posture]]` entries. The ztnet-node version, the
//! kernel release and the OS come from the node itself; operator facts come from a local file
//! (`--posture-file`, TOML or JSON, flat `name = value`) or a command (`--posture-command`, run
//! directly, never through a shell, with a timeout, its stdout parsed the same way).
//!
//! Facts are read again every [`PostureSource::interval`]; a change is sent at once, and the
//! current posture goes with every periodic report. A file or command that cannot be read gives
//! no operator facts and an `error` saying why, which fails any entry that requires a fact.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};
use ztnet_proto::control::{NodeMsg, Posture};

/// Most operator facts kept.
pub const MAX_FACTS: usize = 64;
/// Longest fact value kept, in bytes.
pub const MAX_VALUE: usize = 256;
/// Most bytes read from the posture file or the command's stdout.
pub const MAX_INPUT: usize = 64 * 1024;
/// How often the posture is sent even when nothing changed.
pub const RESEND: Duration = Duration::from_secs(30);

/// Where operator facts come from.
#[derive(Debug, Clone)]
pub struct PostureSource {
    /// A TOML or JSON file of `name = value` facts.
    pub file: Option<PathBuf>,
    /// A program and its arguments, run without a shell; its stdout is TOML or JSON facts.
    pub command: Vec<String>,
    /// How long the command may run.
    pub timeout: Duration,
    /// How often facts are read again.
    pub interval: Duration,
}

impl Default for PostureSource {
    fn default() -> Self {
        PostureSource {
            file: None,
            command: Vec::new(),
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(10),
        }
    }
}

static SOURCE: OnceLock<PostureSource> = OnceLock::new();

/// Sets this process's posture source (once, at start; later calls are ignored).
pub fn configure(source: PostureSource) {
    let _ = SOURCE.set(source);
}

fn source() -> PostureSource {
    SOURCE.get().cloned().unwrap_or_default()
}

/// Reads the node's posture now.
pub async fn collect(version: &str, source: &PostureSource) -> Posture {
    let mut posture = Posture {
        version: version.to_string(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        os: os_name(),
        facts: BTreeMap::new(),
        error: None,
    };
    let mut errors = Vec::new();
    if let Some(file) = &source.file {
        match read_file(file) {
            Ok(text) => match parse_facts(&text) {
                Ok(f) => posture.facts.extend(f),
                Err(e) => errors.push(format!("posture file {}: {e}", file.display())),
            },
            Err(e) => errors.push(format!("posture file {}: {e}", file.display())),
        }
    }
    if !source.command.is_empty() {
        match run_command(&source.command, source.timeout).await {
            Ok(text) => match parse_facts(&text) {
                Ok(f) => posture.facts.extend(f),
                Err(e) => errors.push(format!("posture command output: {e}")),
            },
            Err(e) => errors.push(format!("posture command {:?}: {e}", source.command[0])),
        }
    }
    if !errors.is_empty() {
        posture.facts.clear();
        posture.error = Some(errors.join("; "));
    }
    posture
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().chars().take(MAX_VALUE).collect())
        .unwrap_or_default()
}

/// `PRETTY_NAME` of `/etc/os-release` (or `/usr/lib/os-release`), else the kernel's name.
fn os_name() -> String {
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("PRETTY_NAME=") {
                return v.trim().trim_matches('"').chars().take(MAX_VALUE).collect();
            }
        }
    }
    read_trimmed("/proc/sys/kernel/ostype")
}

fn read_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_INPUT as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() > MAX_INPUT {
        return Err(format!("longer than {MAX_INPUT} bytes"));
    }
    Ok(text)
}

/// Runs the command directly (no shell), with a timeout; returns its stdout.
///
/// Reads at most [`MAX_INPUT`] bytes: a command that prints more is killed at once and
/// refused, so a chatty or broken script cannot make the daemon buffer without bound.
async fn run_command(argv: &[String], timeout: Duration) -> Result<String, String> {
    use tokio::io::AsyncReadExt;

    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("has no standard output".into());
    };
    let run = async {
        // One byte past the limit tells "exactly the limit" from "more than it".
        let mut out = Vec::new();
        let read = stdout
            .take(MAX_INPUT as u64 + 1)
            .read_to_end(&mut out)
            .await;
        read.map_err(|e| format!("cannot read its output: {e}"))?;
        if out.len() > MAX_INPUT {
            return Err(format!("printed more than {MAX_INPUT} bytes"));
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok((status, out))
    };
    let (status, out) = match tokio::time::timeout(timeout, run).await {
        Err(_) => return Err(format!("did not finish within {} s", timeout.as_secs_f32())),
        Ok(result) => result?,
    };
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    String::from_utf8(out).map_err(|_| "printed something that is not UTF-8".into())
}

/// Parses flat `name = value` facts: a JSON object or a TOML table of strings, booleans and
/// numbers. Anything else is refused with a sentence naming it.
pub fn parse_facts(text: &str) -> Result<BTreeMap<String, String>, String> {
    let trimmed = text.trim_start();
    let table: BTreeMap<String, serde_json::Value> = if trimmed.starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("not a JSON object of facts: {e}"))?
    } else {
        let t: toml::Table = toml::from_str(text).map_err(|e| {
            // The parser's message spans lines; keep it on one, after the line it is about.
            let message = e
                .message()
                .split('\n')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("not TOML facts: line {line}: {message}")
                }
                None => format!("not TOML facts: {message}"),
            }
        })?;
        t.into_iter()
            .map(|(k, v)| Ok((k, toml_to_json(v)?)))
            .collect::<Result<_, String>>()?
    };
    if table.len() > MAX_FACTS {
        return Err(format!("{} facts, at most {MAX_FACTS}", table.len()));
    }
    let mut out = BTreeMap::new();
    for (name, value) in table {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "fact name {name:?} is not valid: use letters, digits, '.', '_' and '-'"
            ));
        }
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(format!("fact {name} is not a string, boolean or number")),
        };
        if text.len() > MAX_VALUE || text.chars().any(char::is_control) {
            return Err(format!(
                "fact {name} is longer than {MAX_VALUE} bytes or holds a control character"
            ));
        }
        out.insert(name, text);
    }
    Ok(out)
}

fn toml_to_json(v: toml::Value) -> Result<serde_json::Value, String> {
    Ok(match v {
        toml::Value::String(s) => serde_json::Value::String(s),
        toml::Value::Boolean(b) => serde_json::Value::Bool(b),
        toml::Value::Integer(i) => serde_json::Value::from(i),
        toml::Value::Float(f) => serde_json::Value::String(f.to_string()),
        other => return Err(format!("a fact is a {}; facts are flat", other.type_str())),
    })
}

/// The session's posture sender: the first posture right after the hello, then a message
/// whenever the posture changes or [`RESEND`] passed.
#[derive(Debug)]
pub struct Reporter {
    version: String,
    source: PostureSource,
    last: Option<Posture>,
    next_check: Instant,
    next_send: Instant,
}

impl Reporter {
    /// A reporter for one control session.
    pub fn new(version: &str) -> Reporter {
        Reporter {
            version: version.to_string(),
            source: source(),
            last: None,
            next_check: Instant::now(),
            next_send: Instant::now(),
        }
    }

    /// The first message of the session.
    pub async fn first(&mut self) -> NodeMsg {
        let now = collect(&self.version, &self.source).await;
        self.note(&now);
        self.next_check = Instant::now() + self.source.interval;
        self.next_send = Instant::now() + RESEND;
        self.last = Some(now.clone());
        NodeMsg::Posture(now)
    }

    /// Waits for the next message to send. Cancel-safe: the deadlines live in `self`.
    pub async fn next(&mut self) -> NodeMsg {
        loop {
            tokio::time::sleep_until(self.next_check.min(self.next_send)).await;
            let now = collect(&self.version, &self.source).await;
            self.next_check = Instant::now() + self.source.interval;
            let changed = self.last.as_ref() != Some(&now);
            if changed || Instant::now() >= self.next_send {
                if changed {
                    self.note(&now);
                }
                self.next_send = Instant::now() + RESEND;
                self.last = Some(now.clone());
                return NodeMsg::Posture(now);
            }
        }
    }

    fn note(&self, now: &Posture) {
        match &now.error {
            Some(e) => warn!("posture facts not read: {e}"),
            None => info!(facts = now.facts.len(), kernel = %now.kernel, "posture read"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_names_its_line_on_one_line() {
        let err = parse_facts("a = \"on\"\ndisk = off\n").unwrap_err();
        assert!(err.starts_with("not TOML facts: line 2: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(!err.contains("stringexpected"), "{err}");
    }

    #[test]
    fn toml_and_json_facts_parse_flat() {
        let t = parse_facts("disk_encryption = \"on\"\nmanaged = true\nlevel = 3\n").unwrap();
        assert_eq!(t["disk_encryption"], "on");
        assert_eq!(t["managed"], "true");
        assert_eq!(t["level"], "3");
        let j = parse_facts("{\"disk_encryption\": \"off\", \"n\": 1.5}").unwrap();
        assert_eq!(j["disk_encryption"], "off");
        assert_eq!(j["n"], "1.5");
    }

    #[test]
    fn bad_facts_are_refused_with_a_reason() {
        assert!(
            parse_facts("[table]\nx = 1\n")
                .unwrap_err()
                .contains("flat")
        );
        assert!(
            parse_facts("{\"a b\": 1}")
                .unwrap_err()
                .contains("not valid")
        );
        assert!(
            parse_facts("{\"a\": [1]}")
                .unwrap_err()
                .contains("not a string")
        );
        assert!(parse_facts("= nope").unwrap_err().contains("not TOML"));
        let long = format!("a = \"{}\"", "x".repeat(MAX_VALUE + 1));
        assert!(parse_facts(&long).unwrap_err().contains("longer"));
    }

    #[tokio::test]
    async fn a_command_runs_without_a_shell_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let facts = dir.path().join("facts.toml");
        std::fs::write(&facts, "disk = \"on\"\n").unwrap();
        // `cat FILE; echo` as one argument: no shell splits or runs it.
        let src = PostureSource {
            command: vec![
                "cat".into(),
                format!("{}; touch {}/owned", facts.display(), dir.path().display()),
            ],
            ..PostureSource::default()
        };
        let p = collect("0.1.0", &src).await;
        assert!(p.error.is_some(), "{p:?}");
        assert!(!dir.path().join("owned").exists());

        let src = PostureSource {
            command: vec!["cat".into(), facts.display().to_string()],
            ..PostureSource::default()
        };
        let p = collect("0.1.0", &src).await;
        assert_eq!(p.facts["disk"], "on", "{p:?}");
        assert!(!p.kernel.is_empty());

        let src = PostureSource {
            command: vec!["sleep".into(), "5".into()],
            timeout: Duration::from_millis(200),
            ..PostureSource::default()
        };
        let started = std::time::Instant::now();
        let p = collect("0.1.0", &src).await;
        assert!(p.error.unwrap().contains("did not finish"));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_command_that_prints_without_end_is_cut_off_at_the_limit() {
        // `yes` prints forever: the node must stop reading at the limit, not at the timeout.
        let src = PostureSource {
            command: vec!["yes".into()],
            timeout: Duration::from_secs(30),
            ..PostureSource::default()
        };
        let started = std::time::Instant::now();
        let p = collect("0.1.0", &src).await;
        let error = p.error.expect("an endless command is refused");
        assert!(error.contains("more than"), "{error}");
        assert!(p.facts.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_file_that_goes_missing_gives_an_error_and_no_facts() {
        let dir = tempfile::tempdir().unwrap();
        let src = PostureSource {
            file: Some(dir.path().join("absent.toml")),
            ..PostureSource::default()
        };
        let p = collect("0.1.0", &src).await;
        assert!(p.facts.is_empty());
        assert!(p.error.unwrap().contains("absent.toml"));
    }
}
