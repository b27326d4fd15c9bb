//! The transactional outbox of one service schema: events are appended in
//! the caller's transaction, so they exist if and only if the change that
//! raised them committed. The relay reads them from here.
//!
//! `sequence` is assigned per subject from `outbox_sequences`: the upsert
//! takes the subject's row lock, so a second transaction appending to the
//! same subject waits until the first commits or aborts. Sequences are
//! therefore gap-free per subject and their outbox positions follow the
//! same order, which is what lets the relay publish in position order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use events::{envelope::source_of, Envelope};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;

/// Appending to or reading the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The database refused or could not be reached.
    #[error("outbox of schema {schema}: {source}")]
    Database {
        /// The service schema whose outbox it was.
        schema: String,
        /// What the database said.
        #[source]
        source: sqlx::Error,
    },
    /// The schema name is not a plain identifier.
    #[error(
        "invalid schema name {0:?}: use 1 to {MAX_SCHEMA_LEN} lower-case letters, digits and _"
    )]
    BadSchema(String),
    /// The encoded envelope has no top-level `"sequence":0` to number
    /// (cannot happen with the envelope serde writes; see
    /// `split_at_sequence`).
    #[error("event {0}: encoded envelope has no sequence to number")]
    Encoding(uuid::Uuid),
}

/// Size and age of what is still to publish.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Rows not yet confirmed by the broker.
    pub unpublished: i64,
    /// Age of the oldest such row, in seconds.
    pub oldest_age_s: Option<f64>,
    /// Rows published and kept until retention removes them.
    pub published: i64,
}

/// The outbox of one service (its schema), with its SQL built once.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Service name; also the schema and the `source` of its events.
    service: String,
    sql: Sql,
}

#[derive(Debug, Clone)]
struct Sql {
    append: String,
    append_leased: String,
    observe: String,
    backlog: String,
    prune: String,
}

impl Outbox {
    /// The outbox of `service`, stored in the schema of the same name.
    pub fn new(service: &str) -> Result<Self, OutboxError> {
        if !valid_schema(service) {
            return Err(OutboxError::BadSchema(service.to_owned()));
        }
        let s = service;
        Ok(Outbox {
            service: service.to_owned(),
            sql: Sql {
                append: append_sql(s, false),
                append_leased: append_sql(s, true),
                observe: format!(
                    "INSERT INTO {s}.outbox_sequences AS q (aggregate, last_sequence) VALUES ($1, $2) \
                     ON CONFLICT (aggregate) DO UPDATE SET last_sequence = GREATEST(q.last_sequence, excluded.last_sequence)"
                ),
                backlog: format!(
                    "SELECT count(*) FILTER (WHERE published_at IS NULL), \
                            extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL))::float8, \
                            count(*) FILTER (WHERE published_at IS NOT NULL) \
                     FROM {s}.outbox"
                ),
                prune: format!(
                    "DELETE FROM {s}.outbox WHERE position IN ( \
                       SELECT position FROM {s}.outbox \
                       WHERE published_at IS NOT NULL AND published_at < $1 \
                       ORDER BY published_at LIMIT $2)"
                ),
            },
        })
    }

