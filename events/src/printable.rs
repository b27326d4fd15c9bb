//! Wire text made safe for a log line, a span field or a metric: whatever
//! a publisher put in an attribute (a subject, a correlation id, a routing
//! key in a header) comes out with its control characters escaped and its
//! length bounded, so it can neither forge lines, move a terminal's cursor
//! nor grow without limit.

use std::borrow::Cow;

use crate::codec::MAX_ATTRIBUTE_LEN;

/// `text` with every control character (C0, DEL, C1: newlines, escape
/// sequences, carriage returns) written as a Rust escape (`\n`,
/// `\u{1b}`), cut to [`MAX_ATTRIBUTE_LEN`] bytes at a character boundary
/// (ending in `…` when cut). Borrowed when nothing needed changing, which
/// is the usual case.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_ATTRIBUTE_LEN && !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_ATTRIBUTE_LEN + 4));
    for c in text.chars() {
        let piece: Cow<'_, str> = if c.is_control() {
            Cow::Owned(c.escape_default().to_string())
        } else {
            Cow::Owned(c.to_string())
        };
        if out.len() + piece.len() > MAX_ATTRIBUTE_LEN {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_as_it_is() {
        assert!(matches!(
            printable("order.placed"),
            Cow::Borrowed("order.placed")
        ));
        assert_eq!(printable("ünïcode ok"), "ünïcode ok");
    }

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        assert_eq!(
            printable("a\nb\u{1b}[31m\r\u{7f}\u{85}"),
            "a\\nb\\u{1b}[31m\\r\\u{7f}\\u{85}"
        );
        let long = "é".repeat(MAX_ATTRIBUTE_LEN);
        let cut = printable(&long);
        assert!(cut.len() <= MAX_ATTRIBUTE_LEN + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        let newlines = "\n".repeat(MAX_ATTRIBUTE_LEN);
        assert!(!printable(&newlines).contains('\n'));
    }
}
