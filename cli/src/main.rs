//! The `warren` binary: parses the command line, sets up logging and runs
//! the command; errors become one line on stderr and an exit code
//! (0 ok, 1 failure or unhealthy, 2 bad usage or invalid input,
//! 130 interrupted). A closed standard output (`warren tail | head -1`)
//! is a clean end: exit 0.

use clap::{CommandFactory, Parser, Subcommand};
use secrecy::ExposeSecret as _;
use warren_cli::commands::{
    demo, dlq, migrate, publish, replay, run, setup, status, tail, teardown, trace,
};
use warren_cli::config::Settings;
use warren_cli::output::{self, ColorWhen};

const EXIT_CODES: &str = "Exit codes:\n  0    success (also when standard output was closed early, e.g. by `| head`)\n  1    failure, or `status` found something unhealthy\n  2    bad usage or invalid input (unknown event type, bad fixture line with --strict, …)\n  130  interrupted by Ctrl-C or SIGTERM (throwaway namespaces removed first)";

/// Event-driven services over RabbitMQ with a transactional outbox.
#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about,
    after_help = "Examples:\n  warren demo\n  warren run orders inventory\n  warren publish customer.registered --data '{\"customer_id\":\"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e\",\"name\":\"Ada\",\"email\":\"ada@example.com\"}'\n  warren replay fixtures/saga-happy.jsonl --rate 10\n  warren tail 'order.*'\n  warren trace --demo 01a1ee56-8280-7d1b-8f4e-05e0c0bb6c5f --format mermaid\n  warren status --json\n  warren dlq\n  warren dlq redrive --reason handler_rejected --dry-run\n  warren teardown --namespace bench-1a2b3c4d\n  WARREN_ORDERS_PASSWORD=... warren setup orders\n  warren completions bash > /etc/bash_completion.d/warren",
    after_long_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    /// When to colour output (NO_COLOR in the environment means never under auto).
    #[arg(long, global = true, value_enum, default_value_t = ColorWhen::Auto)]
    color: ColorWhen,
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
    /// One order's (subject's, correlation's, event's) story across services, after the fact.
    Trace(trace::TraceArgs),
    /// Queues, consumers, outbox backlog, inbox size, dead letters per service.
    /// Also the broker's alarms and file descriptors (through rabbitmqctl).
    Status(status::StatusArgs),
    /// Dead letters across services: summary, list, show, redrive, purge.
    Dlq(dlq::DlqArgs),
    /// Apply the database migrations (creates the database if needed).
    Migrate {
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Migrate, then create each service's own PostgreSQL role and RabbitMQ user.
    Setup(setup::SetupArgs),
    /// Measure throughput and latency against the broker's raw ceiling.
    Bench(BenchArgs),
    /// Remove a namespace's queues and exchanges from the broker.
    Teardown(teardown::TeardownArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
    /// Print the figures as one JSON line on standard output (the table
    /// goes to standard error).
    #[arg(long)]
    json: bool,
    /// Measure how the consumer layouts scale instead: drain and latency
    /// with 1 to `--consumers` consumers of one service, competing on one
    /// queue and on `--partitions` partitions, deferrals counted.
    #[arg(long)]
    scaling: bool,
    /// With `--scaling`: the most consumers.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// With `--scaling`: partitions of the partitioned layout.
    #[arg(long, default_value_t = 6)]
    partitions: u16,
    /// With `--scaling`: subjects the latency runs' events are spread over.
    #[arg(long, default_value_t = 100)]
    subjects: usize,
    /// With `--scaling`: each consumer an OS process of its own (this
    /// program again), measured from the database.
    #[arg(long, requires = "scaling")]
    processes: bool,
    /// Internal to `--scaling --processes`: run one consumer of the
    /// scaling sink in NAMESPACE until SIGTERM or standard input closes.
    #[arg(
        long,
        hide = true,
        value_name = "NAMESPACE",
        conflicts_with = "scaling"
    )]
    scaling_sink: Option<String>,
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
    if let Some(namespace) = &args.scaling_sink {
        return scaling_sink(settings, args, lanes, namespace).await;
    }
    // The bench needs none of the shop's tables: it sets up its own schemas.
    let pool = warren_cli::config::connect_db(settings, true, lanes as u32 + 24).await?;
    let namespace = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let shutdown = warren_cli::commands::shutdown_on_signal();
    if args.scaling {
        return scaling(settings, args, pool, lanes, namespace, shutdown).await;
    }
    let options = warren_cli::bench::BenchOptions {
        events: args.events,
        rate: args.rate,
        duration: std::time::Duration::from_secs(args.seconds),
        amqp_url: settings.amqp_url.expose_secret().to_owned(),
        lanes,
        prefetch: args.prefetch,
        eager: args.publish == Publisher::Eager,
        namespace: namespace.clone(),
    };
    let report = tokio::select! {
        r = warren_cli::bench::run(pool.clone(), &options) => r,
        () = shutdown.cancelled() => {
            // The run's tasks are abandoned, not drained: the process
            // ends right after this cleanup, and anything they redeclare
            // in the meantime expires (THROWAWAY_EXPIRES).
            let mut topology = transport::Topology::new(namespace);
            topology.expires = Some(teardown::THROWAWAY_EXPIRES);
            let delays = consumers::SubscriptionConfig::default().retry.delays();
            teardown::cleanup_throwaway(settings.amqp_url.expose_secret(), &topology, &delays).await;
            return Err(warren_cli::error::Interrupted.into());
        }
    };
    pool.close().await;
    let report = report?;
    let table = warren_cli::bench::render(&report);
    if args.json {
        // Standard output carries the JSON alone.
        output::eline(&table);
        output::line(&serde_json::to_string(&report)?)?;
    } else {
        output::line(&table)?;
    }
    Ok(())
}

