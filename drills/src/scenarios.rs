//! The fault drills. Each creates a fresh database and namespace, starts
//! `warren run`, seeds customers and stock, places a mixed run of orders
//! while it injects its faults, then waits for the system to settle and
//! audits every store.
//!
//! - `kill`: SIGKILL of the only `warren run` process at random moments,
//!   restarted each time.
//! - `outage`: RabbitMQ (`stop_app`/`start_app`) and then PostgreSQL
//!   restarted mid-run; warren is not restarted.
//! - `twins`: two `warren run` processes (competing consumers, one active
//!   relay per service and a standby), one killed mid-run.
//!
//! Time to recover is measured end to end: from the end of a fault until a
//! new order placed at that moment is shipped (it queues behind the
//! backlog the fault left, so it includes catching up).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng;
use serde::Serialize;

use crate::check::{self, Audit};
use crate::cluster::{Env, Servers, Warren};
use crate::load::{self, lock, Placed};
use crate::servers;

/// Sizes of a drill run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Orders in the mixed run.
    pub orders: usize,
    /// Time over which they are placed.
    pub window: Duration,
    /// Kills in the `kill` drill.
    pub kills: usize,
    /// Customers registered first.
    pub customers: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Longest wait for the system to settle after the run.
    pub settle_within: Duration,
    /// Outage of the broker in the `outage` drill.
    pub broker_down: Duration,
}

/// One injected fault and how the system came back.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// What was done.
    pub what: String,
    /// Seconds since the first order.
    pub at_s: f64,
    /// How long the fault lasted (process or server away), seconds.
    pub outage_s: f64,
    /// From the end of the fault until a new order shipped, seconds.
    pub recover_s: f64,
}

/// The figures of one drill.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Drill name.
    pub drill: String,
    /// Orders planned (probes come on top).
    pub orders: usize,
    /// Faults injected.
    pub faults: Vec<Fault>,
    /// Placement statistics.
    pub http_retries: usize,
    /// Bus publishes repeated.
    pub republished: usize,
    /// Requests with unknown outcome.
    pub in_doubt: usize,
    /// From the first order until the audit passed, seconds.
    pub total_s: f64,
    /// From the last order placed until everything settled, seconds.
    pub settle_s: f64,
    /// Highest peak RSS of any warren process, KiB.
    pub peak_rss_kib: u64,
    /// The final audit.
    pub audit: Audit,
}

