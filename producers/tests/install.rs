//! The installer against the real PostgreSQL (and, for the relay, the real
//! RabbitMQ): a fresh install gives a working outbox, installing again or
//! from two processes at once is harmless, only missing steps run, a schema
//! laid out by the old migrations upgrades in place with its rows, and a
//! schema a newer warren installed is refused.

use std::time::Duration;

use events::Envelope;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use testkit::sample::CustomerRegistered;
use testkit::{amqp_url, TestBus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_producers::install::{self, apply, InstallError, Part, Schema, OUTBOX};
use warren_producers::{wake, Outbox, Relay, RelayConfig};

fn registered(service: &str, subject: Uuid) -> Envelope {
    let data = CustomerRegistered {
        customer_id: subject,
        name: "Ada".into(),
        email: "ada@example.com".into(),
    };
    Envelope::new(service, subject.to_string(), &data)
}

/// Appends `e` to `schema`'s outbox in a transaction of its own; the
/// sequence it got.
async fn append(pool: &PgPool, schema: &str, e: Envelope) -> Envelope {
    let mut tx = pool.begin().await.unwrap();
    let stored = Outbox::new(schema)
        .unwrap()
        .append(&mut tx, e)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    stored
}

async fn scalar_i64(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn version(pool: &PgPool, schema: &str, part: &str) -> Option<i32> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM {schema}.warren_installed WHERE part = $1"
    ))
    .bind(part)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// The function `schema.outbox`'s `outbox_notify` trigger runs, and the
/// trigger's oid (a new one each time the trigger is created).
async fn trigger(pool: &PgPool, schema: &str) -> (String, u32) {
    let (function, oid): (String, sqlx::postgres::types::Oid) = sqlx::query_as(
        "SELECT t.tgfoid::regproc::text, t.oid FROM pg_trigger t \
         WHERE t.tgrelid = to_regclass($1) AND t.tgname = 'outbox_notify'",
    )
    .bind(format!("{schema}.outbox"))
    .fetch_one(pool)
    .await
    .unwrap();
    (function, oid.0)
}

/// Runs a relay of `schema` until every id is on the bus and its outbox is
/// empty, then stops it.
async fn relay_publishes(pool: &PgPool, bus: &TestBus, schema: &str, ids: &[Uuid]) {
    let mut tap = bus.wiretap("#").await;
    let relay = Relay::new(
        Outbox::new(schema).unwrap(),
        pool.clone(),
        amqp_url(),
        bus.topology.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let tapped = tap.collect_until_seen(ids, Duration::from_secs(20)).await;
    let seen: Vec<Uuid> = tapped.iter().map(|t| t.event.id).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "{seen:?} of {ids:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while scalar_i64(pool, &format!("SELECT count(*) FROM {schema}.outbox")).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "rows never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_fresh_install_creates_every_table_and_the_trigger_that_wakes_the_relay(pool: PgPool) {
    install::install(&pool, "customers").await.unwrap();

    assert_eq!(
        version(&pool, "customers", "outbox").await,
        Some(OUTBOX.version())
    );
    for object in [
        "customers.outbox",
        "customers.outbox_sequences",
        "customers.outbox_relay_busy",
        "customers.outbox_unpublished",
        "customers.outbox_published_at",
    ] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(object)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(exists, "{object}");
    }
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = 'customers' AND table_name = 'outbox' AND column_name = 'leased_until'"
        )
        .await,
        1
    );
    assert_eq!(trigger(&pool, "customers").await.0, "customers.outbox_wake");

    // An append wakes a listener on the channel the relay listens on.
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(&wake::channel("customers")).await.unwrap();
    let first = append(&pool, "customers", registered("customers", Uuid::now_v7())).await;
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a NOTIFY at commit")
        .unwrap();
    assert_eq!(n.channel(), "warren_outbox_customers");

    // And the relay publishes what is appended.
    let bus = TestBus::new().await;
    let second = append(&pool, "customers", registered("customers", Uuid::now_v7())).await;
    relay_publishes(&pool, &bus, "customers", &[first.id, second.id]).await;
}

