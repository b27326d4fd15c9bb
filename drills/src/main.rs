//! `drills [DRILL…]`: runs the fault drills and the bad-input run against
//! the release `warren` binary and prints their figures; exit 1 when any
//! audit fails. On SIGINT or SIGTERM it stops its `warren` processes,
//! removes the running drill's namespace and databases and the servers
//! that drill started, and exits 130 or 143.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};
use warren_drills::cluster::Servers;
use warren_drills::leftovers::Leftovers;
use warren_drills::{badinput, cluster_drill, scenarios, tls};

/// Every drill, in the order `all` runs them (`cluster` is not in `all`:
/// it starts servers of its own beside the shared ones).
const ALL: [&str; 5] = ["kill", "twins", "bad-input", "outage", "tls"];

/// Fault drills and bad input at volume (they restart processes; the
/// `outage` drill restarts the local RabbitMQ and PostgreSQL; the `tls`
/// drill gives RabbitMQ a TLS listener on 5671 for its length; the
/// `cluster` drill starts a three-node RabbitMQ cluster and a second
/// PostgreSQL cluster on this machine and stops them again).
#[derive(Parser)]
#[command(
    name = "drills",
    after_help = "Drills: kill, twins, bad-input, outage, tls (default: all, in that order), \
                  and cluster (only when named: it starts scripts/rabbitmq-cluster's three \
                  nodes on 5681-5683 and a PostgreSQL cluster `other` on 5433 for the orders \
                  database, and ignores --amqp-url)"
)]
struct Args {
    /// Drills to run.
    drills: Vec<String>,
    /// The warren binary (default: `warren` next to this binary).
    #[arg(long)]
    warren: Option<PathBuf>,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// PostgreSQL URL; each drill uses its own database `warren_drill_<drill>`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// Another PostgreSQL server for the orders service's database (each
    /// drill's database created there too): the rest stay on
    /// `--database-url`'s.
    #[arg(long, env = "WARREN_ORDERS_DATABASE_URL", hide_env_values = true)]
    orders_database_url: Option<String>,
    /// Orders per fault drill.
    #[arg(long, default_value_t = 2000)]
    orders: usize,
    /// Seconds over which the orders are placed (default: 40; 180 in the
    /// cluster drill, whose faults take over a minute and must all fall
    /// within the load).
    #[arg(long)]
    window: Option<u64>,
    /// Kills in the kill drill.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Seconds RabbitMQ stays stopped in the outage drill.
    #[arg(long, default_value_t = 5)]
    broker_down: u64,
    /// Seconds the killed node stays down in the cluster drill.
    #[arg(long, default_value_t = 10)]
    node_down: u64,
    /// Messages in the bad-input run.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Peak RSS allowed for warren in the bad-input run, MiB.
    #[arg(long, default_value_t = 256)]
    rss_bound_mib: u64,
    /// Seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep each drill's database and namespace even when it passed.
    #[arg(long)]
    keep: bool,
    /// Where the warren processes' logs and the figures go.
    #[arg(long, default_value = "target/drills")]
    out: PathBuf,
}

/// SIGINT and SIGTERM, listened to from the start so that neither
/// kills the binary before it has tidied up.
struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    fn new() -> anyhow::Result<Self> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The next one, as the conventional exit status (128 + signal).
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => 130,
            _ = self.term.recv() => 143,
        }
    }
}

/// What one drill reports: passed, the text, the figures as JSON.
type Outcome = (bool, String, serde_json::Value);