/// One consumer process of `warren bench --scaling --processes`.
async fn scaling_sink(
    settings: &Settings,
    args: &BenchArgs,
    lanes: usize,
    namespace: &str,
) -> anyhow::Result<()> {
    // A pool the size of an in-process consumer's.
    let pool = warren_cli::config::connect_db(settings, false, lanes as u32 + 3).await?;
    let sink = warren_cli::scaling::processes::SinkProcess {
        namespace: namespace.to_owned(),
        amqp_url: settings.amqp_url.expose_secret().to_owned(),
        lanes,
        prefetch: args.prefetch,
        partitions: args.partitions,
    };
    let shutdown = warren_cli::commands::shutdown_on_signal();
    warren_cli::scaling::processes::serve_sink(pool, &sink, shutdown).await
}

/// `warren bench --scaling`.
async fn scaling(
    settings: &Settings,
    args: &BenchArgs,
    pool: sqlx::PgPool,
    lanes: usize,
    namespace: String,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let options = warren_cli::scaling::ScalingOptions {
        events: args.events,
        rate: args.rate,
        duration: std::time::Duration::from_secs(args.seconds),
        amqp_url: settings.amqp_url.expose_secret().to_owned(),
        lanes,
        prefetch: args.prefetch,
        partitions: args.partitions,
        max_consumers: args.consumers,
        subjects: args.subjects,
        namespace: namespace.clone(),
        processes: args.processes,
        database_url: settings.database_url.clone(),
    };
    let children = warren_cli::scaling::Children::default();
    let rows = tokio::select! {
        r = warren_cli::scaling::run(pool.clone(), &options, &children) => r,
        () = shutdown.cancelled() => {
            // Its consumer processes got the signal too if it came from
            // the terminal; stopped and reaped here either way.
            if let Err(e) = children.stop().await {
                tracing::warn!(error = %e, "stopping the consumer processes");
            }
            let mut topology = transport::Topology::new(namespace);
            topology.expires = Some(teardown::THROWAWAY_EXPIRES);
            let delays = consumers::SubscriptionConfig::default().retry.delays();
            if let Ok(conn) = transport::connect(settings.amqp_url.expose_secret(), "warren cleanup").await {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = topology
                        .delete_partitions(&ch, warren_cli::bench::SINK, args.partitions, &delays)
                        .await;
                }
                transport::close(conn, "cleanup done").await;
            }
            teardown::cleanup_throwaway(settings.amqp_url.expose_secret(), &topology, &delays).await;
            return Err(warren_cli::error::Interrupted.into());
        }
    };
    pool.close().await;
    let rows = rows?;
    let table = warren_cli::scaling::render(&rows, &options);
    if args.json {
        output::eline(&table);
        output::line(&serde_json::to_string(&rows)?)?;
    } else {
        output::line(&table)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    cli.color.apply();
    // The benchmark measures the pipeline, not a terminal printing one
    // line per event: its per-event `handled` lines are off unless
    // RUST_LOG asks for them (BENCHMARKS.md says so next to the figures).
    let default_filter = match cli.command {
        Command::Bench(_) => "warn",
        _ => warren_cli::telemetry::DEFAULT_FILTER,
    };
    let telemetry = match warren_cli::telemetry::init(cli.settings.log_format, default_filter) {
        Ok(t) => t,
        Err(e) => {
            output::eline(&format!("error: {e}"));
            std::process::exit(2);
        }
    };
    let s = &cli.settings;
    let result = match &cli.command {
        Command::Demo(a) => demo::run(s, a).await,
        Command::Run(a) => run::run(s, a).await,
        Command::Publish(a) => publish::run(s, a).await,
        Command::Replay(a) => replay::run(s, a).await,
        Command::Tail(a) => tail::run(s, a).await,
        Command::Trace(a) => trace::run(s, a).await,
        Command::Status(a) => status::run(s, a).await,
        Command::Dlq(a) => dlq::run(s, a).await,
        Command::Migrate { json } => migrate::run(s, *json).await,
        Command::Setup(a) => setup::run(s, a).await,
        Command::Bench(a) => bench(s, a).await,
        Command::Teardown(a) => teardown::run(s, a).await,
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "warren", &mut out);
            output::Out::stdout().raw(&out)
        }
    };
    // Before any exit: the spans of the last moments are still buffered.
    telemetry.shutdown().await;
    if let Err(e) = result {
        let code = warren_cli::error::exit_code(&e);
        if e.downcast_ref::<output::ClosedPipe>().is_some() {
            // The reader has what it wanted (`| head -1`): not a failure.
        } else if e.downcast_ref::<warren_cli::error::Unhealthy>().is_none() || code != 1 {
            // One line: the error and its causes, no backtrace.
            output::eline(&format!("error: {e:#}"));
        } else {
            output::eline(&format!("{e}"));
        }
        std::process::exit(code);
    }
}
