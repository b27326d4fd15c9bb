//! Least privilege: each service gets its own PostgreSQL role and its own
//! RabbitMQ user, both named `<namespace>_<service>` (`warren_orders` for
//! the default namespace), that reach only what that service owns.
//!
//! PostgreSQL: the role may use its schema (tables, including the outbox
//! and inbox, and sequences) and nothing else; other schemas stay closed
//! (no `USAGE`), so any query there fails with SQLSTATE 42501. Roles are
//! cluster-global but grants are per database, so [`ensure_pg_role`]
//! tolerates a concurrent creation of the same role and serialises its own
//! grants with a transaction-scoped advisory lock.
//!
//! RabbitMQ: [`AmqpPermissions::for_service`] gives the configure/write/read
//! regexes of the vhost and the topic permission on the events exchange; a
//! caller with administrator rights installs them (the CLI pipes
//! [`rabbitmq_definitions`] into `rabbitmqctl import_definitions`).

use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};

use transport::Topology;

/// Passwords are `secrecy`'s strings: `Debug` prints `[REDACTED]`, the
/// memory is zeroed on drop, and the text is read only through
/// [`ExposeSecret::expose_secret`], at the few places that must send it.
/// Re-exported so callers need no `secrecy` of their own.
pub use secrecy::{ExposeSecret, SecretString};

/// `<namespace>_<service>`: the PostgreSQL role and the RabbitMQ user of a
/// service. Tests use random namespaces, so their roles and users never
/// collide with each other's on the shared (cluster-global) servers.
pub fn principal(namespace: &str, service: &str) -> String {
    format!("{namespace}_{service}")
}

/// Creates the login role `role` with `password`, or sets the password of
/// an existing one (idempotent), then grants it its own `schema` in the
/// connected database and nothing else.
///
/// The password travels as a bind parameter into a session-local function
/// that builds the DDL on the server, so it is in no statement text that
/// `sqlx` logs.
pub async fn ensure_pg_role(
    conn: &mut PgConnection,
    role: &str,
    schema: &str,
    password: &SecretString,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    // Concurrent GRANTs on one object fail with "tuple concurrently
    // updated"; one setup at a time per database avoids it.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('warren access setup'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        r#"CREATE OR REPLACE FUNCTION pg_temp.warren_ensure_role(r text, pw text)
           RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
             BEGIN
               EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', r, pw);
             EXCEPTION
               -- Another database's setup (roles are cluster-global)
               -- created it first: 42710, or 23505 when both raced on
               -- the catalog's unique index.
               WHEN duplicate_object OR unique_violation THEN
                 EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', r, pw);
             END;
           END $$"#,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_temp.warren_ensure_role($1, $2)")
        .bind(role)
        .bind(password.expose_secret())
        .execute(&mut *tx)
        .await?;
    let (r, s) = (quote_ident(role), quote_ident(schema));
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *tx)
        .await?;
    // Default privileges cover tables that later migrations or installer
    // steps (run by this same administrator) add to the schema.
    let grants = format!(
        "GRANT CONNECT ON DATABASE {db} TO {r};
         GRANT USAGE ON SCHEMA {s} TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r};
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {s} TO {r};
         ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r};
         ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {r};",
        db = quote_ident(&db)
    );
    sqlx::raw_sql(&grants).execute(&mut *tx).await?;
    tx.commit().await
}

/// Removes `role`'s privileges in the connected database and then the role
/// itself; a role still granted something in another database stays (and
/// the error says so). For tests and teardown.
pub async fn drop_pg_role(conn: &mut PgConnection, role: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Ok(());
    }
    let r = quote_ident(role);
    sqlx::raw_sql(&format!("DROP OWNED BY {r}; DROP ROLE {r};"))
        .execute(conn)
        .await
        .map(|_| ())
}

/// A PostgreSQL identifier, quoted.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// What one service's RabbitMQ user may do in the vhost: anchored regexes
/// over resource names, as `rabbitmqctl set_permissions` takes them, plus
/// the routing keys it may publish to the events exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpPermissions {
    /// Declare and delete: its own queues, and the events and outcomes
    /// exchanges, which the runtime (re)declares on every connect.
    pub configure: String,
    /// Publish and bind: its own queues (a binding needs write on the
    /// queue), the events and outcomes exchanges, and `amq.default`, the
    /// default exchange through which retries and dead letters go to the
    /// service's own queues (and which a queue's dead-letter arguments
    /// must be allowed to name).
    pub write: String,
    /// Consume and bind from: its own queues and the events exchange.
    pub read: String,
    /// The events exchange the topic permission applies to.
    pub exchange: String,
    /// Routing keys the user may publish on the events exchange: the
    /// types its service raises, so a service cannot forge another's.
    pub topic_write: String,
}

