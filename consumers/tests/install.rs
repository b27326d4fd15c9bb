//! The inbox's part of the installer against the real PostgreSQL: a fresh
//! install gives a working inbox, installing again changes nothing, and a
//! schema laid out by the old migrations upgrades in place with its rows.

use events::Envelope;
use sqlx::PgPool;
use testkit::sample::OrderCancelled;
use uuid::Uuid;
use warren_consumers::inbox::{Admission, Inbox};
use warren_consumers::install::{install, INBOX};

fn event(subject: &str, sequence: i64) -> Envelope {
    let mut e = Envelope::new(
        "orders",
        subject.to_owned(),
        &OrderCancelled {
            order_id: Uuid::nil(),
            reason: "test".into(),
        },
    );
    e.sequence = sequence;
    e
}

async fn admit(pool: &PgPool, e: &Envelope) -> Admission {
    let mut tx = pool.begin().await.unwrap();
    let got = Inbox::new("shipping").admit(&mut tx, &[e]).await.unwrap();
    tx.commit().await.unwrap();
    got[0]
}

async fn version(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar("SELECT version FROM shipping.warren_installed WHERE part = 'inbox'")
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_fresh_install_gives_a_working_inbox_and_a_second_changes_nothing(pool: PgPool) {
    install(&pool, "shipping").await.unwrap();
    assert_eq!(version(&pool).await, Some(INBOX.version()));
    let first = admit(&pool, &event("a", 1)).await;
    assert_eq!(
        first,
        Admission {
            last: 1,
            admitted: true,
            new: true
        }
    );
    let at = "SELECT installed_at::text FROM shipping.warren_installed";
    let installed_at: String = sqlx::query_scalar(at).fetch_one(&pool).await.unwrap();

    install(&pool, "shipping").await.unwrap();

    let again: String = sqlx::query_scalar(at).fetch_one(&pool).await.unwrap();
    assert_eq!(again, installed_at);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping.inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[sqlx::test(migrations = false)]
async fn an_inbox_of_the_old_migrations_upgrades_in_place_and_keeps_its_rows(pool: PgPool) {
    // As `20261124000001_schemas.sql` left it: no `prev_sequence` (added
    // by `20261125000002_progress_prev.sql`), no `warren_installed`.
    sqlx::raw_sql(
        "CREATE SCHEMA shipping;
         CREATE TABLE shipping.inbox (
           event_id   uuid PRIMARY KEY,
           event_type text NOT NULL,
           source     text NOT NULL,
           subject    text NOT NULL,
           sequence   bigint NOT NULL,
           handled_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX inbox_handled_at ON shipping.inbox (handled_at);
         CREATE TABLE shipping.subject_progress (
           source        text NOT NULL,
           subject       text NOT NULL,
           last_sequence bigint NOT NULL,
           updated_at    timestamptz NOT NULL DEFAULT now(),
           PRIMARY KEY (source, subject)
         );",
    )
    .execute(&pool)
    .await
    .unwrap();
    let old = event("a", 1);
    sqlx::query(
        "INSERT INTO shipping.inbox (event_id, event_type, source, subject, sequence) VALUES ($1, $2, $3, 'a', 1)",
    )
    .bind(old.id)
    .bind(&old.event_type)
    .bind(&old.source)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO shipping.subject_progress (source, subject, last_sequence) VALUES ($1, 'a', 1)",
    )
    .bind(&old.source)
    .execute(&pool)
    .await
    .unwrap();

    install(&pool, "shipping").await.unwrap();

    assert_eq!(version(&pool).await, Some(INBOX.version()));
    let prev: i64 = sqlx::query_scalar("SELECT prev_sequence FROM shipping.subject_progress")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(prev, 0);
    // The old record still counts: a redelivery is not new, and the
    // stream continues where it stood.
    assert!(!admit(&pool, &old).await.new);
    assert_eq!(
        admit(&pool, &event("a", 2)).await,
        Admission {
            last: 2,
            admitted: true,
            new: true
        }
    );
}

/// Version 3 indexes only the correlations of events caused by another:
/// an inbox at version 2 keeps its rows, loses the full index for the
/// partial one, and from then on records a story's root without a
/// correlation (its id is the correlation).
#[sqlx::test(migrations = false)]
async fn a_version_2_inbox_upgrades_to_index_only_caused_correlations(pool: PgPool) {
    let v2 = producers::install::Part {
        name: INBOX.name,
        steps: INBOX.steps.split_at(2).0,
    };
    producers::install::apply(&pool, "shipping", &v2)
        .await
        .unwrap();
    assert_eq!(version(&pool).await, Some(2));
    // As version 2 wrote them: the root with its own id as correlation.
    let root = event("a", 1);
    let child = event("a", 2).caused_by(&root);
    for e in [&root, &child] {
        sqlx::query(
            "INSERT INTO shipping.inbox (event_id, event_type, source, subject, sequence, correlation_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(e.id)
        .bind(&e.event_type)
        .bind(&e.source)
        .bind(&e.subject)
        .bind(e.sequence)
        .bind(e.correlationid.as_deref())
        .execute(&pool)
        .await
        .unwrap();
    }

    install(&pool, "shipping").await.unwrap();

    assert_eq!(version(&pool).await, Some(INBOX.version()));
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes \
         WHERE schemaname = 'shipping' AND tablename = 'inbox' AND indexdef LIKE '%correlation_id%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(indexes.len(), 1, "{indexes:?}");
    assert_eq!(indexes[0].0, "inbox_correlation_caused");
    assert!(
        indexes[0].1.contains("WHERE (correlation_id IS NOT NULL)"),
        "{}",
        indexes[0].1
    );
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shipping.inbox WHERE coalesce(correlation_id, event_id::text) = $1",
    )
    .bind(root.id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, 2, "the rows written before keep their correlation");

    // A new root and its consequence, admitted by this version.
    let root2 = event("b", 1);
    let child2 = event("b", 2).caused_by(&root2);
    let mut tx = pool.begin().await.unwrap();
    Inbox::new("shipping")
        .admit(&mut tx, &[&root2, &child2])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let corr = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT correlation_id FROM shipping.inbox WHERE event_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(corr(root2.id).await, None, "the root's id says it");
    assert_eq!(corr(child2.id).await, Some(root2.id.to_string()));
}
