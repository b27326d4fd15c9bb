//! `warren trace ID`: one story across services, after the fact.
//!
//! `ID` is an event id, a correlation id or a subject (an order's id).
//! The story is read from what the services record in their schemas:
//! each consumer's inbox rows (an event it applied or skipped, with its
//! correlation, causation and time: inbox version 2), its
//! `inbox_outcomes` (duplicates, deferrals, retries, dead letters, with
//! attempt and reason) and its outbox (events raised and not yet
//! published, or kept by `--outbox-retention-secs`). An event is in the
//! inbox of every service bound to its type, so a published event that
//! no service consumes, once its outbox row is gone, is not in the story.
//! Records older than the inbox retention (`warren run
//! --inbox-retention-days`, 7 by default) are pruned.
//!
//! Finding the story: the rows whose event id, correlation id or subject
//! is `ID` give the correlation ids; every row of those correlations is
//! the story. Its events are arranged as a tree by causation, each with
//! what every service made of it, timed from the story's first record.

mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{connect_db, Settings};
use crate::error::InvalidInput;
use crate::output::Out;

/// Most rows read per table and schema: a story is an order's saga, a few
/// dozen rows; a correlation that spans more is cut there (and says so).
const MAX_ROWS: i64 = 5000;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TraceFormat {
    /// A tree by causation, one line per event and per outcome.
    #[default]
    Text,
    /// One JSON document.
    Json,
    /// A Mermaid sequence diagram, to paste into Markdown.
    Mermaid,
}

/// Arguments of `warren trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// An event id, a correlation id or a subject (e.g. an order's id).
    pub id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TraceFormat::Text)]
    pub format: TraceFormat,
    /// Read the database `warren demo` leaves behind (`<database>_demo`).
    #[arg(long)]
    pub demo: bool,
}

/// What a service made of an event, or what its outbox says of it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    /// The service (its schema).
    pub service: String,
    /// `raised` / `published` (its outbox), or a consumer's outcome:
    /// `handled`, `skipped`, `duplicate`, `deferred`, `retried`,
    /// `dead-lettered`.
    pub outcome: String,
    /// Delivery attempt, for the outcomes kept in `inbox_outcomes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// Short reason code (retries, deferrals, dead letters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Error text (retries, deferrals, dead letters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the service recorded it.
    pub at: DateTime<Utc>,
    /// Milliseconds from the story's first record.
    pub offset_ms: f64,
}

/// One event of the story, with the events it caused.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// Event id (an undecodable message may have none).
    pub id: Option<String>,
    /// Event type (or the routing key of an undecodable message).
    #[serde(rename = "type")]
    pub event_type: String,
    /// `/warren/<service>` of the event, when known.
    pub source: Option<String>,
    /// Subject, when known.
    pub subject: Option<String>,
    /// Sequence in its (source, subject), when known.
    pub sequence: Option<i64>,
    /// The event's own `time` (a replay keeps the original one).
    pub time: Option<DateTime<Utc>>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causation id.
    pub causation_id: Option<String>,
    /// Milliseconds from the story's first record to this event's first.
    pub offset_ms: f64,
    /// What each service made of it, in time order.
    pub steps: Vec<Step>,
    /// Events it caused, in time order.
    pub caused: Vec<Node>,
}

/// The whole story.
#[derive(Debug, Clone, Serialize)]
pub struct Story {
    /// What was asked for.
    pub query: String,
    /// How it matched: any of `event`, `correlation`, `subject`.
    pub matched: Vec<&'static str>,
    /// The correlation ids the story spans.
    pub correlation_ids: Vec<String>,
    /// The story's first record.
    pub started_at: DateTime<Utc>,
    /// Milliseconds from the first record to the last.
    pub duration_ms: f64,
    /// Number of events.
    pub events: usize,
    /// Whether a table held more rows than were read (5,000 per table and schema).
    pub truncated: bool,
    /// The events no other event of the story caused, each with its tree.
    pub roots: Vec<Node>,
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &TraceArgs) -> anyhow::Result<()> {
    let settings = if args.demo {
        settings.with_database(&super::demo::database_name(settings)?)?
    } else {
        settings.clone()
    };
    let pool = connect_db(&settings, false, 2).await?;
    let story = trace(&pool, &services::ALL, &args.id).await;
    pool.close().await;
    let Some(story) = story? else {
        return Err(InvalidInput(format!(
            "nothing recorded about {:?}: no event, correlation or subject of that id in {} \
             (records are kept for the inbox retention, `warren run --inbox-retention-days`, 7 by default)",
            crate::output::escape(&args.id),
            services::ALL.join(", ")
        ))
        .into());
    };
    let mut out = Out::stdout();
    match args.format {
        TraceFormat::Json => out.line(&serde_json::to_string_pretty(&story)?),
        TraceFormat::Mermaid => out.line(&render::mermaid(&story)),
        TraceFormat::Text => {
            for line in render::text(&story) {
                out.line(&line)?;
            }
            Ok(())
        }
    }
}