impl Figures {
    /// Whether the drill passed.
    pub fn passed(&self) -> bool {
        self.audit.passed()
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn peak(w: &Warren, peak: &mut u64) {
    if let Some((_, hwm)) = w.rss_kib() {
        *peak = (*peak).max(hwm);
    }
}

/// Everything a drill body needs after set-up.
pub(crate) struct Run {
    pub(crate) env: Env,
    pub(crate) customers: Vec<uuid::Uuid>,
    pub(crate) stock: std::collections::BTreeMap<String, i32>,
    pub(crate) plan: Vec<load::Planned>,
    pub(crate) targets: Arc<Mutex<Vec<String>>>,
    pub(crate) placed: load::Shared,
    pub(crate) rng: rand::rngs::StdRng,
}

pub(crate) async fn prepare(o: &Options, first: &Warren, env: Env) -> anyhow::Result<Run> {
    let mut rng = load::rng(o.seed);
    let (customers, stock) = load::seed(&env, &first.base, o.customers).await?;
    let plan = load::plan(o.orders, &customers, &mut rng);
    Ok(Run {
        env,
        customers,
        stock,
        plan,
        targets: Arc::new(Mutex::new(vec![first.base.clone()])),
        placed: Arc::new(Mutex::new(Placed::default())),
        rng,
    })
}

/// What a drill body hands to [`finish`].
pub(crate) struct Done {
    pub(crate) faults: Vec<Fault>,
    /// First order.
    pub(crate) t0: Instant,
    /// Last order placed.
    pub(crate) placed_done: Instant,
    /// Processes still running.
    pub(crate) procs: Vec<Warren>,
    /// Peak RSS of processes already gone, KiB.
    pub(crate) peak_rss: u64,
}

pub(crate) async fn finish(
    run: Run,
    name: &str,
    o: &Options,
    done: Done,
    keep: bool,
) -> anyhow::Result<Figures> {
    let Done {
        faults,
        t0,
        placed_done,
        mut procs,
        mut peak_rss,
    } = done;
    let ids = lock(&run.placed).ids.clone();
    let (audit, _) = check::settle(&run.env, &ids, &run.stock, false, o.settle_within).await?;
    let settle_s = placed_done.elapsed().as_secs_f64();
    for w in &procs {
        peak(w, &mut peak_rss);
    }
    for w in procs.drain(..) {
        w.stop().await?;
    }
    let (http_retries, republished, in_doubt) = {
        let p = lock(&run.placed);
        (p.http_retries, p.republished, p.in_doubt)
    };
    let figures = Figures {
        drill: name.to_owned(),
        orders: o.orders,
        faults,
        http_retries,
        republished,
        in_doubt,
        total_s: t0.elapsed().as_secs_f64(),
        settle_s,
        peak_rss_kib: peak_rss,
        audit,
    };
    if figures.passed() && !keep {
        run.env
            .destroy()
            .await
            .context("cleaning up the drill's database and namespace")?;
    } else {
        run.env.keep();
        eprintln!(
            "  kept database {} and namespace {} for a look",
            run.env.database_url.rsplit('/').next().unwrap_or(""),
            run.env.namespace
        );
    }
    Ok(figures)
}

/// Drill a: SIGKILL of `warren run` at random moments, restarted each time.
pub async fn kill(servers: &Servers, o: &Options, keep: bool) -> anyhow::Result<Figures> {
    let env = Env::create(servers, "kill").await?;
    let port = free_port()?;
    let mut w = env.start("a", port).await?;
    let mut run = prepare(o, &w, env).await?;
    let mut at: Vec<f64> = (0..o.kills)
        .map(|_| run.rng.gen_range(0.05..0.95) * o.window.as_secs_f64())
        .collect();
    at.sort_by(f64::total_cmp);
    let downs: Vec<u64> = (0..o.kills).map(|_| run.rng.gen_range(0..1500)).collect();
    let t0 = Instant::now();
    let plan = std::mem::take(&mut run.plan);
    let mut peak_rss = 0;
    let mut faults = Vec::new();
    let placing = load::run(
        &run.env,
        plan,
        o.window,
        run.targets.clone(),
        run.placed.clone(),
    );
    let injecting = async {
        for (i, t) in at.iter().enumerate() {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(*t)).into()).await;
            peak(&w, &mut peak_rss);
            let killed = Instant::now();
            w.kill9().await?;
            eprintln!("  kill -9 #{} at {:.1}s", i + 1, t0.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_millis(downs[i])).await;
            w = Warren::spawn(&run.env, "a", port, &[]).await?;
            let restarted = Instant::now();
            let (recover, _) = load::probe(
                &run.env,
                std::slice::from_ref(&w.base),
                run.customers[0],
                &run.placed,
                o.settle_within,
            )
            .await?;
            faults.push(Fault {
                what: format!("kill -9 #{}", i + 1),
                at_s: killed.duration_since(t0).as_secs_f64(),
                outage_s: restarted.duration_since(killed).as_secs_f64(),
                recover_s: recover.as_secs_f64(),
            });
            eprintln!(
                "    back in {:.2}s, probe shipped after {:.2}s",
                restarted.duration_since(killed).as_secs_f64(),
                recover.as_secs_f64()
            );
        }
        anyhow::Ok(())
    };
    let (placed, injected) = tokio::join!(
        async {
            let r = placing.await;
            (r, Instant::now())
        },
        injecting
    );
    let (placed, placed_done) = placed;
    placed?;
    injected?;
    finish(
        run,
        "kill",
        o,
        Done {
            faults,
            t0,
            placed_done,
            procs: vec![w],
            peak_rss,
        },
        keep,
    )
    .await
}

/// Drill b: RabbitMQ and then PostgreSQL restarted mid-run, warren left
/// running.
pub async fn outage(servers: &Servers, o: &Options, keep: bool) -> anyhow::Result<Figures> {
    let env = Env::create(servers, "outage").await?;
    let port = free_port()?;
    let w = env.start("a", port).await?;
    let mut run = prepare(o, &w, env).await?;
    let t0 = Instant::now();
    let plan = std::mem::take(&mut run.plan);
    let mut faults = Vec::new();
    let placing = load::run(
        &run.env,
        plan,
        o.window,
        run.targets.clone(),
        run.placed.clone(),
    );
    let injecting = async {
        // Each outage: at a fraction of the placing window, restart one
        // server, then time how long until a new order ships.
        let phases = [
            (0.3, true, "RabbitMQ stop_app/start_app", "broker answers"),
            (
                0.65,
                false,
                "PostgreSQL restart",
                "PostgreSQL accepts connections",
            ),
        ];
        for (at, broker, what, back_msg) in phases {
            tokio::time::sleep_until((t0 + o.window.mul_f64(at)).into()).await;
            let began = Instant::now();
            eprintln!("  {what} at {:.1}s", t0.elapsed().as_secs_f64());
            if broker {
                servers::restart_rabbit(o.broker_down, &servers.leftovers).await?;
            } else {
                servers::restart_postgres().await?;
            }
            let back = Instant::now();
            eprintln!(
                "  {back_msg} after {:.1}s",
                back.duration_since(began).as_secs_f64()
            );
            let (recover, _) = load::probe(
                &run.env,
                std::slice::from_ref(&w.base),
                run.customers[0],
                &run.placed,
                o.settle_within,
            )
            .await?;
            faults.push(Fault {
                what: what.into(),
                at_s: began.duration_since(t0).as_secs_f64(),
                outage_s: back.duration_since(began).as_secs_f64(),
                recover_s: recover.as_secs_f64(),
            });
            eprintln!("    probe shipped after {:.2}s", recover.as_secs_f64());
        }
        anyhow::Ok(())
    };
    let (placed, injected) = tokio::join!(
        async {
            let r = placing.await;
            (r, Instant::now())
        },
        injecting
    );
    // Whatever happened, leave the shared servers up.
    if !servers::rabbit_up() {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
    }
    let (placed, placed_done) = placed;
    placed?;
    injected?;
    let mut w = w;
    if !w.alive() {
        anyhow::bail!("warren exited during the outages (see its log)");
    }
    finish(
        run,
        "outage",
        o,
        Done {
            faults,
            t0,
            placed_done,
            procs: vec![w],
            peak_rss: 0,
        },
        keep,
    )
    .await
}

