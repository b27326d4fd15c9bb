//! A handler's own log lines carry the event it handles: a tracing layer
//! of the test's own captures the line a handler logs and the fields of
//! every span around it, over the real broker and database. (One test in
//! this file: it installs the process's global subscriber.)

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use testkit::capture::Capture;
use testkit::TestBus;
use warren::{Bus, Catalog, Context, Envelope, Handle, HandleError, Service};

#[derive(Debug, Serialize, Deserialize)]
struct TicketOpened {
    title: String,
}
warren::event_data! {
    TicketOpened = "ticket.opened", version 1, from "helpdesk";
}

/// What the handler logs, to find its line among the others.
const MARK: &str = "triage looked at the ticket";

struct Triage;
#[warren::async_trait]
impl Handle<TicketOpened> for Triage {
    async fn handle(&self, _ctx: &mut Context<'_>, t: TicketOpened) -> Result<(), HandleError> {
        tracing::info!(title = %t.title, "{MARK}");
        Ok(())
    }
}

#[sqlx::test(migrations = false)]
async fn a_handlers_own_log_line_carries_the_event_id_and_correlation_it_handles(pool: PgPool) {
    let capture = Capture::install();

    let test_bus = TestBus::new().await;
    let bus = Bus::new(
        testkit::amqp_url(),
        test_bus.topology.clone(),
        Catalog::new().with::<TicketOpened>(),
    );
    let triage = Service::new("triage", bus.clone())
        .pool(pool.clone())
        .handle::<TicketOpened, _>(Triage);
    test_bus.remember(
        "triage",
        &warren::SubscriptionConfig::default().retry.delays(),
    );
    let helpdesk = Service::new("helpdesk", bus).pool(pool.clone());
    for service in [&triage, &helpdesk] {
        service.install().await.unwrap();
        service.declare().await.unwrap();
    }
    let triage = triage.start().await.unwrap();
    let helpdesk = helpdesk.start().await.unwrap();

    // A subject with a line break in it, as any publisher could send.
    let mut event = Envelope::new(
        "helpdesk",
        "T-1\n# forged",
        &TicketOpened {
            title: "printer on fire".into(),
        },
    );
    let correlation = format!("corr-{}", uuid::Uuid::now_v7());
    event.correlationid = Some(correlation.clone());
    let id = event.id.to_string();
    let mut tx = pool.begin().await.unwrap();
    helpdesk.outbox().append(&mut tx, event).await.unwrap();
    tx.commit().await.unwrap();
    assert!(triage.settled(1, Duration::from_secs(30)).await);
    helpdesk.stop().await;
    triage.stop().await;

    let captured = capture.events();
    let line = captured
        .iter()
        .find(|c| c.message == MARK)
        .unwrap_or_else(|| panic!("the handler's line was not captured: {captured:#?}"));
    let handle = line
        .span("warren.handle")
        .unwrap_or_else(|| panic!("the handler's line is in no warren.handle span: {line:?}"));
    assert_eq!(handle["event_id"], id);
    assert_eq!(handle["correlation_id"], correlation);
    assert_eq!(handle["service"], "triage");
    assert_eq!(handle["event_type"], "ticket.opened");
    assert_eq!(handle["attempt"], "1");
    // Wire text is escaped before it becomes a field.
    assert_eq!(handle["subject"], "T-1\\n# forged");
    let batch = line
        .span("warren.batch")
        .unwrap_or_else(|| panic!("the handling is in no warren.batch span: {line:?}"));
    assert_eq!(batch["service"], "triage");

    // The append ran in a span of its own naming the event.
    let appended = captured
        .iter()
        .find(|c| c.message == "appended to outbox")
        .unwrap_or_else(|| panic!("no append line: {captured:#?}"));
    let append = appended.span("warren.outbox.append").unwrap();
    assert_eq!(append["event_id"], id);
    assert_eq!(append["correlation_id"], correlation);
    // The relay published it in a span of its own.
    assert!(
        capture
            .closed()
            .iter()
            .any(|(name, f)| name == "warren.relay.publish" && f["service"] == "helpdesk"),
        "{:#?}",
        capture.closed()
    );
}
