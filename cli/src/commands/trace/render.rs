//! The story as text (a tree by causation) and as a Mermaid sequence
//! diagram. Every field that came from the wire (types, sources, subjects,
//! ids of other systems, reasons, errors) is escaped for the terminal in
//! text, and reduced to characters Mermaid takes literally in a diagram.

use anstyle::AnsiColor;

use super::{service_of, Node, Step, Story};
use crate::output::{dim, escape, paint};

/// `+12ms`, `+1.234s`, `+2m03s`, `+3h02m`, `+2d03h`.
pub fn offset(ms: f64) -> String {
    let ms = ms.max(0.0);
    if ms < 1000.0 {
        return format!("+{ms:.0}ms");
    }
    let s = ms / 1000.0;
    if s < 60.0 {
        return format!("+{s:.3}s");
    }
    let s = s as u64;
    match s {
        0..3600 => format!("+{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("+{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("+{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn outcome_color(outcome: &str) -> Option<AnsiColor> {
    match outcome {
        "handled" => Some(AnsiColor::Green),
        "deferred" | "retried" => Some(AnsiColor::Yellow),
        "dead-lettered" => Some(AnsiColor::Red),
        "raised" => Some(AnsiColor::Blue),
        _ => None,
    }
}

/// The story as lines of text: a heading, then each root event with its
/// steps and, indented below, the events it caused.
pub fn text(story: &Story) -> Vec<String> {
    let mut lines = vec![format!(
        "{} {} (matched by {}): {} event(s) over {}, first recorded {}{}",
        paint("trace", AnsiColor::Cyan, true),
        escape(&story.query),
        story.matched.join(", "),
        story.events,
        offset(story.duration_ms).trim_start_matches('+'),
        story.started_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
        if story.truncated {
            " (cut short: too many records)"
        } else {
            ""
        }
    )];
    for c in &story.correlation_ids {
        lines.push(format!("correlation {}", escape(c)));
    }
    let only_corr = (story.correlation_ids.len() == 1).then(|| story.correlation_ids[0].as_str());
    for root in &story.roots {
        lines.push(String::new());
        node_lines(root, "", "", "", None, only_corr, &mut lines);
    }
    lines
}

fn node_lines(
    n: &Node,
    prefix: &str,
    connector: &str,
    below: &str,
    parent_subject: Option<&str>,
    only_corr: Option<&str>,
    lines: &mut Vec<String>,
) {
    let mut head = format!(
        "{prefix}{connector}{:>8}  {}  {}",
        offset(n.offset_ms),
        paint(&escape(&n.event_type), AnsiColor::Cyan, true),
        escape(n.id.as_deref().unwrap_or("(no id)")),
    );
    if let Some(src) = &n.source {
        head.push_str(&format!("  from {}", escape(service_of(src))));
    }
    if let Some(sub) = n.subject.as_deref().filter(|s| Some(*s) != parent_subject) {
        head.push_str(&format!("  subject {}", escape(sub)));
    }
    if let Some(seq) = n.sequence {
        head.push_str(&format!("  seq {seq}"));
    }
    if let Some(t) = n.time {
        head.push_str(&format!("  time {}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")));
    }
    if let Some(c) = n
        .correlation_id
        .as_deref()
        .filter(|c| Some(*c) != only_corr)
    {
        head.push_str(&format!("  correlation {}", escape(c)));
    }
    lines.push(head);
    let bar = if n.caused.is_empty() { "   " } else { "│  " };
    for s in &n.steps {
        lines.push(format!("{below}{bar}{}", step_text(s)));
    }
    for (i, c) in n.caused.iter().enumerate() {
        let last = i + 1 == n.caused.len();
        let (conn, more) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        node_lines(
            c,
            below,
            conn,
            &format!("{below}{more}"),
            n.subject.as_deref(),
            only_corr,
            lines,
        );
    }
}

fn step_text(s: &Step) -> String {
    let mut outcome = match outcome_color(&s.outcome) {
        Some(c) => paint(&s.outcome, c, false),
        None => dim(&s.outcome),
    };
    // Padded outside the colour codes, and only when more follows, so a
    // line never ends in blanks.
    let attempt = s.attempt.filter(|&a| a > 1 || s.outcome == "retried");
    if attempt.is_some() || s.reason.is_some() || s.error.is_some() {
        outcome.push_str(&" ".repeat(13usize.saturating_sub(s.outcome.len())));
    }
    let mut line = format!(
        "{:>8}  {:<10} {outcome}",
        offset(s.offset_ms),
        escape(&s.service)
    );
    if let Some(a) = attempt {
        line.push_str(&format!(" attempt {a}"));
    }
    if let Some(r) = &s.reason {
        line.push_str(&format!(" {}", paint(&escape(r), AnsiColor::Red, false)));
    }
    if let Some(e) = &s.error {
        line.push_str(&format!(": {}", escape(e)));
    }
    line
}

/// Characters a Mermaid message, note or participant shows as they are;
/// anything else (`;`, `#`, `:`, quotes, brackets, control characters)
/// becomes `_`.
fn mm(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ._,()+-/=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A participant name: letters, digits, `_` and `-` only.
fn participant(s: &str) -> String {
    let p: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if p.is_empty() {
        "unknown".to_owned()
    } else {
        p
    }
}

/// The story as a Mermaid sequence diagram: the services as participants,
/// an arrow from the raising service to each consuming one per event
/// (`-x` for a dead letter, dotted for a duplicate, a retry or a
/// deferral), skipped deliveries left out.
pub fn mermaid(story: &Story) -> String {
    let nodes = story.walk();
    let mut participants: Vec<String> = Vec::new();
    let mut add = |p: String| {
        if !participants.contains(&p) {
            participants.push(p);
        }
    };
    for n in &nodes {
        add(participant(
            n.source.as_deref().map_or("unknown", service_of),
        ));
        for s in n.steps.iter().filter(|s| s.outcome != "skipped") {
            add(participant(&s.service));
        }
    }
    let mut out = vec![
        "sequenceDiagram".to_owned(),
        format!("    %% warren trace {}", mm(&story.query)),
    ];
    for p in &participants {
        out.push(format!("    participant {p}"));
    }
    for n in nodes {
        let from = participant(n.source.as_deref().map_or("unknown", service_of));
        let ty = mm(&n.event_type);
        let mut shown = false;
        for s in &n.steps {
            let to = participant(&s.service);
            let at = offset(s.offset_ms);
            let reason = s.reason.as_deref().map(mm).unwrap_or_default();
            let line = match s.outcome.as_str() {
                "handled" => format!("{from}->>{to}: {ty} {at}"),
                "dead-lettered" => format!("{from}-x{to}: {ty} dead-lettered {reason} {at}"),
                "retried" => format!(
                    "{from}-->>{to}: {ty} retried, attempt {} {reason} {at}",
                    s.attempt.unwrap_or(1)
                ),
                "deferred" => format!("{from}-->>{to}: {ty} deferred {reason} {at}"),
                "duplicate" => format!("{from}-->>{to}: {ty} duplicate {at}"),
                _ => continue,
            };
            out.push(format!("    {}", line.replace("  ", " ")));
            shown = true;
        }
        if !shown {
            let what = if n.steps.iter().any(|s| s.outcome == "skipped") {
                "no handler"
            } else {
                "not consumed yet"
            };
            out.push(format!("    Note over {from}: {ty} {what}"));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_read_at_a_glance() {
        assert_eq!(offset(0.4), "+0ms");
        assert_eq!(offset(12.0), "+12ms");
        assert_eq!(offset(1234.5), "+1.234s");
        assert_eq!(offset(123_000.0), "+2m03s");
        assert_eq!(offset(3.0 * 3600e3 + 120e3), "+3h02m");
        assert_eq!(offset(2.0 * 86400e3 + 3.0 * 3600e3), "+2d03h");
    }

    #[test]
    fn mermaid_text_keeps_only_literal_characters() {
        assert_eq!(mm("order.placed"), "order.placed");
        assert_eq!(mm("a;b#c:d\n\u{1b}[31m"), "a_b_c_d___31m");
        assert_eq!(participant("/evil service"), "_evil_service");
        assert_eq!(participant(""), "unknown");
    }
}
