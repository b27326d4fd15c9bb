//! `warren setup [SERVICE…]`: least privilege. Applies the migrations, then
//! gives each service its own PostgreSQL role and RabbitMQ user, both named
//! `<namespace>_<service>`, that reach only what the service owns (see
//! `producers::access`). Run it with administrator credentials; run the
//! services with theirs. Running it again only resets the passwords.
//!
//! RabbitMQ users are created with `rabbitmqctl import_definitions` fed on
//! stdin: it needs no management plugin, takes one call for every user
//! (each `rabbitmqctl` call starts an Erlang VM, about 1.5 s), and carries
//! only salted password hashes, so no password shows up in a process list.
//! The import may finish after the command returns, so setup then logs in
//! as each user until its permissions are in force.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use producers::access::{self, AmqpPermissions, AmqpUser, ExposeSecret as _, SecretString};
use services::ALL;
use sqlx::PgPool;
use transport::Topology;

use crate::config::{connect_stores, migrate_stores, Service, Settings};
use crate::error::InvalidInput;
use crate::output;

/// Arguments of `warren setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Services to set up (all by default).
    #[arg(value_enum)]
    pub services: Vec<Service>,
    /// Use each role's name as its password. For development only: anyone
    /// who knows the namespace knows the passwords.
    #[arg(long)]
    pub dev_passwords: bool,
    /// Leave RabbitMQ alone (only PostgreSQL roles).
    #[arg(long)]
    pub no_broker: bool,
    /// How to run rabbitmqctl, split on spaces, e.g.
    /// `docker compose exec -T rabbitmq rabbitmqctl`.
    #[arg(long, env = "WARREN_RABBITMQCTL", default_value = "rabbitmqctl")]
    pub rabbitmqctl: String,
    /// Print what was set up as one JSON object (no password in it).
    #[arg(long)]
    pub json: bool,
}

/// The environment variable holding a service's password:
/// `WARREN_ORDERS_PASSWORD` for orders.
pub fn password_var(service: &str) -> String {
    format!("WARREN_{}_PASSWORD", service.to_ascii_uppercase())
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &SetupArgs) -> anyhow::Result<()> {
    let services = chosen(&args.services);
    let mut passwords = Vec::new();
    let mut missing = Vec::new();
    for s in &services {
        let name = access::principal(&settings.namespace, s);
        match std::env::var(password_var(s)) {
            Ok(p) if !p.is_empty() => passwords.push((s.clone(), name, SecretString::from(p))),
            _ if args.dev_passwords => {
                passwords.push((s.clone(), name.clone(), SecretString::from(name)));
            }
            _ => missing.push(password_var(s)),
        }
    }
    if !missing.is_empty() {
        return Err(InvalidInput(format!(
            "set {} (or pass --dev-passwords on a development machine)",
            missing.join(", ")
        ))
        .into());
    }
    if args.dev_passwords {
        tracing::warn!(
            "--dev-passwords: each password is its role name; never use this outside development"
        );
    }

    // Each service's part where it lives: its database migrated, its role
    // created on that database's server.
    let stores = connect_stores(settings, true, 2).await?;
    let roles: Vec<(String, String, SecretString)> = passwords.clone();
    let prepared = async {
        migrate_stores(&stores).await?;
        for role in &roles {
            postgres_roles(stores.of(&role.0), std::slice::from_ref(role)).await?;
        }
        anyhow::Ok(())
    }
    .await;
    stores.close().await;
    prepared?;
    // What `--json` prints: names and permissions, never a password.
    let (mut pg_roles, mut amqp_users) = (Vec::new(), Vec::new());
    for (s, name, _) in &roles {
        if args.json {
            pg_roles.push(serde_json::json!({ "service": s, "role": name, "schema": s }));
        } else {
            output::line(&format!("postgres role {name}: schema {s} only"))?;
        }
    }

    if !args.no_broker {
        let topology = settings.topology();
        let catalog = services::catalog::catalog();
        let users: Vec<AmqpUser> = passwords
            .iter()
            .map(|(s, name, pw)| AmqpUser {
                name: name.clone(),
                password: pw.clone(),
                permissions: AmqpPermissions::for_service(&topology, &catalog, s),
            })
            .collect();
        rabbitmq_users(
            &args.rabbitmqctl,
            settings.amqp_url.expose_secret(),
            &topology,
            &users,
        )
        .await?;
        for u in &users {
            let p = &u.permissions;
            if args.json {
                amqp_users.push(serde_json::json!({
                    "user": u.name, "configure": p.configure, "write": p.write,
                    "read": p.read, "publish": p.topic_write, "exchange": p.exchange,
                }));
            } else {
                output::line(&format!(
                    "rabbitmq user {}: configure {}, write {}, read {}, publish {} on {}",
                    u.name, p.configure, p.write, p.read, p.topic_write, p.exchange
                ))?;
            }
        }
    }
    let example = format!(
        "DATABASE_URL={} AMQP_URL={} warren run {}",
        transport::redact(&with_user(
            settings.database_url_of(&roles[0].0),
            &roles[0].1,
            &roles[0].2
        )?),
        transport::redact(&with_user(
            settings.amqp_url.expose_secret(),
            &roles[0].1,
            &roles[0].2
        )?),
        roles[0].0
    );
    if args.json {
        let report = serde_json::json!({
            "namespace": settings.namespace,
            "postgres_roles": pg_roles,
            "rabbitmq_users": amqp_users,
            "run_example": example,
        });
        output::line(&report.to_string())?;
    } else {
        output::line(&format!(
            "run a service with its own credentials, e.g. {example}"
        ))?;
    }
    Ok(())
}

