//! The one place that writes results to stdout: aligned tables for people, JSON for scripts.
//! Everything else (progress, notes, errors) goes to stderr.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::args::OutputFormat;

/// Prints a result in the chosen format; `render` gives the table form.
pub fn emit<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> Result<()> {
    let text = match format {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value).context("encoding JSON")?;
            s.push('\n');
            s
        }
        OutputFormat::Table => render(value),
    };
    write_stdout(&text)
}

/// Writes text to stdout as is (a broken pipe ends quietly).
pub fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// Writes to stderr like `eprint!`, but a closed stderr is not a panic (see [`write_stderr`]).
macro_rules! note {
    ($($arg:tt)*) => { $crate::output::write_stderr(format_args!($($arg)*)) };
}
pub(crate) use note;

/// Writes one line to stderr like `eprintln!`, but a closed stderr is not a panic.
macro_rules! noteln {
    ($($arg:tt)*) => {
        $crate::output::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use noteln;

/// Writes to stderr, ignoring a failed write: stderr is where a failure would be reported, so
/// a closed one leaves nobody to tell, and the exit code still says what happened.
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.flush());
}

/// A table with a header row; columns padded to the widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Starts a table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table, or `empty` when it has no rows.
    pub fn render(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == cols {
                    l.push_str(cell);
                } else {
                    l.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.header);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// Key-value lines for a `show` command, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{:<w$} {v}\n", format!("{k}:")));
    }
    out
}

/// Unix seconds as RFC 3339 UTC with a relative hint: `2026-12-04T01:00:00Z (in 59m)`.
pub fn time(unix: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    let abs = humantime::format_rfc3339_seconds(at).to_string();
    format!("{abs} ({})", relative(unix, now_unix()))
}

/// An optional time, `-` when absent.
pub fn opt_time(unix: Option<u64>) -> String {
    unix.map_or_else(|| "-".to_string(), time)
}

/// `in 5m`, `3h ago`, `now`.
pub fn relative(unix: u64, now: u64) -> String {
    let (d, future) = if unix >= now {
        (unix - now, true)
    } else {
        (now - unix, false)
    };
    if d < 1 {
        return "now".into();
    }
    let short = if d < 120 {
        format!("{d}s")
    } else if d < 7200 {
        format!("{}m", d / 60)
    } else if d < 172_800 {
        format!("{}h", d / 3600)
    } else {
        format!("{}d", d / 86_400)
    };
    if future {
        format!("in {short}")
    } else {
        format!("{short} ago")
    }
}

/// Current Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Joins displayable items with `, `, `-` when empty.
pub fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns_and_says_when_empty() {
        let mut t = Table::new(&["NAME", "ADDR"]);
        t.row(vec!["web-1".into(), "100.64.0.2".into()]);
        t.row(vec!["db".into(), "100.64.0.3".into()]);
        assert_eq!(
            t.render("none"),
            "NAME   ADDR\nweb-1  100.64.0.2\ndb     100.64.0.3\n"
        );
        assert_eq!(Table::new(&["X"]).render("no nodes"), "no nodes\n");
    }

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(100, 100), "now");
        assert_eq!(relative(160, 100), "in 60s");
        assert_eq!(relative(100, 3700), "60m ago");
        assert_eq!(relative(100_000, 100), "in 27h");
        assert_eq!(relative(1_000_000, 100), "in 11d");
    }
}
