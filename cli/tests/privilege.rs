//! Least privilege, TLS and secrets, against the real servers: each
//! service's PostgreSQL role and RabbitMQ user (from `warren setup`) reach
//! only what the service owns, a service runs on them, TLS is a matter of
//! the URL, and passwords stay out of every log line.
//!
//! Roles and users are cluster- and broker-global: every test names them
//! after its own random namespace and removes them, even when it fails.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use consumers::{RetryPolicy, SubscriptionConfig};
use events::{Codec, Envelope};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use producers::access::{principal, ExposeSecret as _, SecretString};
use producers::{Outbox, RelayConfig};
use services::catalog::{OrderConfirmed, ShipmentDispatched};
use services::{App, AppConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use testkit::{amqp_url, TestBus, TlsProxy, Wiretap};
use transport as broker;
use uuid::Uuid;
use warren_cli::commands::setup;

const RABBITMQCTL: &str = "rabbitmqctl";

/// Drops extra databases, then PostgreSQL roles, when the test ends,
/// however it ends.
struct PgRoles {
    admin: PgConnectOptions,
    names: Vec<String>,
    databases: Vec<String>,
}

impl Drop for PgRoles {
    fn drop(&mut self) {
        let (admin, names, dbs) = (
            self.admin.clone(),
            std::mem::take(&mut self.names),
            std::mem::take(&mut self.databases),
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut conn = PgConnection::connect_with(&admin).await.unwrap();
                for db in dbs {
                    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
                for n in names {
                    producers::access::drop_pg_role(&mut conn, &n)
                        .await
                        .unwrap();
                }
            });
        })
        .join();
    }
}

/// Deletes RabbitMQ users when the test ends, however it ends.
struct RabbitUsers(Vec<String>);

