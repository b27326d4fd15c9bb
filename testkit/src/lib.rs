//! Integration-test harness, shared by every crate's tests (a dev-only
//! crate). Each test gets its own namespace of exchanges and queues
//! (and, from `#[sqlx::test]`, its own database), so tests run in parallel
//! against the real RabbitMQ and PostgreSQL and leave nothing behind:
//! [`TestBus`] deletes what it declared when dropped, and its queues carry
//! `x-expires` so even a test killed mid-way is cleaned up by the broker.
//! [`Proxy`] cuts one test's connections without touching the shared
//! servers; [`TlsProxy`] gives one test a TLS listener of its own in front
//! of the plain broker; [`Blocker`] makes the broker nack publishes;
//! [`capture::Capture`] records spans and events for tests of tracing.

pub mod capture;
pub mod sample;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use events::Envelope;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use rand::Rng;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use transport::Topology;

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh namespace on the real broker, removed on drop.
pub struct TestBus {
    /// The random namespace, e.g. `t3f9a1c2e`.
    pub namespace: String,
    /// Its topology (queues expire after 10 unused minutes).
    pub topology: Topology,
    /// A connection for the test's own use.
    pub conn: Connection,
    /// A channel on it.
    pub channel: Channel,
    /// Services whose queues are deleted on drop.
    services: Mutex<Vec<(String, Vec<Duration>)>>,
    /// Partitioned services (name, partitions, retry delays) whose
    /// partitions, retry queues and hash exchange are deleted on drop.
    partitioned: Mutex<Vec<(String, u16, Vec<Duration>)>>,
}

impl TestBus {
    /// Connects and declares the namespace's exchange.
    pub async fn new() -> TestBus {
        let namespace = format!("t{:08x}", rand::thread_rng().gen::<u32>());
        let mut topology = Topology::new(namespace.clone());
        topology.expires = Some(Duration::from_secs(600));
        let conn = transport::connect(&amqp_url(), "warren test")
            .await
            .expect("RabbitMQ must be running for integration tests");
        let channel = conn.create_channel().await.expect("channel");
        topology.declare_exchange(&channel).await.expect("exchange");
        TestBus {
            namespace,
            topology,
            conn,
            channel,
            services: Mutex::new(Vec::new()),
            partitioned: Mutex::new(Vec::new()),
        }
    }

    /// Declares a consuming service's queues and records them for cleanup.
    pub async fn declare_service(&self, service: &str, bindings: &[&str], delays: &[Duration]) {
        self.topology
            .declare_service(&self.conn, service, bindings, delays)
            .await
            .expect("declare service");
        self.remember(service, delays);
    }

    /// Records a service whose queues someone else declared, for cleanup.
    pub fn remember(&self, service: &str, delays: &[Duration]) {
        self.services
            .lock()
            .expect("lock")
            .push((service.to_owned(), delays.to_vec()));
    }

    /// Records a partitioned service (declared by its subscription) for
    /// cleanup: its partitions, retry queues, hash exchange and dead-letter
    /// queue.
    pub fn remember_partitioned(&self, service: &str, partitions: u16, delays: &[Duration]) {
        self.partitioned.lock().expect("lock").push((
            service.to_owned(),
            partitions,
            delays.to_vec(),
        ));
    }

