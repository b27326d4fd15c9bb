//! Writing to the terminal as command-line tools are expected to: colour
//! only where it is wanted (`--color`, `NO_COLOR`, `CLICOLOR_FORCE`, a
//! terminal: decided by `anstream`, the crate clap itself uses), a closed
//! pipe (`warren tail | head -1`) ending the command quietly with 0
//! instead of a panic, and text from the wire escaped before it reaches a
//! terminal.

use std::io::Write as _;

use anstyle::{AnsiColor, Style};

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorWhen {
    /// On a terminal, unless `NO_COLOR` is set.
    #[default]
    Auto,
    /// Always, even into a pipe.
    Always,
    /// Never.
    Never,
}

impl ColorWhen {
    /// Makes the choice global: every [`Out`], and the log lines, follow it.
    pub fn apply(self) {
        match self {
            ColorWhen::Auto => {}
            ColorWhen::Always => anstream::ColorChoice::Always.write_global(),
            ColorWhen::Never => anstream::ColorChoice::Never.write_global(),
        }
    }
}

/// Whether output to standard error gets colours (the log lines).
pub fn stderr_colored() -> bool {
    anstream::AutoStream::choice(&std::io::stderr()) != anstream::ColorChoice::Never
}

/// The reader of standard output went away: not a failure, the command
/// ends with exit code 0 (see `main.rs`).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct ClosedPipe;

/// Standard output, one line at a time, ANSI styles kept or stripped as
/// the colour choice says.
pub struct Out(anstream::AutoStream<std::io::Stdout>);

impl Out {
    /// Standard output.
    pub fn stdout() -> Out {
        Out(anstream::AutoStream::auto(std::io::stdout()))
    }

    /// Writes `s` and a newline; a closed pipe is [`ClosedPipe`].
    pub fn line(&mut self, s: &str) -> anyhow::Result<()> {
        let written = writeln!(self.0, "{s}").and_then(|()| self.0.flush());
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedPipe.into()),
            Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
        }
    }
}

impl Out {
    /// Writes `bytes` as they are (a completion script).
    pub fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match self.0.write_all(bytes).and_then(|()| self.0.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedPipe.into()),
            Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
        }
    }
}

/// Writes one line to standard output (see [`Out::line`]).
pub fn line(s: &str) -> anyhow::Result<()> {
    Out::stdout().line(s)
}

/// Writes one line to standard error, styles stripped unless wanted; a
/// closed standard error is ignored (nothing else could report it).
pub fn eline(s: &str) {
    let mut e = anstream::AutoStream::auto(std::io::stderr());
    let _ = writeln!(e, "{s}");
}

/// `s` in `color`, bold when asked (stripped by [`Out`] when colour is off).
pub fn paint(s: &str, color: AnsiColor, bold: bool) -> String {
    let mut style = Style::new().fg_color(Some(color.into()));
    if bold {
        style = style.bold();
    }
    format!("{style}{s}{style:#}")
}

/// `s` dimmed.
pub fn dim(s: &str) -> String {
    let style = Style::new().dimmed();
    format!("{style}{s}{style:#}")
}

/// `s` with control characters (escape sequences, newlines) shown as
/// escapes: names and reasons come from the wire and must not drive the
/// terminal or split a line.
pub fn escape(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_control_characters_only() {
        assert_eq!(escape("order.placed é"), "order.placed é");
        assert_eq!(escape("a\x1b[31mb\nc"), "a\\u{1b}[31mb\\nc");
    }
}