/// One event as the tables know it, merged across rows.
#[derive(Debug, Default, Clone)]
struct Known {
    id: Option<String>,
    event_type: String,
    source: Option<String>,
    subject: Option<String>,
    sequence: Option<i64>,
    time: Option<DateTime<Utc>>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    steps: Vec<Step>,
}

impl Known {
    /// Fills what this row knows and the earlier ones did not.
    fn merge(&mut self, other: Known) {
        self.id = self.id.take().or(other.id);
        if self.event_type.is_empty() {
            self.event_type = other.event_type;
        }
        self.source = self.source.take().or(other.source);
        self.subject = self.subject.take().or(other.subject);
        self.sequence = self.sequence.or(other.sequence);
        self.time = self.time.or(other.time);
        self.correlation_id = self.correlation_id.take().or(other.correlation_id);
        self.causation_id = self.causation_id.take().or(other.causation_id);
        self.steps.extend(other.steps);
    }
}

type InboxRow = (
    Uuid,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    bool,
    DateTime<Utc>,
);
type OutcomeRow = (
    Option<Uuid>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    String,
    i32,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);
type OutboxRow = (
    Uuid,
    String,
    i64,
    String,
    Option<String>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// Reads the story of `id` from the schemas of `services`; `None` when
/// nothing matches.
pub async fn trace(pool: &PgPool, services: &[&str], id: &str) -> anyhow::Result<Option<Story>> {
    let as_uuid = Uuid::parse_str(id).ok();
    // 1. What matches directly: the correlations to follow, and the events
    //    without a correlation that match by id or subject.
    let mut matched = BTreeSet::new();
    let mut correlations: BTreeSet<String> = BTreeSet::new();
    let mut loose: HashSet<Uuid> = HashSet::new();
    for s in services {
        let q = format!(
            "SELECT event_id, coalesce(correlation_id, event_id::text), event_id = $2, \
               coalesce(correlation_id, event_id::text) = $1, subject = $1 \
             FROM {s}.inbox WHERE event_id = $2 OR correlation_id = $1 OR subject = $1 \
             UNION ALL \
             SELECT event_id, correlation_id, event_id = $2, correlation_id = $1, subject = $1 \
             FROM {s}.inbox_outcomes WHERE event_id = $2 OR correlation_id = $1 OR subject = $1 \
             UNION ALL \
             SELECT event_id, correlation_id, event_id = $2, correlation_id = $1, aggregate = $1 \
             FROM {s}.outbox WHERE event_id = $2 OR correlation_id = $1 OR aggregate = $1 \
             LIMIT {MAX_ROWS}"
        );
        type Hit = (
            Option<Uuid>,
            Option<String>,
            Option<bool>,
            Option<bool>,
            Option<bool>,
        );
        let hits: Vec<Hit> = sqlx::query_as(&q)
            .bind(id)
            .bind(as_uuid)
            .fetch_all(pool)
            .await
            .map_err(|e| schema_error(s, e))?;
        for (event, corr, by_id, by_corr, by_subject) in hits {
            for (yes, how) in [
                (by_id, "event"),
                (by_corr, "correlation"),
                (by_subject, "subject"),
            ] {
                if yes == Some(true) {
                    matched.insert(how);
                }
            }
            match (corr, event) {
                (Some(c), _) => {
                    correlations.insert(c);
                }
                (None, Some(e)) => {
                    loose.insert(e);
                }
                (None, None) => {}
            }
        }
    }
    if matched.is_empty() {
        return Ok(None);
    }
    // 2. Every row of those correlations (and the loose events). An inbox
    //    keeps no correlation on a story's root (inbox version 3): its id
    //    is the correlation, so the roots are read by id.
    let corrs: Vec<String> = correlations.iter().cloned().collect();
    let loose: Vec<Uuid> = loose.into_iter().collect();
    let roots: Vec<Uuid> = corrs
        .iter()
        .filter_map(|c| Uuid::parse_str(c).ok())
        .chain(loose.iter().copied())
        .collect();
    let mut events: Vec<Known> = Vec::new();
    let mut truncated = false;
    for s in services {
        let inbox: Vec<InboxRow> = sqlx::query_as(&format!(
            "SELECT event_id, event_type, source, subject, sequence, \
               coalesce(correlation_id, event_id::text), causation_id, event_time, skipped, handled_at \
             FROM {s}.inbox WHERE correlation_id = ANY($1) OR event_id = ANY($2) LIMIT {MAX_ROWS}"
        ))
        .bind(&corrs)
        .bind(&roots)
        .fetch_all(pool)
        .await
        .map_err(|e| schema_error(s, e))?;
        truncated |= inbox.len() as i64 >= MAX_ROWS;
        for (eid, ty, source, subject, seq, corr, cause, time, skipped, at) in inbox {
            events.push(Known {
                id: Some(eid.to_string()),
                event_type: ty,
                source: Some(source),
                subject: Some(subject),
                sequence: Some(seq),
                time,
                correlation_id: corr,
                causation_id: cause,
                steps: vec![step(s, if skipped { "skipped" } else { "handled" }, at)],
            });
        }
        let kept: Vec<OutcomeRow> = sqlx::query_as(&format!(
            "SELECT event_id, event_type, source, subject, correlation_id, causation_id, event_time, \
               outcome, attempt, reason, error, recorded_at \
             FROM {s}.inbox_outcomes WHERE correlation_id = ANY($1) OR event_id = ANY($2) \
             ORDER BY recorded_at LIMIT {MAX_ROWS}"
        ))
        .bind(&corrs)
        .bind(&loose)
        .fetch_all(pool)
        .await
        .map_err(|e| schema_error(s, e))?;
        truncated |= kept.len() as i64 >= MAX_ROWS;
        for (eid, ty, source, subject, corr, cause, time, outcome, attempt, reason, error, at) in
            kept
        {
            let mut st = step(s, &outcome, at);
            st.attempt = Some(attempt);
            st.reason = reason;
            st.error = error;
            events.push(Known {
                id: eid.map(|u| u.to_string()),
                event_type: ty,
                source,
                subject,
                sequence: None,
                time,
                correlation_id: corr,
                causation_id: cause,
                steps: vec![st],
            });
        }
        let outbox: Vec<OutboxRow> = sqlx::query_as(&format!(
            "SELECT event_id, aggregate, sequence, event_type, correlation_id, payload::text, \
               created_at, published_at \
             FROM {s}.outbox WHERE correlation_id = ANY($1) OR event_id = ANY($2) LIMIT {MAX_ROWS}"
        ))
        .bind(&corrs)
        .bind(&loose)
        .fetch_all(pool)
        .await
        .map_err(|e| schema_error(s, e))?;
        truncated |= outbox.len() as i64 >= MAX_ROWS;
        for (eid, aggregate, seq, ty, corr, payload, created, published) in outbox {
            // The payload is the CloudEvents document the relay publishes.
            let doc: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
            let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            let mut steps = vec![step(s, "raised", created)];
            if let Some(p) = published {
                steps.push(step(s, "published", p));
            }
            events.push(Known {
                id: Some(eid.to_string()),
                event_type: ty,
                source: text("source"),
                subject: Some(aggregate),
                sequence: Some(seq),
                time: text("time").and_then(|t| t.parse().ok()),
                correlation_id: corr,
                causation_id: text("causationid"),
                steps,
            });
        }
    }
    Ok(Some(assemble(
        id,
        matched.into_iter().collect(),
        corrs,
        events,
        truncated,
    )))
}

fn step(service: &str, outcome: &str, at: DateTime<Utc>) -> Step {
    Step {
        service: service.to_owned(),
        outcome: outcome.to_owned(),
        attempt: None,
        reason: None,
        error: None,
        at,
        offset_ms: 0.0,
    }
}

/// A query on a schema failed: most likely a schema a warren before
/// `warren trace` installed.
fn schema_error(schema: &str, e: sqlx::Error) -> anyhow::Error {
    let old = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "42703" || c == "42P01");
    let e = anyhow::Error::new(e);
    if old {
        e.context(format!(
            "schema {schema} has no trace records (a warren before `warren trace` installed it): run `warren migrate`"
        ))
    } else {
        e.context(format!("reading the trace records of schema {schema}"))
    }
}

