//! The inbox's one-statement admission against the real PostgreSQL: which
//! events of a batch apply, how far each stream moves, and that admitting
//! serialises the transactions touching one stream.

use std::time::Duration;

use events::Envelope;
use sqlx::{Connection, PgPool};
use testkit::sample::OrderCancelled;
use uuid::Uuid;
use warren_consumers::inbox::{Admission, Inbox};

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

fn admission(last: i64, admitted: bool, new: bool) -> Admission {
    Admission {
        last,
        admitted,
        new,
    }
}

async fn admit(pool: &PgPool, inbox: &Inbox, events: &[&Envelope]) -> Vec<Admission> {
    let mut tx = pool.begin().await.unwrap();
    let got = inbox.admit(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
    got
}

/// warren's inbox in the tests' schemas, by the library's installer.
async fn install(pool: &PgPool) {
    for schema in ["shipping", "payments"] {
        warren_consumers::install::install(pool, schema)
            .await
            .unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_batch_admits_the_run_that_continues_each_stream(pool: PgPool) {
    install(&pool).await;
    let inbox = Inbox::new("shipping");
    let (a1, a2) = (event("a", 1), event("a", 2));
    // b arrives 2 before 1: both continue the stream, so both are admitted.
    let (b2, b1) = (event("b", 2), event("b", 1));
    // c starts at 2: a gap, nothing admitted, c stays at 0.
    let c2 = event("c", 2);
    // a's 1 again in the same batch, same id: not admitted a second time.
    let a1_again = a1.clone();
    // a's 2 under another id: the first one with that sequence wins.
    let a2_other = event("a", 2);
    let got = admit(
        &pool,
        &inbox,
        &[&a1, &b2, &c2, &a2, &b1, &a1_again, &a2_other],
    )
    .await;
    assert_eq!(
        got,
        vec![
            admission(2, true, true),
            admission(2, true, true),
            admission(0, false, false),
            admission(2, true, true),
            admission(2, true, true),
            admission(2, false, false),
            admission(2, false, false),
        ]
    );

    // Next batch: a redelivered (already in the inbox) and a's 3; c's 1
    // closes c's gap together with the 2 redelivered with it; b jumps to 4.
    let (a3, c1, b4) = (event("a", 3), event("c", 1), event("b", 4));
    let got = admit(&pool, &inbox, &[&a2, &a3, &c2, &c1, &b4]).await;
    assert_eq!(
        got,
        vec![
            admission(3, false, false),
            admission(3, true, true),
            admission(2, true, true),
            admission(2, true, true),
            admission(2, false, false),
        ]
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping.inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 7, "a1 a2 a3 b1 b2 c1 c2");
}

#[sqlx::test(migrations = false)]
async fn an_admitted_id_already_in_the_inbox_is_not_new(pool: PgPool) {
    install(&pool).await;
    let inbox = Inbox::new("shipping");
    let first = event("a", 1);
    admit(&pool, &inbox, &[&first]).await;
    // The same id under the next sequence (a replay with a wrong
    // sequence): admitted by order, but the inbox knows the id.
    let mut replayed = first.clone();
    replayed.sequence = 2;
    assert_eq!(
        admit(&pool, &inbox, &[&replayed]).await,
        vec![admission(2, true, false)]
    );
}

#[sqlx::test(migrations = false)]
async fn admission_is_rolled_back_with_its_transaction(pool: PgPool) {
    install(&pool).await;
    let inbox = Inbox::new("shipping");
    let e = event("a", 1);
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        inbox.admit(&mut tx, &[&e]).await.unwrap(),
        vec![admission(1, true, true)]
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        admit(&pool, &inbox, &[&e]).await,
        vec![admission(1, true, true)],
        "a failed handler leaves the event to apply again"
    );
}

#[sqlx::test(migrations = false)]
async fn a_second_transaction_on_the_stream_waits_for_the_first(pool: PgPool) {
    install(&pool).await;
    let inbox = Inbox::new("shipping");
    let (e1, e2) = (event("a", 1), event("a", 2));
    let mut first = pool.begin().await.unwrap();
    inbox.admit(&mut first, &[&e1]).await.unwrap();

    let (pool2, inbox2, e2c) = (pool.clone(), inbox.clone(), e2.clone());
    let second = tokio::spawn(async move {
        let mut conn = pool2.acquire().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let got = inbox2.admit(&mut tx, &[&e2c]).await.unwrap();
        tx.commit().await.unwrap();
        got
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the stream's row lock holds it");
    first.commit().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        vec![admission(2, true, true)],
        "it sees the first one's progress once it gets the lock"
    );
}

/// The one-event statement (a batch of one, the usual batch under a
/// trickle) gives what the general statement gives, and writes the same
/// rows: the same pseudo-random walk of single events (streams that start
/// now and then, sequences that continue, repeat, fall behind or leave a
/// gap, sequence 0, redeliveries and ids reused under another sequence)
/// goes through each into a schema of its own.
#[sqlx::test(migrations = false)]
async fn a_batch_of_one_is_admitted_as_the_general_statement_admits_it(pool: PgPool) {
    install(&pool).await;
    let (fast, general) = (Inbox::new("shipping"), Inbox::new("payments"));
    let mut seen: Vec<Envelope> = Vec::new();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut admitted, mut duplicates, mut early, mut behind) = (0, 0, 0, 0);
    for step in 0..600 {
        let e = if !seen.is_empty() && next(5) == 0 {
            let mut again = seen[next(seen.len() as u64) as usize].clone();
            if next(3) == 0 {
                // The same id under the stream's next sequence.
                again.sequence = last.get(&again.subject).copied().unwrap_or(0) + 1;
            }
            again
        } else {
            let subject = format!("s{}", next(12) + step / 100);
            let at = last.get(&subject).copied().unwrap_or(0);
            let sequence = match next(8) {
                0 => 0,
                1 => at,
                2 => at - 1,
                3 => at + 2,
                _ => at + 1,
            };
            event(&subject, sequence.max(0))
        };
        let mut tx = pool.begin().await.unwrap();
        let one = fast.admit(&mut tx, &[&e]).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let all = general.admit_general(&mut tx, &[&e]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(one, all, "step {step}: {} #{}", e.subject, e.sequence);
        let a = one[0];
        last.insert(e.subject.clone(), a.last);
        match (a.admitted, a.new) {
            (true, true) => admitted += 1,
            (true, false) => duplicates += 1,
            _ if e.sequence > a.last => early += 1,
            _ => behind += 1,
        }
        seen.push(e);
    }
    assert!(
        admitted > 100 && duplicates > 5 && early > 20 && behind > 20,
        "the walk covers every case: {admitted} new, {duplicates} known ids, \
         {early} early, {behind} behind"
    );

    let rows = |schema: &str| {
        let pool = pool.clone();
        let progress = format!(
            "SELECT source, subject, last_sequence, prev_sequence FROM {schema}.subject_progress ORDER BY 1, 2"
        );
        let inbox = format!(
            "SELECT event_id::text, event_type, source, subject, sequence FROM {schema}.inbox ORDER BY 1"
        );
        async move {
            let p: Vec<(String, String, i64, i64)> =
                sqlx::query_as(&progress).fetch_all(&pool).await.unwrap();
            let i: Vec<(String, String, String, String, i64)> =
                sqlx::query_as(&inbox).fetch_all(&pool).await.unwrap();
            (p, i)
        }
    };
    let (fast_rows, general_rows) = (rows("shipping").await, rows("payments").await);
    assert_eq!(fast_rows, general_rows);
    assert_eq!(
        fast_rows.1.len(),
        admitted,
        "one inbox row per new admission"
    );
}

#[sqlx::test(migrations = false)]
async fn a_batch_records_each_admitted_event_with_its_own_trace_fields(pool: PgPool) {
    install(&pool).await;
    let inbox = Inbox::new("shipping");
    // Two streams interleaved, a repeated sequence (only its first event is
    // admitted) and a gap (not admitted): the trace columns, kept apart
    // from the admission's own, must still land on their own event's row.
    let spec = [("a", 1), ("b", 1), ("a", 2), ("a", 2), ("b", 2), ("a", 4)];
    let mut batch: Vec<Envelope> = Vec::new();
    for (i, (subject, sequence)) in spec.iter().enumerate() {
        let mut e = event(subject, *sequence);
        e.correlationid = Some(format!("corr-{i}"));
        e.causationid = (i % 2 == 0).then(|| format!("cause-{i}"));
        e.time = chrono::DateTime::from_timestamp(1_700_000_000 + i as i64 * 60, 0).unwrap();
        batch.push(e);
    }
    let refs: Vec<&Envelope> = batch.iter().collect();
    let skipped = [false, true, false, false, true, false];
    let mut tx = pool.begin().await.unwrap();
    let got = inbox.admit_marked(&mut tx, &refs, &skipped).await.unwrap();
    tx.commit().await.unwrap();
    let admitted: Vec<bool> = got.iter().map(|a| a.admitted).collect();
    assert_eq!(admitted, [true, true, true, false, true, false]);

    // id, correlation, causation, time, skipped
    type Row = (
        Uuid,
        Option<String>,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
        bool,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, correlation_id, causation_id, event_time, skipped \
             FROM shipping.inbox ORDER BY event_time",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<_> = [0, 1, 2, 4]
        .into_iter()
        .map(|i| {
            let e = &batch[i];
            (
                e.id,
                e.correlationid.clone(),
                e.causationid.clone(),
                e.time,
                skipped[i],
            )
        })
        .collect();
    assert_eq!(rows, expected);
}
