//! `warren publish TYPE --data JSON`: one event, validated against the
//! catalog, published with a confirm.

use events::envelope::{source_of, traceparent, DATA_CONTENT_TYPE, SPEC_VERSION};
use events::{Codec, Envelope};
use uuid::Uuid;

use crate::bus::{confirmed, Bus, Target};
use crate::config::Settings;
use crate::error::InvalidInput;

/// Arguments of `warren publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Event type, e.g. `customer.registered`.
    pub event_type: String,
    /// The event's data as JSON, `@path` to read it from a file, or `-` to
    /// read it from standard input.
    #[arg(long)]
    pub data: String,
    /// Aggregate id (default: the data's `order_id` or `customer_id`).
    #[arg(long)]
    pub subject: Option<String>,
    /// Event id (default: a new UUID v7). Reusing one makes a duplicate.
    #[arg(long)]
    pub id: Option<Uuid>,
    /// Position of the event in its subject's stream.
    #[arg(long, default_value_t = 1)]
    pub sequence: i64,
    /// Raising service (default: the catalog's source of the type).
    #[arg(long)]
    pub source: Option<String>,
    /// Schema version of the data (default: the current one).
    #[arg(long)]
    pub dataversion: Option<u32>,
}

/// Builds and validates the event the arguments describe.
pub fn build(args: &PublishArgs, codec: &Codec) -> Result<Envelope, InvalidInput> {
    let catalog = codec.catalog();
    let spec = *catalog.find(&args.event_type).ok_or_else(|| {
        let known: Vec<&str> = catalog.iter().map(|s| s.event_type).collect();
        InvalidInput(format!(
            "unknown event type {:?}; known types: {}",
            args.event_type,
            known.join(", ")
        ))
    })?;
    let raw = match args.data.strip_prefix('@') {
        _ if args.data == "-" => std::io::read_to_string(std::io::stdin())
            .map_err(|e| InvalidInput(format!("--data - (standard input): {e}")))?,
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| InvalidInput(format!("--data @{path}: {e}")))?,
        None => args.data.clone(),
    };
    let data: serde_json::Value = serde_json::from_str(&raw)
        .map_err(|e| InvalidInput(format!("--data is not valid JSON: {e}")))?;
    let subject = args
        .subject
        .clone()
        .or_else(|| {
            ["order_id", "customer_id"]
                .iter()
                .find_map(|k| data.get(k)?.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    let id = args.id.unwrap_or_else(Uuid::now_v7);
    let envelope = Envelope {
        specversion: SPEC_VERSION.into(),
        id,
        source: source_of(args.source.as_deref().unwrap_or(spec.source)),
        event_type: spec.event_type.into(),
        time: chrono::Utc::now(),
        subject,
        datacontenttype: DATA_CONTENT_TYPE.into(),
        dataversion: args.dataversion.unwrap_or(spec.version),
        sequence: args.sequence,
        correlationid: Some(id.to_string()),
        causationid: None,
        traceparent: Some(traceparent(None)),
        data: (&data).into(),
    };
    // The codec is the one judge of validity: the same checks consumers make.
    codec
        .decode(&codec.encode(&envelope))
        .map_err(|e| InvalidInput(e.to_string()))
}

/// Runs the command: prints the event id once the broker confirmed it.
pub async fn run(settings: &Settings, args: &PublishArgs) -> anyhow::Result<()> {
    let codec = settings.codec();
    let event = build(args, &codec)?;
    let body = codec.encode(&event);
    let bus = Bus::connect(settings).await?;
    let confirm = bus.send_event(&Target::Exchange, &event, &body).await?;
    let result = confirmed(confirm, &format!("{} {}", event.event_type, event.id)).await;
    bus.close().await;
    result?;
    crate::output::line(&event.id.to_string())
}