    /// An exclusive queue bound to `pattern` that sees everything the
    /// exchange routes there: the test's view of the bus.
    pub async fn wiretap(&self, pattern: &str) -> Wiretap {
        Wiretap::open(&self.conn, &self.topology.exchange(), pattern).await
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let services =
            std::mem::take(&mut *self.services.lock().unwrap_or_else(|e| e.into_inner()));
        let partitioned =
            std::mem::take(&mut *self.partitioned.lock().unwrap_or_else(|e| e.into_inner()));
        // Drop cannot await: clean up on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let Ok(conn) = transport::connect(&amqp_url(), "warren test cleanup").await else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for (service, partitions, delays) in partitioned {
                    let _ = topology
                        .delete_partitions(&ch, &service, partitions, &delays)
                        .await;
                }
                for (service, delays) in services {
                    let _ = topology.delete_service(&ch, &service, &delays).await;
                }
                let _ = topology.delete_exchange(&ch).await;
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// What a wiretap saw: the decoded event and the AMQP properties.
#[derive(Debug, Clone)]
pub struct Tapped {
    /// The event.
    pub event: Envelope,
    /// AMQP routing key.
    pub routing_key: String,
    /// AMQP properties as sent.
    pub properties: lapin::BasicProperties,
}

/// A consumer on an exclusive queue.
pub struct Wiretap {
    _channel: Channel,
    consumer: Consumer,
}

impl Wiretap {
    /// A wiretap on `exchange` over a connection of the caller's (one
    /// made through a TLS proxy, say).
    pub async fn open(conn: &lapin::Connection, exchange: &str, pattern: &str) -> Wiretap {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("wiretap queue");
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind wiretap");
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "wiretap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume wiretap");
        Wiretap {
            _channel: ch,
            consumer,
        }
    }

    /// The next event, or `None` after `timeout` of silence.
    pub async fn next(&mut self, timeout: Duration) -> Option<Tapped> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .expect("wiretap delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        // Read as it stands, without a catalog: the tap shows what is on
        // the bus, whatever its type.
        let event: Envelope = serde_json::from_slice(&delivery.data).expect("wiretap decode");
        Some(Tapped {
            event,
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties.clone(),
        })
    }

    /// Collects events until `n` arrived or `quiet` passed without one.
    pub async fn collect(&mut self, n: usize, quiet: Duration) -> Vec<Tapped> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(quiet).await {
                Some(t) => out.push(t),
                None => break,
            }
        }
        out
    }

    /// Collects until every id of `want` has been seen at least once, or
    /// `deadline` passes. Counting messages is not enough where the relay
    /// may republish (a crash between confirm and mark): duplicates would
    /// fill the count before the last events arrive.
    pub async fn collect_until_seen(
        &mut self,
        want: &[uuid::Uuid],
        deadline: Duration,
    ) -> Vec<Tapped> {
        let mut missing: std::collections::HashSet<uuid::Uuid> = want.iter().copied().collect();
        let end = tokio::time::Instant::now() + deadline;
        let mut out = Vec::new();
        while !missing.is_empty() {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.next(left).await {
                Some(t) => {
                    missing.remove(&t.event.id);
                    out.push(t);
                }
                None => break,
            }
        }
        out
    }
}