#[sqlx::test(migrations = false)]
async fn installing_twice_changes_nothing(pool: PgPool) {
    install::install(&pool, "customers").await.unwrap();
    let stored = append(&pool, "customers", registered("customers", Uuid::now_v7())).await;
    let (_, oid) = trigger(&pool, "customers").await;
    let at = "SELECT extract(epoch FROM installed_at)::float8 FROM customers.warren_installed";
    let installed_at: f64 = sqlx::query_scalar(at).fetch_one(&pool).await.unwrap();

    install::install(&pool, "customers").await.unwrap();

    assert_eq!(
        trigger(&pool, "customers").await.1,
        oid,
        "no step ran again"
    );
    let again: f64 = sqlx::query_scalar(at).fetch_one(&pool).await.unwrap();
    assert_eq!(again, installed_at);
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM customers.outbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![stored.id]);
}

fn probe_table(s: &Schema) -> String {
    // No IF NOT EXISTS: running this step twice fails.
    format!("CREATE TABLE {}.probe (step int NOT NULL)", s.ident())
}

fn probe_row(s: &Schema) -> String {
    format!("INSERT INTO {}.probe VALUES (2)", s.ident())
}

#[sqlx::test(migrations = false)]
async fn only_the_missing_steps_of_a_part_run(pool: PgPool) {
    const V1: Part = Part {
        name: "probe",
        steps: &[probe_table],
    };
    const V2: Part = Part {
        name: "probe",
        steps: &[probe_table, probe_row],
    };
    apply(&pool, "shop", &V1).await.unwrap();
    assert_eq!(version(&pool, "shop", "probe").await, Some(1));
    apply(&pool, "shop", &V2).await.unwrap();
    apply(&pool, "shop", &V2).await.unwrap();
    assert_eq!(version(&pool, "shop", "probe").await, Some(2));
    assert_eq!(
        scalar_i64(&pool, "SELECT count(*) FROM shop.probe").await,
        1
    );
    // Parts are versioned apart: the outbox goes in next to the probe.
    install::install(&pool, "shop").await.unwrap();
    assert_eq!(
        version(&pool, "shop", "outbox").await,
        Some(OUTBOX.version())
    );
    assert_eq!(version(&pool, "shop", "probe").await, Some(2));
}

