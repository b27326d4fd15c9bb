//! The `warren` binary: parses the command line, sets up logging and runs
//! the command; errors become one line on stderr and an exit code
//! (0 ok, 1 failure or unhealthy, 2 bad usage or invalid input).

use clap::{Parser, Subcommand};
use warren_cli::commands::{demo, dlq, migrate, publish, replay, run, setup, status, tail};
use warren_cli::config::Settings;

/// Event-driven services over RabbitMQ with a transactional outbox.
#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about,
    after_help = "Examples:\n  warren demo\n  warren run orders inventory\n  warren publish customer.registered --data '{\"customer_id\":\"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e\",\"name\":\"Ada\",\"email\":\"ada@example.com\"}'\n  warren replay fixtures/saga-happy.jsonl --rate 10\n  warren tail 'order.*'\n  warren status --json\n  warren dlq list inventory\n  WARREN_ORDERS_PASSWORD=... warren setup orders"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, start every service, replay fixtures/demo.jsonl, show what happened.
    Demo(demo::DemoArgs),
    /// Run services (all by default) until Ctrl-C, then drain and stop.
    Run(run::RunArgs),
    /// Publish one event, validated against the catalog.
    Publish(publish::PublishArgs),
    /// Replay JSON Lines fixtures (ids kept: a second replay changes nothing).
    Replay(replay::ReplayArgs),
    /// Live view of events on the bus and of each consumer's outcome.
    Tail(tail::TailArgs),
    /// Queues, consumers, outbox backlog, inbox size, dead letters per service.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Look at dead letters and send them back.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Apply the database migrations (creates the database if needed).
    Migrate,
    /// Migrate, then create each service's own PostgreSQL role and RabbitMQ user.
    Setup(setup::SetupArgs),
    /// Measure throughput and latency against the broker's raw ceiling.
    Bench(BenchArgs),
}

/// Arguments of `warren bench`.
#[derive(clap::Args)]
struct BenchArgs {
    /// Events in the ceiling and drain runs.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events per second in the latency run.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Consumer lanes [default: the machine's cores]. The bench's handler
    /// only writes to the database, so more transactions in flight than
    /// cores only split bursts into more, smaller transactions (measured
    /// here: 8 lanes gave a higher p50 than 2 on 2 cores). Services keep 8
    /// by default (`warren run --lanes`), for handlers that wait on I/O.
    #[arg(long)]
    lanes: Option<usize>,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 512)]
    prefetch: u16,
    /// Who publishes the latency run's events: `eager` (the producer,
    /// right after its commit; the relay only takes what it leaves) or
    /// `relay` (the producer only commits).
    #[arg(long, value_enum, default_value = "eager")]
    publish: Publisher,
    /// Print the figures as one JSON line last.
    #[arg(long)]
    json: bool,
}

/// `warren bench --publish`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Publisher {
    Eager,
    Relay,
}

async fn bench(settings: &Settings, args: &BenchArgs) -> anyhow::Result<()> {
    let lanes = args.lanes.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    // The bench needs none of the shop's tables: it sets up its own schemas.
    let pool = warren_cli::config::connect_db(settings, true, lanes as u32 + 24).await?;
    let report = warren_cli::bench::run(
        pool,
        &warren_cli::bench::BenchOptions {
            events: args.events,
            rate: args.rate,
            duration: std::time::Duration::from_secs(args.seconds),
            amqp_url: settings.amqp_url.clone(),
            lanes,
            prefetch: args.prefetch,
            eager: args.publish == Publisher::Eager,
        },
    )
    .await?;
    println!("{}", warren_cli::bench::render(&report));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The benchmark measures the pipeline, not a terminal printing one
    // line per event: its per-event `handled` lines are off unless
    // RUST_LOG asks for them (BENCHMARKS.md says so next to the figures).
    let default_filter = match cli.command {
        Command::Bench(_) => "warn",
        _ => warren_cli::telemetry::DEFAULT_FILTER,
    };
    warren_cli::telemetry::init(cli.settings.log_format, default_filter);
    let s = &cli.settings;
    let result = match &cli.command {
        Command::Demo(a) => demo::run(s, a).await,
        Command::Run(a) => run::run(s, a).await,
        Command::Publish(a) => publish::run(s, a).await,
        Command::Replay(a) => replay::run(s, a).await,
        Command::Tail(a) => tail::run(s, a).await,
        Command::Status { json } => status::run(s, *json).await,
        Command::Dlq(c) => dlq::run(s, c).await,
        Command::Migrate => migrate::run(s).await,
        Command::Setup(a) => setup::run(s, a).await,
        Command::Bench(a) => bench(s, a).await,
    };
    if let Err(e) = result {
        // One line: the error and its causes, no backtrace.
        let code = warren_cli::error::exit_code(&e);
        if e.downcast_ref::<warren_cli::error::Unhealthy>().is_none() || code != 1 {
            eprintln!("error: {e:#}");
        } else {
            eprintln!("{e}");
        }
        std::process::exit(code);
    }
}