async fn run_drill(
    d: &str,
    args: &Args,
    servers: &Servers,
    o: &scenarios::Options,
    cluster_window: Duration,
) -> anyhow::Result<Outcome> {
    Ok(match d {
        "kill" | "outage" | "twins" => {
            let f = match d {
                "kill" => scenarios::kill(servers, o, args.keep).await,
                "outage" => scenarios::outage(servers, o, args.keep).await,
                _ => scenarios::twins(servers, o, args.keep).await,
            }
            .with_context(|| format!("drill {d}"))?;
            (f.passed(), scenarios::render(&f), serde_json::to_value(&f)?)
        }
        "bad-input" => {
            let f = badinput::run(
                servers,
                &badinput::Options {
                    messages: args.messages,
                    bad_share: 0.8,
                    seed: o.seed,
                    settle_within: Duration::from_secs(300),
                    rss_bound_mib: args.rss_bound_mib,
                },
                args.keep,
            )
            .await
            .context("drill bad-input")?;
            (f.passed(), badinput::render(&f), serde_json::to_value(&f)?)
        }
        "tls" => {
            let f = tls::run(servers, args.keep).await.context("drill tls")?;
            (f.passed(), tls::render(&f), serde_json::to_value(&f)?)
        }
        "cluster" => {
            let o = scenarios::Options {
                window: cluster_window,
                ..o.clone()
            };
            let f = cluster_drill::run(servers, &o, Duration::from_secs(args.node_down), args.keep)
                .await
                .context("drill cluster")?;
            (
                f.passed(),
                cluster_drill::render(&f),
                serde_json::to_value(&f)?,
            )
        }
        other => {
            anyhow::bail!(
                "unknown drill {other:?}; drills are kill, twins, bad-input, outage, tls (all) and cluster"
            )
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut interrupts = Interrupts::new()?;
    let warren = match &args.warren {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("warren"),
    };
    anyhow::ensure!(
        warren.exists(),
        "no warren binary at {} (cargo build --release -p warren-cli)",
        warren.display()
    );
    let seed = args
        .seed
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let log_dir = args.out.join(&stamp);
    let leftovers = Leftovers::default();
    let servers = Servers {
        warren,
        amqp_url: args.amqp_url.clone(),
        database_url: args.database_url.clone(),
        orders_database_url: args.orders_database_url.clone(),
        log_dir: log_dir.clone(),
        leftovers: leftovers.clone(),
    };
    let drills: Vec<String> = if args.drills.is_empty() || args.drills.iter().any(|d| d == "all") {
        ALL.map(String::from).to_vec()
    } else {
        args.drills.clone()
    };
    println!(
        "drills {drills:?}, seed {seed}, logs in {}",
        log_dir.display()
    );
    let o = scenarios::Options {
        orders: args.orders,
        window: Duration::from_secs(args.window.unwrap_or(40)),
        kills: args.kills,
        customers: 20,
        seed,
        settle_within: Duration::from_secs(300),
        broker_down: Duration::from_secs(args.broker_down),
    };
    let cluster_window = Duration::from_secs(args.window.unwrap_or(180));
    let mut failed = Vec::new();
    let mut figures = Vec::new();
    for d in &drills {
        println!("== {d}");
        let started = std::time::Instant::now();
        // Boxed so that, on a signal, the drill stays alive but unpolled
        // while its processes are stopped (it would otherwise see them
        // die and react), and is dropped only afterwards.
        let mut drill = Box::pin(run_drill(d, &args, &servers, &o, cluster_window));
        let code = tokio::select! {
            r = &mut drill => {
                let (passed, text, json) = match r {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        // A drill that broke leaves its things for a
                        // look, as a failed audit does: say which.
                        for l in leftovers.describe() {
                            eprintln!("  left for a look: {l}");
                        }
                        return Err(e);
                    }
                };
                print!("{text}");
                println!("   ({:.1}s)", started.elapsed().as_secs_f64());
                if !passed {
                    failed.push(d.clone());
                }
                figures.push(json);
                continue;
            }
            code = interrupts.next() => code,
        };
        eprintln!("interrupted during drill {d}: cleaning up (again to exit at once)");
        let cleaning = async {
            // Processes first, while the drill cannot restart them.
            let lines = leftovers.clean_up(Duration::from_secs(15)).await;
            drop(drill);
            lines
        };
        tokio::select! {
            lines = cleaning => {
                for l in lines {
                    eprintln!("  {l}");
                }
            }
            _ = interrupts.next() => eprintln!("interrupted again: leaving the rest"),
        }
        std::process::exit(code);
    }
    std::fs::create_dir_all(&log_dir)?;
    let path = log_dir.join("figures.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({ "seed": seed, "drills": figures }))?,
    )?;
    println!("figures written to {}", path.display());
    if !failed.is_empty() {
        eprintln!("FAILED: {failed:?}");
        std::process::exit(1);
    }
    println!("all drills passed");
    Ok(())
}