impl AmqpPermissions {
    /// The permissions of `service` in `topology`'s namespace.
    ///
    /// One gap RabbitMQ leaves: write on `amq.default` allows publishing
    /// to *any* queue by name, since the default exchange's bindings are
    /// implicit; permissions cannot tie it to the service's own queues.
    pub fn for_service(topology: &Topology, catalog: &events::Catalog, service: &str) -> Self {
        let own = format!(
            "{}(\\.dlq|\\.retry\\.[0-9]+|\\.partitions|\\.p[0-9]+|\\.p\\.retry\\.[0-9]+)?",
            regex_escape(&topology.queue(service))
        );
        let events = regex_escape(&topology.exchange());
        let outcomes = regex_escape(&topology.outcomes_exchange());
        let raised: Vec<String> = catalog.raised_by(service).map(regex_escape).collect();
        AmqpPermissions {
            configure: format!("^({own}|{events}|{outcomes})$"),
            write: format!("^({own}|{events}|{outcomes}|amq\\.default)$"),
            read: format!("^({own}|{events})$"),
            exchange: topology.exchange(),
            // No raised types: an empty alternation matches nothing
            // publishable (routing keys of events are never empty).
            topic_write: format!("^({})$", raised.join("|")),
        }
    }
}

/// Escapes regex metacharacters (namespaces are free text).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RabbitMQ user to create.
#[derive(Debug, Clone)]
pub struct AmqpUser {
    /// User name.
    pub name: String,
    /// Its password.
    pub password: SecretString,
    /// What it may do.
    pub permissions: AmqpPermissions,
}

/// RabbitMQ definitions (the JSON `rabbitmqctl import_definitions` and the
/// management API take) creating or updating `users` in `vhost`. Only a
/// salted SHA-256 hash of each password is in it, never the password.
pub fn rabbitmq_definitions(vhost: &str, users: &[AmqpUser]) -> serde_json::Value {
    json!({
        "users": users.iter().map(|u| json!({
            "name": u.name,
            "password_hash": rabbitmq_password_hash(&u.password, salt()),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": "",
        })).collect::<Vec<_>>(),
        "permissions": users.iter().map(|u| json!({
            "user": u.name,
            "vhost": vhost,
            "configure": u.permissions.configure,
            "write": u.permissions.write,
            "read": u.permissions.read,
        })).collect::<Vec<_>>(),
        "topic_permissions": users.iter().map(|u| json!({
            "user": u.name,
            "vhost": vhost,
            "exchange": u.permissions.exchange,
            "write": u.permissions.topic_write,
            "read": ".*",
        })).collect::<Vec<_>>(),
    })
}

fn salt() -> [u8; 4] {
    let b = *uuid::Uuid::new_v4().as_bytes();
    [b[0], b[1], b[2], b[3]]
}

/// RabbitMQ's `rabbit_password_hashing_sha256`:
/// base64(salt ‖ SHA-256(salt ‖ password)) with a 4-byte salt.
pub fn rabbitmq_password_hash(password: &SecretString, salt: [u8; 4]) -> String {
    use base64::Engine as _;
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.expose_secret().as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_cover_own_queues_only() {
        macro_rules! sample {
            ($ty:ident = $name:literal from $src:literal) => {
                #[derive(serde::Serialize, serde::Deserialize)]
                struct $ty {}
                impl events::EventData for $ty {
                    const TYPE: &'static str = $name;
                    const VERSION: u32 = 1;
                    const SOURCE: &'static str = $src;
                }
            };
        }
        sample!(Opened = "ticket.opened" from "helpdesk");
        sample!(Closed = "ticket.closed" from "helpdesk");
        sample!(Sent = "invoice.sent" from "billing");
        let catalog = events::Catalog::new()
            .with::<Opened>()
            .with::<Sent>()
            .with::<Closed>();
        let p = AmqpPermissions::for_service(&Topology::new("warren"), &catalog, "helpdesk");
        assert_eq!(
            p.configure,
            r"^(warren\.helpdesk(\.dlq|\.retry\.[0-9]+|\.partitions|\.p[0-9]+|\.p\.retry\.[0-9]+)?|warren\.events|warren\.outcomes)$"
        );
        assert!(p.write.ends_with(r"|amq\.default)$"), "{}", p.write);
        assert_eq!(p.topic_write, r"^(ticket\.opened|ticket\.closed)$");
    }

    #[test]
    fn password_hash_matches_rabbitmq() {
        // From RabbitMQ's documentation of the algorithm: salt 908D C60A,
        // password "test12".
        let h = rabbitmq_password_hash(&SecretString::from("test12"), [0x90, 0x8d, 0xc6, 0x0a]);
        assert_eq!(h, "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR");
    }

    #[test]
    fn password_debug_is_masked() {
        let debug = format!("{:?}", SecretString::from("s3cret"));
        assert!(
            !debug.contains("s3cret") && debug.contains("REDACTED"),
            "{debug}"
        );
    }
}