    /// The service (and schema) this outbox belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Appends `event` in the caller's transaction (pass `&mut *tx`).
    ///
    /// Assigns the next `sequence` of the event's subject and sets `source`
    /// to this service. The relay wakes at commit through the table's
    /// NOTIFY trigger. Returns the envelope as stored.
    ///
    /// ```no_run
    /// use events::{Envelope, EventData};
    /// use warren_producers::Outbox;
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct TicketOpened { ticket_id: String }
    /// impl EventData for TicketOpened {
    ///     const TYPE: &'static str = "ticket.opened";
    ///     const VERSION: u32 = 1;
    ///     const SOURCE: &'static str = "helpdesk";
    /// }
    ///
    /// # async fn open(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let outbox = Outbox::new("helpdesk")?;
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO helpdesk.tickets (id) VALUES ('T-1')")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// // Same transaction: the event exists if and only if the ticket does.
    /// let event = Envelope::new("helpdesk", "T-1", &TicketOpened { ticket_id: "T-1".into() });
    /// outbox.append(&mut tx, event).await?;
    /// tx.commit().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn append(
        &self,
        conn: &mut PgConnection,
        event: Envelope,
    ) -> Result<Envelope, OutboxError> {
        self.insert(conn, event, None).await.map(|(e, _)| e)
    }

    /// Appends `event` as [`Outbox::append`] does, leased for `lease`: the
    /// relay leaves the row alone until then, and the commit sends no
    /// NOTIFY. For [`crate::eager`], which publishes it after the commit;
    /// returns the envelope and its encoded payload as stored.
    pub async fn append_leased(
        &self,
        conn: &mut PgConnection,
        event: Envelope,
        lease: Duration,
    ) -> Result<(Envelope, String), OutboxError> {
        self.insert(conn, event, Some(lease)).await
    }

    /// Both appends, in a `warren.outbox.append` span (`service`,
    /// `event_id`, `event_type`, `subject`, `correlation_id`; the subject
    /// and correlation escaped and bounded, as they may come from the
    /// wire through a handler).
    async fn insert(
        &self,
        conn: &mut PgConnection,
        event: Envelope,
        lease: Option<Duration>,
    ) -> Result<(Envelope, String), OutboxError> {
        let span = tracing::info_span!(
            "warren.outbox.append",
            service = self.service.as_str(),
            event_id = %event.id,
            event_type = &*events::printable(&event.event_type),
            subject = &*events::printable(&event.subject),
            correlation_id = event
                .correlationid
                .as_deref()
                .map(events::printable)
                .as_deref()
                .unwrap_or(""),
        );
        self.insert_in_span(conn, event, lease)
            .instrument(span)
            .await
    }

    async fn insert_in_span(
        &self,
        conn: &mut PgConnection,
        mut event: Envelope,
        lease: Option<Duration>,
    ) -> Result<(Envelope, String), OutboxError> {
        event.source = source_of(&self.service);
        event.sequence = 0;
        let encoded = String::from_utf8(events::encode(&event)).unwrap_or_default();
        let (head, tail) = split_at_sequence(&encoded).ok_or(OutboxError::Encoding(event.id))?;
        let sql = match lease {
            None => &self.sql.append,
            Some(_) => &self.sql.append_leased,
        };
        let mut query = sqlx::query_scalar(sql)
            .bind(event.id)
            .bind(&event.subject)
            .bind(&event.event_type)
            .bind(event.dataversion as i32)
            .bind(event.correlationid.as_deref())
            .bind(head)
            .bind(tail);
        if let Some(lease) = lease {
            query = query.bind(lease.as_secs_f64());
        }
        let sequence: i64 = query.fetch_one(&mut *conn).await.map_err(|e| self.db(e))?;
        // What the database stored: the same two halves around the number.
        let payload = format!("{head}{sequence}{tail}");
        event.sequence = sequence;
        tracing::debug!(
            event_id = %event.id, event_type = event.event_type.as_str(), subject = event.subject.as_str(),
            sequence, correlation_id = event.correlationid.as_deref().unwrap_or(""),
            leased = lease.is_some(),
            "appended to outbox"
        );
        Ok((event, payload))
    }

    /// Records that an event of this service's own source with `sequence`
    /// exists elsewhere (replayed from a fixture, raised by another copy of
    /// the service), so the next append on its subject numbers after it
    /// instead of reusing its sequence.
    pub async fn observe(
        &self,
        conn: &mut PgConnection,
        subject: &str,
        sequence: i64,
    ) -> Result<(), OutboxError> {
        sqlx::query(&self.sql.observe)
            .bind(subject)
            .bind(sequence)
            .execute(conn)
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// How much is waiting to be published, and how old it is.
    pub async fn backlog(&self, pool: &PgPool) -> Result<Backlog, OutboxError> {
        let (unpublished, oldest_age_s, published): (i64, Option<f64>, i64) =
            sqlx::query_as(&self.sql.backlog)
                .fetch_one(pool)
                .await
                .map_err(|e| self.db(e))?;
        Ok(Backlog {
            unpublished,
            oldest_age_s,
            published,
        })
    }

    /// Deletes rows published more than `age` ago, `batch` rows per
    /// statement so no statement holds many locks; returns how many went.
    pub async fn prune_published(
        &self,
        pool: &PgPool,
        age: Duration,
        batch: i64,
    ) -> Result<u64, OutboxError> {
        let cutoff: DateTime<Utc> =
            Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            let n = sqlx::query(&self.sql.prune)
                .bind(cutoff)
                .bind(batch)
                .execute(pool)
                .await
                .map_err(|e| self.db(e))?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    fn db(&self, source: sqlx::Error) -> OutboxError {
        OutboxError::Database {
            schema: self.service.clone(),
            source,
        }
    }
}

/// Longest schema name: its `NOTIFY` channel ([`crate::wake::channel`])
/// must fit in PostgreSQL's 63-byte identifiers, or every append would fail
/// in the outbox trigger.
pub const MAX_SCHEMA_LEN: usize = 63 - crate::wake::CHANNEL_PREFIX.len();

/// Whether `name` may be a service schema: lower-case letters, digits and
/// `_`, so it goes into SQL text as it is, and short enough for its
/// channel. The installer checks names the same way.
pub(crate) fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SCHEMA_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The append statement of schema `s`: numbering and insert in one
/// statement, one round trip; the payload is sent in two halves around its
/// sequence, which the upsert hands to the insert. A leased append also
/// sets `leased_until` from its eighth parameter (seconds).
fn append_sql(s: &str, leased: bool) -> String {
    let (column, value) = if leased {
        (
            ", leased_until",
            ", now() + make_interval(secs => $8::float8)",
        )
    } else {
        ("", "")
    };
    format!(
        "WITH q AS ( \
           INSERT INTO {s}.outbox_sequences AS q (aggregate, last_sequence) VALUES ($2, 1) \
           ON CONFLICT (aggregate) DO UPDATE SET last_sequence = q.last_sequence + 1 \
           RETURNING last_sequence) \
         INSERT INTO {s}.outbox (event_id, aggregate, sequence, event_type, version, correlation_id, payload{column}) \
         SELECT $1, $2, q.last_sequence, $3, $4, $5, ($6 || q.last_sequence || $7)::json{value} FROM q \
         RETURNING sequence"
    )
}

/// Splits an envelope encoded with `sequence` 0 around that 0, so the
/// database can put the real number in between. The first `"sequence":`
/// of the text is the envelope's own: serde writes the fields in
/// declaration order, `sequence` before `data` and the extensions, and the
/// fields before it are strings, where a quote is escaped and so cannot
/// form `"sequence":`.
fn split_at_sequence(encoded: &str) -> Option<(&str, &str)> {
    const KEY: &str = "\"sequence\":";
    let at = encoded.find(KEY)? + KEY.len();
    let tail = encoded[at..].strip_prefix('0')?;
    tail.starts_with([',', '}']).then(|| (&encoded[..at], tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_goes_in_between_the_halves() {
        // A subject and a data field that both spell the key: only the
        // envelope's own sequence is replaced.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Renamed {
            name: String,
        }
        impl events::EventData for Renamed {
            const TYPE: &'static str = "thing.renamed";
            const VERSION: u32 = 1;
            const SOURCE: &'static str = "things";
        }
        let data = Renamed {
            name: r#"x","sequence":0,"y"#.into(),
        };
        let mut e = Envelope::new("things", r#"s"sequence":0"#, &data);
        e.sequence = 0;
        let codec = events::Codec::new(events::Catalog::new().with::<Renamed>());
        let encoded = String::from_utf8(codec.encode(&e)).unwrap();
        let (head, tail) = split_at_sequence(&encoded).unwrap();
        let decoded = codec.decode(format!("{head}42{tail}").as_bytes()).unwrap();
        assert_eq!(decoded.sequence, 42);
        assert_eq!(decoded.subject, e.subject);
        assert_eq!(decoded.data, e.data);
        assert_eq!(decoded.id, e.id);
        assert_eq!(split_at_sequence(r#"{"sequence":7}"#), None);
        assert_eq!(split_at_sequence("{}"), None);
    }
}