impl Drop for RabbitUsers {
    fn drop(&mut self) {
        // In parallel: each rabbitmqctl call takes over a second.
        let children: Vec<_> = self
            .0
            .iter()
            .filter_map(|u| {
                Command::new(RABBITMQCTL)
                    .args(["--quiet", "delete_user", u])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        for mut c in children {
            let _ = c.wait();
        }
    }
}

fn role_options(pool: &PgPool, role: &str, password: &SecretString) -> PgConnectOptions {
    (*pool.connect_options())
        .clone()
        .username(role)
        .password(password.expose_secret())
}

fn sqlstate(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.code().unwrap_or_default().into_owned(),
        other => panic!("expected a database error, got {other}"),
    }
}

fn random_password() -> SecretString {
    SecretString::from(format!("pw-{}", Uuid::new_v4().simple()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[sqlx::test(migrations = false)]
async fn a_service_role_reaches_its_own_schema_and_nothing_else(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let ns = format!("t{}", &Uuid::new_v4().simple().to_string()[..8]);
    let (orders, inventory) = (principal(&ns, "orders"), principal(&ns, "inventory"));
    let _cleanup = PgRoles {
        admin: (*pool.connect_options()).clone(),
        names: vec![orders.clone(), inventory.clone()],
        databases: vec![],
    };
    let pw = random_password();
    let roles = vec![
        ("orders".to_string(), orders.clone(), pw.clone()),
        ("inventory".to_string(), inventory.clone(), pw.clone()),
    ];
    setup::postgres_roles(&pool, &roles).await.unwrap();
    // Twice: the second run finds the roles and only resets passwords.
    setup::postgres_roles(&pool, &roles).await.unwrap();

    let mut conn = PgConnection::connect_with(&role_options(&pool, &orders, &pw))
        .await
        .unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, orders);

    // Its own schema: domain tables, outbox (with its sequences), inbox.
    let order = Uuid::now_v7();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO orders.customers (id, name, email) VALUES ($1, 'Ada', 'ada@example.com')",
    )
    .bind(order)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE orders.customers SET name = 'Ada L' WHERE id = $1")
        .bind(order)
        .execute(&mut *tx)
        .await
        .unwrap();
    let event = Envelope::new(
        "orders",
        order.to_string(),
        &OrderConfirmed {
            order_id: order,
            customer_id: order,
        },
    );
    Outbox::new("orders")
        .unwrap()
        .append(&mut tx, event.clone())
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders.inbox (event_id, event_type, source, subject, sequence) VALUES ($1, 't', 's', 'x', 1)")
        .bind(event.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.outbox")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    sqlx::query("DELETE FROM orders.inbox")
        .execute(&mut conn)
        .await
        .unwrap();

    // Anything else: other services' tables (their outbox too), the
    // migrations table, and schema changes even in its own schema.
    for sql in [
        "SELECT count(*) FROM inventory.stock",
        "SELECT count(*) FROM inventory.outbox",
        "SELECT count(*) FROM payments.payments",
        "INSERT INTO shipping.inbox (event_id, event_type, source, subject, sequence) VALUES (gen_random_uuid(), 't', 's', 'x', 1)",
        "DELETE FROM customers.customers",
        "SELECT count(*) FROM public._sqlx_migrations",
        "CREATE TABLE orders.sneaky (x int)",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert_eq!(sqlstate(err), "42501", "{sql} must be refused");
    }
    conn.close().await.unwrap();

    // And the other way round.
    let mut conn = PgConnection::connect_with(&role_options(&pool, &inventory, &pw))
        .await
        .unwrap();
    sqlx::query("INSERT INTO inventory.stock (sku, on_hand) VALUES ('A', 1)")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = sqlx::query("SELECT count(*) FROM orders.customers")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(err), "42501");
    conn.close().await.unwrap();
}

/// Roles are cluster-global: two databases' setups may create the same
/// role at once. The second CREATE ROLE waits on the first's uncommitted
/// row and then fails on the catalog's unique index (23505); setup must
/// take that as "exists" and carry on.
#[sqlx::test(migrations = false)]
async fn concurrent_role_creation_from_two_databases_both_succeed(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let ns = format!("t{}", &Uuid::new_v4().simple().to_string()[..8]);
    let role = principal(&ns, "shipping");
    let admin = (*pool.connect_options()).clone();
    let other_db = format!("warren_roles_{}", Uuid::new_v4().simple());
    let _cleanup = PgRoles {
        admin: admin.clone(),
        names: vec![role.clone()],
        databases: vec![other_db.clone()],
    };
    sqlx::query(&format!("CREATE DATABASE \"{other_db}\""))
        .execute(&pool)
        .await
        .unwrap();
    let other = admin.clone().database(&other_db);
    {
        let mut b = PgConnection::connect_with(&other).await.unwrap();
        sqlx::query("CREATE SCHEMA shipping")
            .execute(&mut b)
            .await
            .unwrap();
        let pw = random_password();

        // A creates the role in a transaction it keeps open.
        let mut a = PgConnection::connect_with(&admin).await.unwrap();
        let mut a_tx = a.begin().await.unwrap();
        producers::access::ensure_pg_role(&mut a_tx, &role, "shipping", &pw)
            .await
            .unwrap();
        // B tries meanwhile, and blocks on A's row.
        let b_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut b)
            .await
            .unwrap();
        let b_creates = producers::access::ensure_pg_role(&mut b, &role, "shipping", &pw);
        let a_commits_once_b_waits = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
                )
                .bind(b_pid)
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting {
                    break;
                }
                assert!(Instant::now() < deadline, "B never blocked on A's role");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            a_tx.commit().await.unwrap();
        };
        let (r, ()) = tokio::join!(b_creates, a_commits_once_b_waits);
        r.expect("the second creation takes the existing role");
        // B's grants stand in B's database.
        let usage: bool =
            sqlx::query_scalar("SELECT has_schema_privilege($1, 'shipping', 'USAGE')")
                .bind(&role)
                .fetch_one(&mut b)
                .await
                .unwrap();
        assert!(usage);
        b.close().await.unwrap();
        a.close().await.unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_service_user_reaches_its_own_queues_only_and_the_service_runs_on_its_credentials(
    pool: PgPool,
) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let topology = bus.topology.clone();
    bus.declare_service("inventory", &["order.placed"], &[])
        .await;
    let (shipping, inventory) = (
        principal(&bus.namespace, "shipping"),
        principal(&bus.namespace, "inventory"),
    );
    let _users = RabbitUsers(vec![shipping.clone(), inventory.clone()]);
    let _roles = PgRoles {
        admin: (*pool.connect_options()).clone(),
        names: vec![shipping.clone()],
        databases: vec![],
    };
    let pw = random_password();
    let users: Vec<_> = [("shipping", &shipping), ("inventory", &inventory)]
        .into_iter()
        .map(|(s, name)| producers::access::AmqpUser {
            name: name.clone(),
            password: pw.clone(),
            permissions: producers::access::AmqpPermissions::for_service(
                &topology,
                &services::catalog::catalog(),
                s,
            ),
        })
        .collect();
    setup::rabbitmq_users(RABBITMQCTL, &amqp_url(), &topology, &users)
        .await
        .unwrap();
    setup::postgres_roles(&pool, &[("shipping".into(), shipping.clone(), pw.clone())])
        .await
        .unwrap();
    let url = setup::with_user(&amqp_url(), &shipping, &pw).unwrap();