#[sqlx::test(migrations = false)]
async fn two_concurrent_installs_both_succeed(pool: PgPool) {
    // Two processes' pools; several schemas, so the two transactions
    // overlap on at least one of them.
    let pools: Vec<PgPool> = futures::future::join_all((0..2).map(|_| {
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for i in 0..5 {
        let schema = format!("twin{i}");
        let (a, b) = tokio::join!(
            install::install(&pools[0], &schema),
            install::install(&pools[1], &schema)
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(
            version(&pool, &schema, "outbox").await,
            Some(OUTBOX.version())
        );
        assert_eq!(
            trigger(&pool, &schema).await.0,
            format!("{schema}.outbox_wake")
        );
    }
    for p in pools {
        p.close().await;
    }
}

/// What the old migrations (`20261124000001_schemas.sql`) created for one
/// schema: the outbox without the lease column, its sequences, and a
/// trigger that always notifies. No `warren_installed`.
fn first_layout(s: &str) -> String {
    format!(
        "CREATE SCHEMA {s};
         CREATE TABLE {s}.outbox (
           position     bigserial PRIMARY KEY,
           event_id     uuid NOT NULL UNIQUE,
           aggregate    text NOT NULL,
           sequence     bigint NOT NULL,
           event_type   text NOT NULL,
           version      integer NOT NULL,
           correlation_id text,
           payload      json NOT NULL,
           created_at   timestamptz NOT NULL DEFAULT now(),
           published_at timestamptz,
           UNIQUE (aggregate, sequence)
         );
         CREATE INDEX outbox_unpublished ON {s}.outbox (position) WHERE published_at IS NULL;
         CREATE INDEX outbox_published_at ON {s}.outbox (published_at) WHERE published_at IS NOT NULL;
         CREATE TABLE {s}.outbox_sequences (
           aggregate     text PRIMARY KEY,
           last_sequence bigint NOT NULL
         );
         CREATE OR REPLACE FUNCTION public.warren_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_notify('warren_outbox_' || TG_TABLE_SCHEMA, '');
           RETURN NULL;
         END
         $$;
         CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
           FOR EACH STATEMENT EXECUTE FUNCTION public.warren_outbox_notify();"
    )
}

/// What the last old migration (`20261202000001_outbox_lease.sql`) ran on
/// every schema: the lease column, the busy flag, the skipping trigger.
const LEASE_LAYOUT: &str = r#"
CREATE OR REPLACE FUNCTION public.warren_install_outbox_wake(s text) RETURNS void
LANGUAGE plpgsql AS $install$
BEGIN
  EXECUTE format('ALTER TABLE %I.outbox ADD COLUMN IF NOT EXISTS leased_until timestamptz', s);
  EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I.outbox_relay_busy MINVALUE 0 MAXVALUE 1 START 0', s);
  PERFORM setval(format('%I.outbox_relay_busy', s)::regclass, 0, true);
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
      IF NOT EXISTS (SELECT 1 FROM added WHERE leased_until IS NULL) THEN
        RETURN NULL;
      END IF;
      PERFORM pg_advisory_xact_lock_shared(22359, hashtext(TG_TABLE_SCHEMA) & 2147483647);
      IF pg_sequence_last_value(%2$L::regclass) IS DISTINCT FROM 1 THEN
        PERFORM pg_notify(%3$L, '');
      END IF;
      RETURN NULL;
    END
    $body$$f$,
    s, format('%I.outbox_relay_busy', s), 'warren_outbox_' || s);
  EXECUTE format('DROP TRIGGER IF EXISTS outbox_notify ON %I.outbox', s);
  EXECUTE format('CREATE TRIGGER outbox_notify AFTER INSERT ON %I.outbox
                  REFERENCING NEW TABLE AS added
                  FOR EACH STATEMENT EXECUTE FUNCTION %I.outbox_wake()', s, s);
END
$install$;
"#;

#[sqlx::test(migrations = false)]
async fn a_schema_of_the_old_migrations_upgrades_in_place_and_keeps_its_rows(pool: PgPool) {
    // `customers` as the first migration left it; `orders` as the last.
    sqlx::raw_sql(&format!(
        "{}{}{LEASE_LAYOUT} SELECT public.warren_install_outbox_wake('orders');",
        first_layout("customers"),
        first_layout("orders")
    ))
    .execute(&pool)
    .await
    .unwrap();
    let subject = Uuid::now_v7();
    let mut ids = Vec::new();
    for schema in ["customers", "orders"] {
        ids.push(append(&pool, schema, registered(schema, subject)).await);
    }

    for schema in ["customers", "orders"] {
        install::install(&pool, schema).await.unwrap();
        assert_eq!(
            version(&pool, schema, "outbox").await,
            Some(OUTBOX.version())
        );
        assert_eq!(
            trigger(&pool, schema).await.0,
            format!("{schema}.outbox_wake")
        );
        // The old row is still there, unleased, and the subject's next
        // event numbers after it.
        assert_eq!(
            scalar_i64(
                &pool,
                &format!("SELECT count(*) FROM {schema}.outbox WHERE leased_until IS NULL")
            )
            .await,
            1
        );
        let next = append(&pool, schema, registered(schema, subject)).await;
        assert_eq!(next.sequence, 2);
        ids.push(next);
    }

    let bus = TestBus::new().await;
    for schema in ["customers", "orders"] {
        let of_schema: Vec<Uuid> = ids
            .iter()
            .filter(|e| e.source.ends_with(schema))
            .map(|e| e.id)
            .collect();
        relay_publishes(&pool, &bus, schema, &of_schema).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_schema_installed_by_a_newer_warren_is_refused(pool: PgPool) {
    install::install(&pool, "customers").await.unwrap();
    sqlx::query("UPDATE customers.warren_installed SET version = 99 WHERE part = 'outbox'")
        .execute(&pool)
        .await
        .unwrap();

    let err = install::install(&pool, "customers").await.unwrap_err();
    assert!(
        matches!(
            err,
            InstallError::TooNew { installed: 99, known, part: "outbox", .. } if known == OUTBOX.version()
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for needle in [
        "customers",
        "outbox",
        "version 99",
        &format!("up to {}", OUTBOX.version()),
    ] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    assert_eq!(version(&pool, "customers", "outbox").await, Some(99));
}

#[tokio::test]
async fn a_bad_schema_name_is_refused_before_any_sql() {
    // Nothing listens there: any statement would fail to connect instead.
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let err = install::install(&pool, "x; DROP SCHEMA public")
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::BadSchema(_)), "{err:?}");
    assert!(
        err.to_string().contains("\"x; DROP SCHEMA public\""),
        "{err}"
    );
}
