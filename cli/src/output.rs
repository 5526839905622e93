//! Printing: aligned tables for people, pretty JSON for scripts, and times as people read them
//! ("in 23h 59m", "5m 2s ago").

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How results are printed (`--output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// The control plane's JSON, for scripts.
    Json,
}

/// Writes `text` to stdout. A closed pipe (`capmesh list | head -1`) is not an error.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let result = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes a line to stdout for a long-running command (`demo`, `up`): a closed stdout
/// (`capmesh demo | head -3`) is remembered instead of failing, so the command can stop cleanly
/// (see [`stdout_closed`]); any other write error is ignored the same way, since there is no one
/// left to tell.
pub fn line(text: &str) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let result = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if result.is_err() {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Whether a write through [`line`] found stdout closed: the reader went away.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Whether stdout gets colours and bold: a terminal, no `NO_COLOR`, no `TERM=dumb`.
pub fn colour() -> bool {
    capmesh_client::process::colour(std::io::stdout().is_terminal())
}

/// `text` in bold when stdout is coloured ([`colour`]), else as is.
pub fn bold(text: &str) -> String {
    if colour() {
        format!("\x1b[1m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Prints a value as pretty JSON and a newline.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print(&text)?;
    Ok(())
}

/// A table: a header row and rows of cells, printed with columns aligned by two spaces.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; an empty cell prints as `-` so columns stay readable.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| if c.is_empty() { "-".to_owned() } else { c })
                .collect(),
        );
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < columns {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A span in the two largest units: `42s`, `5m 2s`, `23h 59m`, `3d 4h`.
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    if d > 0 {
        two(d, "d", h, "h")
    } else if h > 0 {
        two(h, "h", m, "m")
    } else if m > 0 {
        two(m, "m", s, "s")
    } else {
        format!("{s}s")
    }
}

/// How long ago `unix` was: `5m 2s ago` (`just now` under a second; a future time reads as now).
pub fn ago(unix: i64) -> String {
    let secs = now_unix().saturating_sub(unix);
    if secs <= 0 {
        "just now".to_owned()
    } else {
        format!("{} ago", span(secs.unsigned_abs()))
    }
}

/// An expiry relative to now: `in 23h 59m`, or `expired 3m ago`.
pub fn expires(unix: i64) -> String {
    let left = unix.saturating_sub(now_unix());
    if left > 0 {
        format!("in {}", span(left.unsigned_abs()))
    } else {
        format!("expired {}", ago(unix))
    }
}

/// A time as RFC 3339 in UTC (`2026-05-01T12:00:00Z`).
pub fn rfc3339(time: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from(time)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "(out of range)".to_owned())
}

/// A Unix time as RFC 3339 in UTC.
pub fn rfc3339_unix(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Items joined with `,`, duplicates removed, in first-seen order.
pub fn join_unique<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut seen: Vec<String> = Vec::new();
    for item in items {
        let item = item.as_ref();
        if !item.is_empty() && !seen.iter().any(|s| s == item) {
            seen.push(item.to_owned());
        }
    }
    seen.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_mark_empty_cells() {
        let mut t = Table::new(&["NAME", "TAGS", "VERSION"]);
        t.row(vec!["weather".into(), "".into(), "1.2.0".into()]);
        t.row(vec!["a".into(), "fast,eu".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME     TAGS     VERSION\nweather  -        1.2.0\na        fast,eu  -\n"
        );
    }

    #[test]
    fn spans_use_the_two_largest_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(42), "42s");
        assert_eq!(span(302), "5m 2s");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(86_399), "23h 59m");
        assert_eq!(span(3 * 86_400 + 4 * 3600 + 7), "3d 4h");
        assert!(
            expires(now_unix() + 120).starts_with("in 1m") || expires(now_unix() + 120) == "in 2m"
        );
        assert!(expires(now_unix() - 120).starts_with("expired 2m"));
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(join_unique(["a", "b", "a", ""]), "a,b");
    }
}