fn chosen(services: &[Service]) -> Vec<String> {
    if services.is_empty() {
        return ALL.iter().map(|s| s.to_string()).collect();
    }
    services.iter().map(|s| s.as_str().to_owned()).collect()
}

/// `url` with `user` and `password` as its credentials; each URL of a
/// comma-separated list of broker nodes (see `transport::nodes`).
pub fn with_user(url: &str, user: &str, password: &SecretString) -> anyhow::Result<String> {
    let each = transport::nodes::urls(url)
        .into_iter()
        .map(|one| {
            let mut u = url::Url::parse(one).map_err(|_| anyhow::anyhow!("not a URL"))?;
            u.set_username(user)
                .and_then(|_| u.set_password(Some(password.expose_secret())))
                .map_err(|_| anyhow::anyhow!("{} cannot carry credentials", u.scheme()))?;
            Ok(u.to_string())
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    Ok(each.join(","))
}

/// Creates or updates each (schema, role, password) in the database of
/// `pool` (see `producers::access::ensure_pg_role`).
pub async fn postgres_roles(
    pool: &PgPool,
    roles: &[(String, String, SecretString)],
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for (schema, role, password) in roles {
        access::ensure_pg_role(&mut conn, role, schema, password)
            .await
            .with_context(|| format!("creating PostgreSQL role {role}"))?;
    }
    Ok(())
}

/// Creates or updates `users` with their permissions in the vhost of
/// `admin_url`, then waits (up to 15 s) until each can log in and use its
/// permissions. `rabbitmqctl` is the command line that runs rabbitmqctl.
pub async fn rabbitmq_users(
    rabbitmqctl: &str,
    admin_url: &str,
    topology: &Topology,
    users: &[AmqpUser],
) -> anyhow::Result<()> {
    let vhost = transport::nodes::vhost(admin_url)?;
    let definitions = access::rabbitmq_definitions(&vhost, users).to_string();
    rabbitmqctl_run(rabbitmqctl, &["import_definitions"], Some(&definitions)).await?;

    // The probe redeclares the events exchange as each user, which needs
    // the configure permission: it succeeds only once the user and its
    // permissions are in force.
    let conn = transport::connect(admin_url, "warren setup").await?;
    let ch = conn.create_channel().await?;
    topology.declare_exchange(&ch).await?;
    let _ = ch.close(200, "setup".into()).await;
    transport::close(conn, "setup").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    for u in users {
        let url = with_user(admin_url, &u.name, &u.password)?;
        loop {
            let probe = async {
                let conn = transport::connect(&url, "warren setup probe").await?;
                let ch = conn.create_channel().await?;
                let declared = topology.declare_exchange(&ch).await;
                // Channel first: closing a connection with an open channel
                // makes lapin log a spurious error.
                let _ = ch.close(200, "probe".into()).await;
                transport::close(conn, "probe").await;
                declared.map_err(anyhow::Error::from)
            };
            match probe.await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "RabbitMQ user {} does not work after the import",
                        u.name
                    )))
                }
                Err(e) => {
                    tracing::debug!(user = %u.name, error = %format!("{e:#}"), "user not in force yet");
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
    }
    Ok(())
}

/// Deletes RabbitMQ users (teardown, tests). Missing ones are fine.
pub async fn delete_rabbitmq_users(rabbitmqctl: &str, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        rabbitmqctl_run(rabbitmqctl, &["delete_user", name], None)
            .await
            .or_else(|e| {
                if format!("{e:#}").contains("does not exist") {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
    }
    Ok(())
}

async fn rabbitmqctl_run(command: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    crate::rabbitmqctl::run(command, args, stdin)
        .await
        .map(drop)
        .context("creating RabbitMQ users (pass --no-broker to leave RabbitMQ alone)")
}