/// Merges the rows into events and arranges them by causation.
fn assemble(
    query: &str,
    matched: Vec<&'static str>,
    correlation_ids: Vec<String>,
    rows: Vec<Known>,
    truncated: bool,
) -> Story {
    // One entry per event id; rows without an id stay on their own.
    let mut by_id: BTreeMap<String, Known> = BTreeMap::new();
    let mut anonymous: Vec<Known> = Vec::new();
    for row in rows {
        match row.id.clone() {
            Some(id) => by_id.entry(id).or_default().merge(row),
            None => anonymous.push(row),
        }
    }
    let mut all: Vec<Known> = by_id.into_values().chain(anonymous).collect();
    let started_at = all
        .iter()
        .flat_map(|k| k.steps.iter().map(|s| s.at))
        .min()
        .unwrap_or_else(Utc::now);
    let ended_at = all
        .iter()
        .flat_map(|k| k.steps.iter().map(|s| s.at))
        .max()
        .unwrap_or(started_at);
    let ms =
        |t: DateTime<Utc>| (t - started_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
    for k in &mut all {
        for s in &mut k.steps {
            s.offset_ms = ms(s.at);
        }
        k.steps
            .sort_by(|a, b| a.at.cmp(&b.at).then(a.service.cmp(&b.service)));
        k.steps.dedup();
    }
    let first = |k: &Known| k.steps.first().map_or(started_at, |s| s.at);
    all.sort_by(|a, b| first(a).cmp(&first(b)).then(a.time.cmp(&b.time)));
    let events = all.len();

    // Parent of each event: its cause, when the cause is in the story.
    let index: HashMap<String, usize> = all
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.id.clone().map(|id| (id, i)))
        .collect();
    let parent: Vec<Option<usize>> = all
        .iter()
        .enumerate()
        .map(|(i, k)| {
            k.causation_id
                .as_ref()
                .and_then(|c| index.get(c).copied())
                .filter(|&p| p != i)
        })
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); all.len()];
    for (i, p) in parent.iter().enumerate() {
        if let Some(p) = p {
            children[*p].push(i);
        }
    }
    // Roots: no cause in the story. Events in a causation cycle (only a
    // forged causation id makes one) are reached from none; each such
    // event, first in time, becomes a root of its own.
    let mut placed = vec![false; all.len()];
    let mut order: Vec<usize> = (0..all.len()).filter(|&i| parent[i].is_none()).collect();
    let mut roots = Vec::new();
    let mut i = 0;
    while i < order.len() || placed.iter().any(|p| !p) {
        let r = if i < order.len() {
            order[i]
        } else {
            let Some(r) = placed.iter().position(|p| !p) else {
                break;
            };
            order.push(r);
            r
        };
        i += 1;
        if placed[r] {
            continue;
        }
        roots.push(build(r, &all, &children, &mut placed));
    }
    Story {
        query: query.to_owned(),
        matched,
        correlation_ids,
        started_at,
        duration_ms: ms(ended_at),
        events,
        truncated,
        roots,
    }
}

