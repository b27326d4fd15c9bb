//! What a handler is given and what it may return.

use events::{Envelope, EventData};
use producers::{Outbox, OutboxError};
use sqlx::PgConnection;

/// Handles events of type `E` for one service.
///
/// Runs inside the transaction that records the event in the inbox: every
/// change made through `ctx.tx` commits together with that record, or not
/// at all. Must not wait on anything unbounded (the runtime applies a
/// timeout and treats it as transient).
#[async_trait::async_trait]
pub trait Handle<E: EventData>: Send + Sync + 'static {
    /// Applies `data` (the event's payload, already validated and upcast).
    async fn handle(&self, ctx: &mut Context<'_>, data: E) -> Result<(), HandleError>;
}

/// Handles a run of events of type `E` at once: for handlers whose work is
/// cheaper set-based, one multi-row statement instead of one per event
/// (a projection, a sink). Registered with [`crate::Router::on_batch`].
///
/// The runtime hands it consecutive events of one type from a lane's
/// batch, in per-subject order, inside the transaction that records them in
/// the inbox. If it fails, the whole transaction is rolled back and each
/// event is applied again alone (a run of one), so the error lands on the
/// event that causes it: a batch handler must apply all of its events or
/// fail, and must give the same answer for an event alone as in a run.
#[async_trait::async_trait]
pub trait HandleBatch<E: EventData>: Send + Sync + 'static {
    /// Applies `events` (envelope and validated payload of each, in order).
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<(&Envelope, E)>,
    ) -> Result<(), HandleError>;
}

/// Runs once per transaction, before any handler, with every event the
/// handlers of that transaction are about to get (in the order they will
/// get them). Registered with [`crate::Router::prepare`].
///
/// It is there for locks: a lane applies a batch of events in one
/// transaction, and handlers that each lock rows in a sorted order still
/// take them in no common order across a batch (the first event locks B,
/// the next A), so two batches can deadlock. A preparer that locks every
/// row the whole transaction will touch, sorted, once, rules that out.
/// It must not change the store in ways the handlers do not expect: if
/// the transaction fails, each event is applied again alone, with the
/// preparer run again for that one event.
#[async_trait::async_trait]
pub trait Prepare: Send + Sync + 'static {
    /// Prepares `tx` for `events` (envelopes only: decode what you need
    /// with [`Envelope::data_as`]).
    async fn prepare(&self, tx: &mut PgConnection, events: &[&Envelope])
        -> Result<(), HandleError>;
}

/// A batch handler's view of the transaction it runs in.
pub struct Batch<'a> {
    /// The open transaction: change the service's store through it.
    pub tx: &'a mut PgConnection,
    /// The service's own outbox, for follow-up events.
    pub(crate) outbox: &'a Outbox,
}

impl<'a> Batch<'a> {
    /// A batch context over an open transaction; the runtime builds these,
    /// tests may too.
    pub fn new(tx: &'a mut PgConnection, outbox: &'a Outbox) -> Self {
        Batch { tx, outbox }
    }

    /// Appends a follow-up event about `subject`, caused by `cause`, to this
    /// service's outbox in this transaction (see [`Context::emit`]).
    pub async fn emit<E: EventData>(
        &mut self,
        cause: &Envelope,
        subject: impl Into<String>,
        data: &E,
    ) -> Result<Envelope, HandleError> {
        let envelope = Envelope::new(self.outbox.service(), subject, data).caused_by(cause);
        Ok(self.outbox.append(self.tx, envelope).await?)
    }
}

/// A handler's view of the event and the transaction it runs in.
pub struct Context<'a> {
    /// The open transaction: change the service's store through it.
    pub tx: &'a mut PgConnection,
    /// The event being handled.
    pub event: &'a Envelope,
    /// The service's own outbox, for follow-up events.
    pub(crate) outbox: &'a Outbox,
}

impl<'a> Context<'a> {
    /// A context over an open transaction; the runtime builds these, tests may too.
    pub fn new(tx: &'a mut PgConnection, event: &'a Envelope, outbox: &'a Outbox) -> Self {
        Context { tx, event, outbox }
    }

    /// Appends a follow-up event about `subject` to this service's outbox,
    /// in this transaction, carrying the correlation of the event handled
    /// and naming it as the cause.
    pub async fn emit<E: EventData>(
        &mut self,
        subject: impl Into<String>,
        data: &E,
    ) -> Result<Envelope, HandleError> {
        let envelope = Envelope::new(self.outbox.service(), subject, data).caused_by(self.event);
        Ok(self.outbox.append(self.tx, envelope).await?)
    }
}

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// May succeed later (conflict, unavailable dependency): retried with
    /// delay through the broker, dead-lettered after the attempt limit.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (the event contradicts the store, a rule is
    /// broken): dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
    /// A dependency refused the call without making it (an open circuit
    /// breaker): retried with delay through the broker like a transient
    /// failure, but without spending an attempt, because the event itself
    /// has not failed; an outage longer than the retry budget must not
    /// dead-letter everything that waited it out. Still bounded: the
    /// breaker lets a probe through after each cool-down, and a failed
    /// probe spends an attempt of the event that carried it.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The service's own database is unreachable: the runtime keeps the
    /// delivery and tries again in place once it is back, without spending
    /// attempts.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl HandleError {
    /// A transient error from anything displayable.
    pub fn transient(e: impl std::fmt::Display) -> Self {
        HandleError::Transient(e.to_string())
    }

    /// A permanent error from anything displayable.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        HandleError::Permanent(e.to_string())
    }
}

/// Database errors are classified by SQLSTATE class, never by message:
/// `40` (serialization failure, deadlock) is transient, `23` (integrity
/// constraint) and the rest of the server's refusals are permanent, and
/// connection-level failures mean the database is unavailable.
impl From<sqlx::Error> for HandleError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref().map(|c| &c[..2.min(c.len())]) {
                Some("40") | Some("55") | Some("57") | Some("53") => {
                    HandleError::Transient(e.to_string())
                }
                Some("08") => HandleError::Unavailable(e.to_string()),
                _ => HandleError::Permanent(e.to_string()),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => HandleError::Unavailable(e.to_string()),
            _ => HandleError::Permanent(e.to_string()),
        }
    }
}

impl From<OutboxError> for HandleError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Database { source, .. } => source.into(),
            other => HandleError::Permanent(other.to_string()),
        }
    }
}
