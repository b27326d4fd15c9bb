//! JSON Lines fixtures: one structured-mode CloudEvents document per line.
//! Blank lines and lines starting with `#` or `//` are comments. Errors name
//! the file and the line, so a broken fixture is fixed in seconds.

use std::fmt;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::{Codec, DecodeError, Envelope};

/// Longest fixture line accepted; a longer one is reported, not read whole.
pub const MAX_LINE: usize = 2 * 1024 * 1024;

/// One non-comment line of a fixture file.
#[derive(Debug, Clone)]
pub struct FixtureLine {
    /// 1-based line number in the file.
    pub line: usize,
    /// The line as written, so a deliberately broken event can be replayed
    /// byte for byte to exercise dead-lettering.
    pub raw: String,
    /// The decoded event, or why it is not one.
    pub event: Result<Envelope, FixtureError>,
}

/// A fixture that cannot be read, or one of its lines that is not an event.
#[derive(Debug, Clone, thiserror::Error)]
pub struct FixtureError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number; 0 when the file itself could not be read.
    pub line: usize,
    /// What is wrong.
    pub kind: FixtureErrorKind,
}

/// Why a fixture line or file is rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FixtureErrorKind {
    /// The file could not be opened or read.
    #[error("cannot read: {0}")]
    Io(String),
    /// The line is longer than [`MAX_LINE`].
    #[error("line of {0} bytes is longer than the maximum of {MAX_LINE}")]
    LineTooLong(usize),
    /// The line is not a valid event.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl fmt::Display for FixtureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.kind)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.kind)
        }
    }
}

/// Reads every line of a fixture file. A file that cannot be read is an
/// error; a bad line is returned in place, so callers choose to skip or stop.
pub fn read(path: &Path, codec: &Codec) -> Result<Vec<FixtureLine>, FixtureError> {
    let file = std::fs::File::open(path).map_err(|e| FixtureError {
        file: path.to_owned(),
        line: 0,
        kind: FixtureErrorKind::Io(e.to_string()),
    })?;
    parse(path, std::io::BufReader::new(file), codec)
}

/// Reads fixture lines from any reader; `path` only names them in errors.
pub fn parse(
    path: &Path,
    reader: impl BufRead,
    codec: &Codec,
) -> Result<Vec<FixtureLine>, FixtureError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let raw = line.map_err(|e| FixtureError {
            file: path.to_owned(),
            line: line_no,
            kind: FixtureErrorKind::Io(e.to_string()),
        })?;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        let event = if raw.len() > MAX_LINE {
            Err(FixtureErrorKind::LineTooLong(raw.len()))
        } else {
            codec
                .decode(trimmed.as_bytes())
                .map_err(FixtureErrorKind::from)
        }
        .map_err(|kind| FixtureError {
            file: path.to_owned(),
            line: line_no,
            kind,
        });
        out.push(FixtureLine {
            line: line_no,
            raw: trimmed.to_owned(),
            event,
        });
    }
    Ok(out)
}

/// Writes events as JSON Lines, one structured document per line.
pub fn write<'a>(
    mut out: impl Write,
    events: impl IntoIterator<Item = &'a Envelope>,
    codec: &Codec,
) -> std::io::Result<()> {
    for e in events {
        out.write_all(&codec.encode(e))?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