    // The whole shipping service on its own credentials: it declares its
    // queues, consumes, handles in its schema and relays what it raises.
    let subscription = SubscriptionConfig {
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            ..Default::default()
        },
        ..Default::default()
    };
    bus.remember("shipping", &subscription.retry.delays());
    let own_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(role_options(&pool, &shipping, &pw))
        .await
        .unwrap();
    let mut tap = bus.wiretap("shipment.dispatched").await;
    let app = App::start(
        own_pool,
        AppConfig {
            amqp_url: url.clone(),
            topology: topology.clone(),
            services: vec!["shipping".into()],
            http: None,
            subscription,
            relay: RelayConfig::default(),
            gateway: Default::default(),
            partitions: Default::default(),
        },
    )
    .await
    .unwrap();
    let order = Uuid::now_v7();
    let mut confirmed = Envelope::new(
        "orders",
        order.to_string(),
        &OrderConfirmed {
            order_id: order,
            customer_id: order,
        },
    );
    confirmed.sequence = 1;
    bus.channel
        .basic_publish(
            topology.exchange().into(),
            "order.confirmed".into(),
            BasicPublishOptions::default(),
            &Codec::new(services::catalog::catalog()).encode(&confirmed),
            BasicProperties::default().with_content_type(events::CONTENT_TYPE_STRUCTURED.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let got = tap
        .next(Duration::from_secs(20))
        .await
        .expect("shipment.dispatched, relayed by the restricted relay");
    assert_eq!(got.event.subject, order.to_string());
    app.stop().await;

    // As the shipping user: its own queue and the events exchange, yes.
    let conn = broker::connect(&url, "privilege test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_consume(
        topology.queue("shipping").into(),
        "own".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consume own queue");
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let dispatched = Envelope::new(
        "shipping",
        order.to_string(),
        &ShipmentDispatched {
            order_id: order,
            shipment_id: order,
        },
    );
    let confirm = pub_ch
        .basic_publish(
            topology.exchange().into(),
            "shipment.dispatched".into(),
            BasicPublishOptions::default(),
            &Codec::new(services::catalog::catalog()).encode(&dispatched),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    // Another service's queues, no; another service's event types, no.
    for queue in [topology.queue("inventory"), topology.dlq("inventory")] {
        let ch = conn.create_channel().await.unwrap();
        let err = ch
            .basic_consume(
                queue.as_str().into(),
                "theirs".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ACCESS_REFUSED"), "{queue}: {err}");
    }
    let forged = pub_ch
        .basic_publish(
            topology.exchange().into(),
            "order.placed".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await;
    let refused = match forged {
        Err(e) => e.to_string(),
        Ok(confirm) => match confirm.await {
            Err(e) => e.to_string(),
            Ok(c) => format!("{c:?}"),
        },
    };
    // The refusal closes the channel; the reason arrives with the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pub_ch.status().connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !pub_ch.status().connected(),
        "forged type accepted: {refused}"
    );
    let _ = conn.close(200, "bye".into()).await;

    // And the inventory user cannot read shipping's queue either.
    let inv = broker::connect(
        &setup::with_user(&amqp_url(), &inventory, &pw).unwrap(),
        "t",
    )
    .await
    .unwrap();
    let err = inv
        .create_channel()
        .await
        .unwrap()
        .basic_consume(
            topology.queue("shipping").into(),
            "theirs".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
    let _ = inv.close(200, "bye".into()).await;

    // The CLI on these credentials at trace level: works, and the password
    // is in none of its output.
    let out = warren_cli(
        &[
            "--namespace",
            &bus.namespace,
            "--amqp-url",
            &url,
            "publish",
            "shipment.dispatched",
            "--data",
            &serde_json::to_string(&dispatched.data).unwrap(),
            "--subject",
            &order.to_string(),
        ],
        "trace",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_no_secret(&out, pw.expose_secret());
}

fn warren_cli(args: &[&str], log: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env("RUST_LOG", log)
        .env_remove("AMQP_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

fn assert_no_secret(out: &Output, secret: &str) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "password leaked:\nstdout: {stdout}\nstderr: {stderr}"
    );
}

#[test]
fn passwords_never_reach_the_logs_of_failing_connections() {
    let secret = format!("pw{}", Uuid::new_v4().simple());
    let amqp = format!("amqp://guest:{secret}@127.0.0.1:1/%2f");
    let db = format!("postgres://postgres:{secret}@127.0.0.1:1/warren");
    for format in ["pretty", "json"] {
        for args in [
            vec!["status"],
            vec!["migrate"],
            vec!["run", "shipping", "--http", "127.0.0.1:0"],
            vec!["publish", "customer.updated", "--data", "{}"],
        ] {
            let mut all = vec![
                "--amqp-url",
                &amqp,
                "--database-url",
                &db,
                "--log-format",
                format,
            ];
            all.extend(args.iter());
            let out = warren_cli(&all, "trace");
            assert_ne!(out.status.code(), Some(0), "{args:?} must fail");
            assert!(!text(&out.stderr).contains("panicked"), "{args:?}");
            assert_no_secret(&out, &secret);
        }
    }
    // A wrong password against the real broker: refused, and not repeated.
    let amqp = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f");
    let out = warren_cli(&["--amqp-url", &amqp, "status"], "trace");
    assert_ne!(out.status.code(), Some(0));
    assert_no_secret(&out, &secret);
}

#[sqlx::test(migrations = false)]
async fn sslmode_require_in_the_url_is_enough_for_tls(pool: PgPool) {
    let o = pool.connect_options();
    let url = format!(
        "postgres://postgres:unused@127.0.0.1:{}/{}?sslmode=require",
        o.get_port(),
        o.get_database().unwrap()
    );
    // The local server has TLS on (`ssl = on`): the session is encrypted.
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "sslmode=require must give an encrypted session");
    conn.close().await.unwrap();
    let out = warren_cli(&["--database-url", &url, "migrate"], "warn");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn amqps_against_a_plain_port_is_a_clear_error() {
    // The local broker has no TLS listener: the handshake on the plain
    // port fails, and says so on one line without the password.
    let out = warren_cli(
        &[
            "--amqp-url",
            "amqps://guest:s3cretTLS@127.0.0.1:5672/%2f",
            "publish",
            "customer.updated",
            "--data",
            r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"A","email":"a@b"}"#,
        ],
        "warn",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("amqps://guest:***@127.0.0.1:5672"), "{err}");
    assert!(err.contains("is TLS enabled on that port"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("s3cretTLS"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The plain broker behind the tests' TLS proxies.
const PLAIN_BROKER: &str = "127.0.0.1:5672";

const CUSTOMER_UPDATED: &str =
    r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"A","email":"a@b"}"#;

/// The CLI from a blocking thread, so the test's TLS proxy (a task on this
/// runtime) keeps serving it.
async fn warren_cli_async(args: Vec<String>, log: &'static str) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        warren_cli(&args, log)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn amqps_with_cacertfile_carries_events_both_ways_through_a_tls_listener() {
    // The local broker has no TLS listener: the test brings its own, with
    // a CA no trust store knows, and trusts it through the URL alone.
    let bus = TestBus::new().await;
    let tls = TlsProxy::start(PLAIN_BROKER).await;
    let url = tls.amqps_url_trusting_ca("guest", "guest");

    // Receiving over TLS: a queue of ours on the namespace's exchange.
    let conn = broker::connect(&url, "tls test").await.unwrap();
    let mut tap = Wiretap::open(&conn, &bus.topology.exchange(), "customer.updated").await;
    assert_eq!(tls.handshakes(), 1);

    // Publishing over TLS: the CLI, configured by the URL only.
    let out = warren_cli_async(
        vec![
            "--namespace".into(),
            bus.namespace.clone(),
            "--amqp-url".into(),
            url.clone(),
            "publish".into(),
            "customer.updated".into(),
            "--data".into(),
            CUSTOMER_UPDATED.into(),
        ],
        "trace",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(tls.handshakes(), 2, "the CLI went through the TLS proxy");
    let id: Uuid = text(&out.stdout).trim().parse().unwrap();
    for leak in ["guest:guest", ":guest@"] {
        assert_no_secret(&out, leak);
    }

    let event = tap
        .next(Duration::from_secs(10))
        .await
        .expect("the event within 10 s")
        .event;
    assert_eq!(event.id, id);
    assert_eq!(event.event_type, "customer.updated");
    drop(tap);
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn amqps_without_a_trusted_ca_or_with_a_bad_cacertfile_is_a_clear_error() {
    let tls = TlsProxy::start(PLAIN_BROKER).await;
    let secret = format!("s3cret{}", Uuid::new_v4().simple());
    let url = tls.amqps_url("guest", &secret);
    let shown = format!("amqps://guest:***@localhost:{}/%2f", tls.addr.port());
    let publish = |url: &str| {
        vec![
            "--amqp-url".to_owned(),
            url.to_owned(),
            "publish".into(),
            "customer.updated".into(),
            "--data".into(),
            CUSTOMER_UPDATED.into(),
        ]
    };
    let one_clear_line = |out: &Output| {
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert_no_secret(out, &secret);
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };

    // No cacertfile: the system trust store does not know the test CA.
    let err = match broker::connect(&url, "tls test").await {
        Err(e @ broker::ConnectError::Untrusted { .. }) => e.to_string(),
        Err(other) => panic!("expected Untrusted, got {other}"),
        Ok(_) => panic!("a certificate from an unknown CA was accepted"),
    };
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = one_clear_line(&warren_cli_async(publish(&url), "warn").await);
    assert!(err.contains(&shown), "{err}");
    assert!(err.contains("certificate we do not trust"), "{err}");
    assert!(err.contains("?cacertfile="), "{err}");
    // And at trace level, where every layer logs, still no password.
    let out = warren_cli_async(publish(&url), "trace").await;
    assert_eq!(out.status.code(), Some(1));
    assert_no_secret(&out, &secret);
    assert_eq!(tls.handshakes(), 0, "no client may finish the handshake");

    // A cacertfile that is not there: named, before any connection.
    let missing = std::env::temp_dir().join(format!("warren-no-ca-{}.pem", Uuid::new_v4()));
    let bad = format!("{url}?cacertfile={}", missing.display());
    let err = one_clear_line(&warren_cli_async(publish(&bad), "warn").await);
    assert!(
        err.contains(&format!("cannot use cacertfile {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");

    // A cacertfile that exists but is another CA's: still not trusted.
    let other = TlsProxy::start(PLAIN_BROKER).await;
    let wrong = format!("{url}?cacertfile={}", other.ca_file.to_string_lossy());
    let err = one_clear_line(&warren_cli_async(publish(&wrong), "warn").await);
    assert!(err.contains("certificate we do not trust"), "{err}");
    assert_eq!(tls.handshakes(), 0);
}

/// A service on its own role may not migrate (no DDL): `warren run` takes
/// that for "the administrator did", and the installer, finding every part
/// up to date, asks nothing of it that the role may not do.
#[sqlx::test(migrations = false)]
async fn a_service_role_skips_migrating_and_finds_warren_installed(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let ns = format!("t{}", &Uuid::new_v4().simple().to_string()[..8]);
    let orders = principal(&ns, "orders");
    let _cleanup = PgRoles {
        admin: (*pool.connect_options()).clone(),
        names: vec![orders.clone()],
        databases: vec![],
    };
    let pw = random_password();
    setup::postgres_roles(&pool, &[("orders".into(), orders.clone(), pw.clone())])
        .await
        .unwrap();
    let own = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(role_options(&pool, &orders, &pw))
        .await
        .unwrap();

    let err = services::migrate(&own).await.unwrap_err();
    assert!(err.permission_denied(), "{err}");
    warren_cli::config::migrate_if_permitted(&own)
        .await
        .unwrap();
    producers::install::install(&own, "orders").await.unwrap();
    consumers::install::install(&own, "orders").await.unwrap();
    // Its own schema's relay flag and installed versions are within reach.
    let flag: Option<i64> =
        sqlx::query_scalar("SELECT setval('orders.outbox_relay_busy', 1, true)")
            .fetch_one(&own)
            .await
            .unwrap();
    assert_eq!(flag, Some(1));
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.warren_installed")
        .fetch_one(&own)
        .await
        .unwrap();
    assert_eq!(versions, 2);
    own.close().await;
}

/// `migrate --json` and `setup --json` from the real binary: standard
/// output is one JSON object and nothing else (logs and warnings go to
/// standard error), and no password is in either stream.
#[sqlx::test(migrations = false)]
async fn migrate_and_setup_summarise_as_one_json_object_without_passwords(pool: PgPool) {
    // `setup` declares the namespace's events exchange (its permission
    // probe); the test bus removes it when the test ends.
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let shipping = principal(&ns, "shipping");
    let _roles = PgRoles {
        admin: (*pool.connect_options()).clone(),
        names: vec![shipping.clone()],
        databases: vec![],
    };
    let _users = RabbitUsers(vec![shipping.clone()]);
    let o = pool.connect_options();
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    );
    let one_object = |out: &Output| -> serde_json::Value {
        let stdout = text(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };

    let out = warren_cli_async(
        ["--database-url", &db, "migrate", "--json"]
            .map(String::from)
            .to_vec(),
        "info",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = one_object(&out);
    assert_eq!(v["migrated"], true, "{v}");
    assert!(v["latest_version"].as_i64().is_some(), "{v}");

    let secret = format!("pw{}", Uuid::new_v4().simple());
    let (db2, ns2, secret2) = (db.clone(), ns.clone(), secret.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["--database-url", &db2, "--namespace", &ns2])
            .args(["setup", "shipping", "--json"])
            .env("WARREN_SHIPPING_PASSWORD", &secret2)
            .env("RUST_LOG", "info")
            .env_remove("AMQP_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_secret(&out, &secret);
    let v = one_object(&out);
    assert_eq!(v["namespace"], ns.as_str(), "{v}");
    assert_eq!(v["postgres_roles"][0]["role"], shipping.as_str(), "{v}");
    assert_eq!(v["postgres_roles"][0]["schema"], "shipping", "{v}");
    assert_eq!(v["rabbitmq_users"][0]["user"], shipping.as_str(), "{v}");
    assert!(v["run_example"].as_str().unwrap().contains(":***@"), "{v}");
}