/// Drill c: two `warren run` processes; one killed mid-run.
pub async fn twins(servers: &Servers, o: &Options, keep: bool) -> anyhow::Result<Figures> {
    let env = Env::create(servers, "twins").await?;
    let a = env.start("a", free_port()?).await?;
    let b = env.start("b", free_port()?).await?;
    let mut run = prepare(o, &a, env).await?;
    *run.targets.lock().unwrap_or_else(|e| e.into_inner()) = vec![a.base.clone(), b.base.clone()];
    let when = run.rng.gen_range(0.3..0.7) * o.window.as_secs_f64();
    let t0 = Instant::now();
    let plan = std::mem::take(&mut run.plan);
    let mut faults = Vec::new();
    let mut peak_rss = 0;
    // The victim is chosen at the moment of the kill: the process holding
    // more relay locks, so that standbys must take over.
    let mut pair = Some((a, b));
    let mut kept: Option<Warren> = None;
    let placing = load::run(
        &run.env,
        plan,
        o.window,
        run.targets.clone(),
        run.placed.clone(),
    );
    let injecting = async {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(when)).into()).await;
        let (a, b) = pair.take().context("twins already split")?;
        let (ra, rb) = (a.active_relays().await, b.active_relays().await);
        let (mut victim, survivor) = if ra >= rb { (a, b) } else { (b, a) };
        let relays_before = (ra.max(rb), ra.min(rb));
        peak(&victim, &mut peak_rss);
        let killed = Instant::now();
        victim.kill9().await?;
        *run.targets.lock().unwrap_or_else(|e| e.into_inner()) = vec![survivor.base.clone()];
        eprintln!(
            "  kill -9 of {} at {:.1}s (active relays before: victim {}, survivor {})",
            victim.label,
            t0.elapsed().as_secs_f64(),
            relays_before.0,
            relays_before.1
        );
        // Standby relays take over when the victim's advisory locks go.
        let mut takeover = None;
        while killed.elapsed() < Duration::from_secs(30) {
            if survivor.active_relays().await == crate::cluster::SCHEMAS.len() {
                takeover = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let takeover = takeover.context("the survivor did not take every relay over within 30s")?;
        eprintln!(
            "    survivor holds every relay after {:.2}s",
            takeover.as_secs_f64()
        );
        let (recover, _) = load::probe(
            &run.env,
            std::slice::from_ref(&survivor.base),
            run.customers[0],
            &run.placed,
            o.settle_within,
        )
        .await?;
        eprintln!("    probe shipped after {:.2}s", recover.as_secs_f64());
        faults.push(Fault {
            what: format!(
                "kill -9 of one of two processes (relays held: {}; survivor took all over in {:.2}s)",
                relays_before.0,
                takeover.as_secs_f64()
            ),
            at_s: killed.duration_since(t0).as_secs_f64(),
            outage_s: takeover.as_secs_f64(),
            recover_s: recover.as_secs_f64(),
        });
        kept = Some(survivor);
        anyhow::Ok(())
    };
    let (placed, injected) = tokio::join!(
        async {
            let r = placing.await;
            (r, Instant::now())
        },
        injecting
    );
    let (placed, placed_done) = placed;
    placed?;
    injected?;
    let survivor = kept.context("no survivor")?;
    finish(
        run,
        "twins",
        o,
        Done {
            faults,
            t0,
            placed_done,
            procs: vec![survivor],
            peak_rss,
        },
        keep,
    )
    .await
}

/// The figures as report lines.
pub fn render(f: &Figures) -> String {
    let mut out = format!(
        "drill {}: {} orders, {} fault(s), total {:.1}s, settled {:.1}s after the last order, peak RSS {:.1} MiB\n  placing: {} HTTP retries, {} republished, {} in doubt\n",
        f.drill,
        f.orders,
        f.faults.len(),
        f.total_s,
        f.settle_s,
        f.peak_rss_kib as f64 / 1024.0,
        f.http_retries,
        f.republished,
        f.in_doubt,
    );
    for x in &f.faults {
        out.push_str(&format!(
            "  fault: {} at {:.1}s, outage {:.2}s, recovered (new order shipped) {:.2}s later\n",
            x.what, x.at_s, x.outage_s, x.recover_s
        ));
    }
    out.push_str(&check::render(&f.audit));
    out
}
