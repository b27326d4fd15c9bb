//! The service host with event types defined only here: an event committed
//! through one service's outbox is relayed to RabbitMQ and handled once by
//! another, its inbox holding the record.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use testkit::TestBus;
use warren::{Bus, Catalog, Context, Envelope, Handle, HandleError, Outcome, Service};

#[derive(Debug, Serialize, Deserialize)]
struct TicketOpened {
    title: String,
}
warren::event_data! {
    TicketOpened = "ticket.opened", version 1, from "helpdesk";
}

struct Triage;
#[warren::async_trait]
impl Handle<TicketOpened> for Triage {
    async fn handle(&self, ctx: &mut Context<'_>, t: TicketOpened) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO triage.tickets (subject, title) VALUES ($1, $2)")
            .bind(&ctx.event.subject)
            .bind(&t.title)
            .execute(&mut *ctx.tx)
            .await?;
        Ok(())
    }
}

#[sqlx::test(migrations = false)]
async fn an_event_type_of_the_tests_own_goes_outbox_to_broker_to_inbox_once(pool: PgPool) {
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
        // Installing again is harmless.
        service.install().await.unwrap();
        service.declare().await.unwrap();
    }
    sqlx::query("CREATE TABLE triage.tickets (subject text PRIMARY KEY, title text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let triage = triage.start().await.unwrap();
    let helpdesk = helpdesk.start().await.unwrap();

    let event = Envelope::new(
        "helpdesk",
        "T-1",
        &TicketOpened {
            title: "printer on fire".into(),
        },
    );
    let id = event.id;
    let mut tx = pool.begin().await.unwrap();
    helpdesk.outbox().append(&mut tx, event).await.unwrap();
    tx.commit().await.unwrap();

    assert!(triage.settled(1, Duration::from_secs(30)).await);
    let stats = triage.stats().unwrap();
    assert_eq!(stats.count(Outcome::Handled), 1);
    let titles: Vec<String> = sqlx::query_scalar("SELECT title FROM triage.tickets")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(titles, vec!["printer on fire".to_owned()]);
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM triage.inbox WHERE event_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    assert!(helpdesk.ready().await);
    helpdesk.stop().await;
    triage.stop().await;
}

/// Records each ticket event in the order applied.
struct Log;
#[warren::async_trait]
impl Handle<TicketOpened> for Log {
    async fn handle(&self, ctx: &mut Context<'_>, _: TicketOpened) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO sorter.log (subject, seq) VALUES ($1, $2)")
            .bind(&ctx.event.subject)
            .bind(ctx.event.sequence)
            .execute(&mut *ctx.tx)
            .await?;
        Ok(())
    }
}

#[sqlx::test(migrations = false)]
async fn a_partitioned_service_gets_each_subject_in_order_from_the_relay(pool: PgPool) {
    let test_bus = TestBus::new().await;
    let bus = Bus::new(
        testkit::amqp_url(),
        test_bus.topology.clone(),
        Catalog::new().with::<TicketOpened>(),
    );
    let sorter = Service::new("sorter", bus.clone())
        .pool(pool.clone())
        .handle::<TicketOpened, _>(Log)
        .partitions(3);
    test_bus.remember_partitioned(
        "sorter",
        3,
        &warren::SubscriptionConfig::default().retry.delays(),
    );
    let helpdesk = Service::new("helpdesk", bus).pool(pool.clone());
    for service in [&sorter, &helpdesk] {
        service.install().await.unwrap();
        service.declare().await.unwrap();
    }
    sqlx::query("CREATE TABLE sorter.log (n bigserial PRIMARY KEY, subject text, seq bigint)")
        .execute(&pool)
        .await
        .unwrap();
    let sorter = sorter.start().await.unwrap();
    let helpdesk = helpdesk.start().await.unwrap();

    // 30 tickets, 3 events each, interleaved; the outbox numbers each
    // subject's events 1, 2, 3 and the relay puts the subject header on.
    for round in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        for t in 0..30 {
            let event = Envelope::new(
                "helpdesk",
                format!("T-{t}"),
                &TicketOpened {
                    title: format!("round {round}"),
                },
            );
            helpdesk.outbox().append(&mut tx, event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    assert!(sorter.settled(90, Duration::from_secs(60)).await);
    let stats = sorter.stats().unwrap();
    assert_eq!(stats.count(Outcome::Handled), 90);
    assert_eq!(stats.count(Outcome::Deferred), 0, "nothing came early");
    let out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY subject ORDER BY n) AS prev \
         FROM sorter.log) t WHERE seq <> coalesce(prev, 0) + 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(out_of_order, 0);
    helpdesk.stop().await;
    sorter.stop().await;
}
