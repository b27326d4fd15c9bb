//! Two services of one's own on warren: `front` raises `visitor.arrived` through its outbox;
//! `greeter` handles each once, stores a greeting and raises `visitor.greeted` for `front`.
//! Run it twice: the second run commits the same event ids again and changes nothing.
use serde::{Deserialize, Serialize};
use warren::{Bus, Catalog, Context, Envelope, Handle, HandleError, Outcome, Service};

#[derive(Serialize, Deserialize)]
struct Arrived {
    name: String,
}
#[derive(Serialize, Deserialize)]
struct Greeted {
    greeting: String,
}
warren::event_data! {
    Arrived = "visitor.arrived", version 1, from "front";
    Greeted = "visitor.greeted", version 1, from "greeter";
}

struct Greet;
#[warren::async_trait]
impl Handle<Arrived> for Greet {
    async fn handle(&self, ctx: &mut Context<'_>, v: Arrived) -> Result<(), HandleError> {
        let greeting = format!("Hello, {}!", v.name);
        sqlx::query("INSERT INTO greeter.greetings (name, text) VALUES ($1, $2)")
            .bind(&v.name)
            .bind(&greeting)
            .execute(&mut *ctx.tx)
            .await?;
        ctx.emit(v.name, &Greeted { greeting }).await?;
        Ok(())
    }
}

struct Print;
#[warren::async_trait]
impl Handle<Greeted> for Print {
    async fn handle(&self, _: &mut Context<'_>, g: Greeted) -> Result<(), HandleError> {
        println!("front handled visitor.greeted: {}", g.greeting);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::from_env(Catalog::new().with::<Arrived>().with::<Greeted>()); // AMQP_URL, …
    let db = warren::install::database_from_env().await?; // DATABASE_URL, created if missing
    let service = |name: &str| Service::new(name, bus.clone()).database_url(&db);
    let greeter = service("greeter").handle(Greet);
    let front = service("front").handle(Print);
    for service in [&greeter, &front] {
        service.install().await?; // outbox, inbox and progress tables in its own schema
        service.declare().await?; // its queue, before anything is published
    }
    let table = "CREATE TABLE IF NOT EXISTS greeter.greetings (name text PRIMARY KEY, text text)";
    sqlx::query(table).execute(&greeter.store()?).await?;
    let (greeter, front) = (greeter.start().await?, front.start().await?);
    let mut tx = front.pool().begin().await?;
    for (i, name) in ["Ada", "Grace", "Edsger"].into_iter().enumerate() {
        let mut event = Envelope::new("front", name, &Arrived { name: name.into() });
        // A fixed id (a UUID v7 of a fixed time): a second run replays the same events.
        event.id = uuid::Builder::from_unix_timestamp_millis(1 << 40, &[i as u8; 10]).into_uuid();
        front.outbox().append(&mut tx, event).await?; // in the same transaction as any change
    }
    tx.commit().await?;
    let wait = std::time::Duration::from_secs(30);
    let all_seen = greeter.settled(3, wait).await;
    let stats = greeter.stats().ok_or("greeter consumes")?;
    let handled = stats.count(Outcome::Handled);
    let duplicates = stats.count(Outcome::Duplicate);
    let all_printed = front.settled(handled, wait).await;
    println!("greeter handled {handled} visitor.arrived, {duplicates} duplicate(s)");
    greeter.stop().await;
    front.stop().await;
    let settled = all_seen && all_printed;
    settled
        .then_some(())
        .ok_or("not all handled in 30 s".into())
}