/// A TCP proxy in front of a real server, so a test can cut one client's
/// connection without stopping the server other tests share.
pub struct Proxy {
    /// Where clients connect instead of the server.
    pub addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    /// Connections forwarded so far (refused ones while cut not counted),
    /// so a test can tell which of several proxies a client went through.
    forwarded: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let forwarded = Arc::new(AtomicUsize::new(0));
        let target = target.to_owned();
        let (d, c, f) = (down.clone(), conns.clone(), forwarded.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                f.fetch_add(1, Ordering::SeqCst);
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().expect("lock").push(task);
            }
        });
        Proxy {
            addr,
            down,
            forwarded,
            conns,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for task in self.conns.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// How many connections were forwarded to the target so far.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// An AMQP URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A TLS-terminating proxy in front of a plain server: a TLS listener of
/// the test's own, so `amqps://` can be tested against the shared broker
/// without reconfiguring or restarting it. It presents a certificate for
/// `localhost` signed by a CA made for this proxy alone, which no system
/// trust store knows; the CA is written to [`TlsProxy::ca_file`] for the
/// client to trust, and removed on drop.
pub struct TlsProxy {
    /// Where clients connect (TLS) instead of the server.
    pub addr: std::net::SocketAddr,
    /// This proxy's CA certificate, PEM.
    pub ca_file: PathBuf,
    /// TLS handshakes completed: a client that rejected the certificate
    /// does not count.
    handshakes: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl TlsProxy {
    /// Starts a TLS proxy on a free loopback port forwarding plaintext to
    /// `target`.
    pub async fn start(target: &str) -> TlsProxy {
        use tokio_rustls::rustls;

        let (ca_pem, chain, key) = localhost_certificate();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS proxy");
        let addr = listener.local_addr().expect("addr");
        let ca_file = std::env::temp_dir().join(format!(
            "warren-test-ca-{:016x}.pem",
            rand::thread_rng().gen::<u64>()
        ));
        std::fs::write(&ca_file, ca_pem).expect("write test CA");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = target.to_owned();
        let (h, c) = (handshakes.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, target, h) = (acceptor.clone(), target.clone(), h.clone());
                let task = tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = copy_bidirectional(&mut tls, &mut outbound).await;
                    }
                });
                c.lock().expect("lock").push(task);
            }
        });
        TlsProxy {
            addr,
            ca_file,
            handshakes,
            conns,
            accept,
        }
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// `amqps://user:password@localhost:PORT/%2f`: host `localhost`, the
    /// name in the certificate, and no `cacertfile`.
    pub fn amqps_url(&self, user: &str, password: &str) -> String {
        format!(
            "amqps://{user}:{password}@localhost:{}/%2f",
            self.addr.port()
        )
    }

    /// [`TlsProxy::amqps_url`] with `?cacertfile=` this proxy's CA.
    pub fn amqps_url_trusting_ca(&self, user: &str, password: &str) -> String {
        let path = self.ca_file.to_string_lossy();
        let encoded: String = url::form_urlencoded::byte_serialize(path.as_bytes()).collect();
        format!("{}?cacertfile={encoded}", self.amqps_url(user, password))
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// A fresh CA (PEM) and a certificate chain and key for `localhost` that
/// it signed.
fn localhost_certificate() -> (
    String,
    Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "warren test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = server
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    (
        ca_cert.pem(),
        vec![cert.der().clone()],
        tokio_rustls::rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

/// A queue that makes the broker refuse publishes, for tests of what a
/// publisher does with a nack: `x-max-length: 1` with `x-overflow:
/// reject-publish`, filled with one message, so the broker nacks every
/// publish routed to it (RabbitMQ still delivers such a message to the
/// other queues it was routed to; only the confirm says no). Delete it
/// with [`Blocker::delete`], or release it and delete it by name; it
/// expires after 10 unused minutes in any case.
pub struct Blocker {
    /// The queue's name.
    pub name: String,
    channel: Channel,
}

impl Blocker {
    /// Declares a full blocker named `name`, bound to the bus's events
    /// exchange with `pattern` (or unbound: publishes reach it by name
    /// through the default exchange), and checks that it really nacks.
    pub async fn new(bus: &TestBus, name: &str, pattern: Option<&str>) -> Blocker {
        let channel = bus.conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
        channel
            .queue_declare(name.into(), QueueDeclareOptions::default(), args)
            .await
            .expect("declare blocker");
        if let Some(pattern) = pattern {
            channel
                .queue_bind(
                    name.into(),
                    bus.topology.exchange().into(),
                    pattern.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind blocker");
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let blocker = Blocker {
            name: name.to_owned(),
            channel,
        };
        assert!(blocker.offer().await, "the empty blocker takes one message");
        assert!(
            !blocker.offer().await,
            "the full blocker nacks the next publish"
        );
        blocker
    }

    /// Publishes a filler straight to the queue; whether the broker acked.
    pub async fn offer(&self) -> bool {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions::default(),
                b"filler",
                BasicProperties::default(),
            )
            .await
            .expect("publish filler")
            .await
            .expect("filler confirm");
        match confirm {
            Confirmation::Ack(_) => true,
            Confirmation::Nack(_) => false,
            Confirmation::NotRequested => panic!("confirms not enabled"),
        }
    }

    /// Makes the queue take messages again: purges the filler and consumes
    /// (acking) whatever comes, so it never fills up; the wiretap gives the
    /// events it takes from now on.
    pub async fn release(self) -> Wiretap {
        self.channel
            .queue_purge(self.name.as_str().into(), QueuePurgeOptions::default())
            .await
            .expect("purge blocker");
        self.channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = self
            .channel
            .basic_consume(
                self.name.as_str().into(),
                "blocker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume blocker");
        Wiretap {
            _channel: self.channel,
            consumer,
        }
    }

    /// Deletes the queue.
    pub async fn delete(self) {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete blocker");
    }
}
