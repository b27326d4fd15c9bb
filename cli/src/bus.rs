//! Publishing from the command line: events to the exchange (or straight
//! to one service's queue), with `mandatory` and publisher confirms,
//! pipelined so long replays go at the broker's pace.

use anyhow::Context as _;
use events::Envelope;
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Connection};
use secrecy::ExposeSecret as _;
use transport::{confirm_problem, Outgoing, Publisher};

use crate::config::Settings;

/// Where a message goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// The events exchange, routing key = type.
    Exchange,
    /// A service's work queue, through the default exchange.
    Queue(String),
}

/// A confirm-mode channel to the namespace's exchange.
pub struct Bus {
    conn: Connection,
    publisher: Publisher,
    exchange: String,
    topology: transport::Topology,
}

impl Bus {
    /// Connects and enables confirms; declares the exchange (idempotent).
    pub async fn connect(settings: &Settings) -> anyhow::Result<Bus> {
        let conn = transport::connect(settings.amqp_url.expose_secret(), "warren cli").await?;
        let publisher = Publisher::open(&conn).await?;
        let topology = settings.topology();
        topology.declare_exchange(publisher.channel()).await?;
        Ok(Bus {
            conn,
            publisher,
            exchange: topology.exchange(),
            topology,
        })
    }

    /// Sends `body`; the returned confirm must be passed to [`confirmed`].
    pub async fn send(
        &self,
        target: &Target,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        let (exchange, key) = match target {
            Target::Exchange => (self.exchange.as_str(), routing_key.to_owned()),
            Target::Queue(service) => ("", self.topology.queue(service)),
        };
        let message = Outgoing {
            exchange,
            routing_key: &key,
            body,
            properties: props,
        };
        let sent = self.publisher.send([message]).await.pop();
        Ok(sent.context("the publisher sent nothing")??)
    }

    /// Sends an event with the properties the relay would give it.
    pub async fn send_event(
        &self,
        target: &Target,
        e: &Envelope,
        body: &[u8],
    ) -> anyhow::Result<PublisherConfirm> {
        let props = transport::event_properties(
            &e.id.to_string(),
            &e.event_type,
            &e.subject,
            e.correlationid.as_deref(),
            e.time.timestamp(),
            e.service(),
        );
        self.send(target, &e.event_type, body, props).await
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        transport::close(self.conn, "done").await;
    }
}

/// Waits for a confirm; a nack or an unroutable return is an error.
pub async fn confirmed(confirm: PublisherConfirm, what: &str) -> anyhow::Result<()> {
    let c = tokio::time::timeout(std::time::Duration::from_secs(15), confirm)
        .await
        .with_context(|| format!("{what}: no confirm from the broker within 15s"))??;
    match confirm_problem(Ok(c)) {
        None => Ok(()),
        Some(problem) if problem.starts_with("returned") => anyhow::bail!("{what}: unroutable, no queue is bound to it (are the services' queues declared in this namespace?)"),
        Some(problem) => anyhow::bail!("{what}: {problem}"),
    }
}
