//! JSON Lines fixtures: one structured-mode CloudEvents document per line.
//! Blank lines and lines starting with `#` or `//` are comments. Errors name
//! the file and the line, so a broken fixture is fixed in seconds.

use std::fmt;
use std::io::{BufRead, Read, Write};
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
    /// byte for byte to exercise dead-lettering; empty for a line longer
    /// than [`MAX_LINE`], which is never held whole.
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
/// A line longer than [`MAX_LINE`] is skipped through without being held
/// in memory, and reported in place.
pub fn parse(
    path: &Path,
    mut reader: impl BufRead,
    codec: &Codec,
) -> Result<Vec<FixtureLine>, FixtureError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        line_no += 1;
        let io_err = |e: std::io::Error| FixtureError {
            file: path.to_owned(),
            line: line_no,
            kind: FixtureErrorKind::Io(e.to_string()),
        };
        let Some(len) = read_line_bounded(&mut reader, &mut buf).map_err(io_err)? else {
            break;
        };
        if len > MAX_LINE {
            out.push(FixtureLine {
                line: line_no,
                raw: String::new(),
                event: Err(FixtureError {
                    file: path.to_owned(),
                    line: line_no,
                    kind: FixtureErrorKind::LineTooLong(len),
                }),
            });
            continue;
        }
        let raw = std::str::from_utf8(&buf)
            .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        let event = codec.decode(trimmed.as_bytes()).map_err(|e| FixtureError {
            file: path.to_owned(),
            line: line_no,
            kind: FixtureErrorKind::from(e),
        });
        out.push(FixtureLine {
            line: line_no,
            raw: trimmed.to_owned(),
            event,
        });
    }
    Ok(out)
}

/// Reads one line into `buf` (without its newline), keeping at most
/// [`MAX_LINE`] + 1 bytes of it; returns the line's full length, or `None`
/// at the end of input.
fn read_line_bounded(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(buf.len()));
    }
    if n <= MAX_LINE {
        return Ok(Some(n)); // last line, without a newline
    }
    // Too long: skip to the end of the line, counting, keeping nothing.
    let mut len = n;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Some(len));
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(Some(len + i));
            }
            None => {
                let k = chunk.len();
                reader.consume(k);
                len += k;
            }
        }
    }
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