fn build(i: usize, all: &[Known], children: &[Vec<usize>], placed: &mut [bool]) -> Node {
    placed[i] = true;
    let k = &all[i];
    let mut caused = Vec::new();
    for &c in &children[i] {
        if !placed[c] {
            caused.push(build(c, all, children, placed));
        }
    }
    Node {
        id: k.id.clone(),
        event_type: k.event_type.clone(),
        source: k.source.clone(),
        subject: k.subject.clone(),
        sequence: k.sequence,
        time: k.time,
        correlation_id: k.correlation_id.clone(),
        causation_id: k.causation_id.clone(),
        offset_ms: k.steps.first().map_or(0.0, |s| s.offset_ms),
        steps: k.steps.clone(),
        caused,
    }
}

impl Story {
    /// Every event of the story, depth first in tree order.
    pub fn walk(&self) -> Vec<&Node> {
        fn go<'a>(n: &'a Node, out: &mut Vec<&'a Node>) {
            out.push(n);
            for c in &n.caused {
                go(c, out);
            }
        }
        let mut out = Vec::new();
        for r in &self.roots {
            go(r, &mut out);
        }
        out
    }
}

/// The service a `source` names (`/warren/orders` → `orders`).
pub fn service_of(source: &str) -> &str {
    source.strip_prefix("/warren/").unwrap_or(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(id: &str, cause: Option<&str>, at_ms: i64) -> Known {
        let at = DateTime::from_timestamp_millis(1_700_000_000_000 + at_ms).unwrap();
        Known {
            id: Some(id.into()),
            event_type: "t".into(),
            causation_id: cause.map(Into::into),
            steps: vec![step("s", "handled", at)],
            ..Default::default()
        }
    }

    #[test]
    fn events_form_a_tree_by_causation_and_a_cycle_still_shows_every_event() {
        let story = assemble(
            "q",
            vec!["correlation"],
            vec![],
            vec![
                known("c", Some("a"), 20),
                known("a", None, 0),
                known("b", Some("a"), 10),
                known("d", Some("b"), 30),
                // A forged cycle: x causes y causes x.
                known("x", Some("y"), 40),
                known("y", Some("x"), 50),
            ],
            false,
        );
        let ids = |ns: &[Node]| ns.iter().map(|n| n.id.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(ids(&story.roots), vec!["a", "x"]);
        assert_eq!(ids(&story.roots[0].caused), vec!["b", "c"]);
        assert_eq!(ids(&story.roots[0].caused[0].caused), vec!["d"]);
        assert_eq!(ids(&story.roots[1].caused), vec!["y"]);
        assert_eq!(story.events, 6);
        assert_eq!(story.walk().len(), 6);
        assert_eq!(story.roots[0].caused[1].offset_ms, 20.0);
        assert_eq!(story.duration_ms, 50.0);
    }
}
