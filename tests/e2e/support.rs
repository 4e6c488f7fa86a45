//! Support for the end-to-end tests: unique names per test, the exported fixture model, a
//! worker process, and clients for the real RabbitMQ, Redis and S3 servers on loopback.
//!
//! The services must be running (`scripts/services.sh up`, which `scripts/test.sh` calls);
//! connection settings come from the variables `scripts/services.sh env` prints, with the same
//! defaults.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddit_schemas::JobResult;

#[path = "support/container.rs"]
pub mod container;
#[path = "support/gateway.rs"]
pub mod gateway;
use ddit_worker::adapters::amqp::{self, AmqpConfig};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Names unique to one test run: queue, dead-letter exchange, Redis and S3 prefixes.
#[derive(Clone, Debug)]
pub struct Names {
    pub id: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    pub redis_prefix: String,
    pub s3_prefix: String,
    /// The queue's `x-delivery-limit` (workers and publishers must agree).
    pub delivery_limit: u32,
}

impl Names {
    /// The flags that put a `serve` or `gateway` process on these names and the test bucket.
    pub fn flags(&self) -> Vec<String> {
        [
            "--queue",
            &self.queue,
            "--dead-letter-exchange",
            &self.dlx,
            "--dead-letter-queue",
            &self.dlq,
            "--redis-prefix",
            &self.redis_prefix,
            "--s3-prefix",
            &self.s3_prefix,
            "--s3-path-style",
            "--s3-bucket",
            &bucket(),
        ]
        .map(String::from)
        .into()
    }

    pub fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let id = format!("{test}-{}-{nanos:x}", std::process::id());
        Self {
            queue: format!("e2e.{id}"),
            dlx: format!("e2e.{id}.dlx"),
            dlq: format!("e2e.{id}.dlq"),
            redis_prefix: format!("e2e:{id}"),
            s3_prefix: format!("e2e/{id}"),
            delivery_limit: 5,
            id,
        }
    }

    pub fn amqp(&self) -> AmqpConfig {
        AmqpConfig {
            url: var("DDIT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            queue: self.queue.clone(),
            prefetch: 4,
            delivery_limit: self.delivery_limit,
            dead_letter_exchange: self.dlx.clone(),
            dead_letter_queue: self.dlq.clone(),
            ca_pem: None,
        }
    }
}

/// The `tiny-f32` fixture exported into `dir`.
pub fn export_model(dir: &Path) -> PathBuf {
    let pkg = dir.join("pkg");
    let mut o = ddit_export::ExportOptions::new(
        workspace().join("tests/fixtures/tiny-f32/checkpoint"),
        &pkg,
    );
    o.blocks_per_segment = Some(2);
    o.name = Some("tiny-f32".into());
    o.text_lengths = ddit_export::LengthOverrides {
        prompt: Some(12),
        caption: Some(10),
        vqa: Some(40),
    };
    ddit_export::convert(&o).unwrap();
    pkg
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bucket() -> String {
    var("DDIT_S3_BUCKET", "ddit-test")
}

/// The built `ddit-worker` binary (the e2e tests run the real thing), or `$DDIT_WORKER_BIN`
/// (the gateway benchmark runs the release build).
pub fn worker_bin() -> PathBuf {
    match std::env::var_os("DDIT_WORKER_BIN") {
        Some(p) => PathBuf::from(p),
        None => built("ddit-worker"),
    }
}

/// `ddit-worker` built with the test-only `fault-injection` feature (`scripts/test.sh` builds it:
/// `cargo build -p ddit-worker --features fault-injection`, copied to this name).
pub fn fault_injection_bin() -> PathBuf {
    built("ddit-worker-fault-injection")
}

fn built(name: &str) -> PathBuf {
    let bin = workspace()
        .join("target")
        .join(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        })
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: build the workspace first",
        bin.display()
    );
    bin
}

/// Connection variables of the loopback services (credentials, AMQP, Redis, S3).
pub fn service_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "GK0ddit0000000000000000001"),
        (
            "AWS_SECRET_ACCESS_KEY",
            "0ddit0test0secret000000000000000000000000000000000000000000000001",
        ),
        ("AWS_REGION", "us-east-1"),
        ("DDIT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("DDIT_REDIS_URL", "redis://127.0.0.1:6379"),
        ("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900"),
        ("DDIT_S3_BUCKET", "ddit-test"),
    ]
    .into_iter()
    .map(|(k, d)| (k.to_string(), var(k, d)))
    .collect()
}

/// A client command (`submit`, `fetch-model`, ...) wired to this test's queue, prefixes and the
/// loopback services.
pub fn client_command(names: &Names, sub: &str) -> Command {
    let mut c = Command::new(worker_bin());
    c.arg(sub).envs(service_env()).envs([
        ("DDIT_QUEUE", names.queue.as_str()),
        ("DDIT_DEAD_LETTER_EXCHANGE", names.dlx.as_str()),
        ("DDIT_DEAD_LETTER_QUEUE", names.dlq.as_str()),
        ("DDIT_REDIS_PREFIX", names.redis_prefix.as_str()),
        ("DDIT_S3_PREFIX", names.s3_prefix.as_str()),
        ("DDIT_S3_PATH_STYLE", "true"),
    ]);
    c
}

/// The sum of a Prometheus counter or gauge over the series whose labels contain every `labels`
/// pair, from a worker's `/metrics`.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A `ddit-worker serve` process.
pub struct Worker {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(names: &Names, model: &Path, log_dir: &Path, label: &str, extra: &[&str]) -> Self {
        Self::start_with_env(names, model, log_dir, label, extra, &[])
    }

    pub fn start_with_env(
        names: &Names,
        model: &Path,
        log_dir: &Path,
        label: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start_bin(&worker_bin(), names, model, log_dir, label, extra, envs)
    }

    /// [`Self::start_with_env`] with another build of the worker.
    pub fn start_bin(
        bin: &Path,
        names: &Names,
        model: &Path,
        log_dir: &Path,
        label: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let log = log_dir.join(format!("{label}.log"));
        // Defaults a test's `extra` flags may override.
        let delivery_limit = names.delivery_limit.to_string();
        let endpoint = var("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900");
        let defaults = [
            ("--s3-endpoint", endpoint.as_str()),
            ("--prefetch", "4"),
            ("--max-batch", "4"),
            ("--threads", "1"),
            ("--delivery-limit", delivery_limit.as_str()),
            ("--log", "info"),
        ];
        let defaults = defaults
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [*flag, *value]);
        let child = Command::new(bin)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(names.flags())
            .args(defaults)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--worker-name",
                label,
            ])
            .args(extra)
            .envs(service_env())
            .envs(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, port, log }
    }

    /// Two workers on the same queue, both ready.
    pub fn start_pair(names: &Names, model: &Path, log_dir: &Path) -> (Self, Self) {
        let mut a = Self::start(names, model, log_dir, "a", &[]);
        let mut b = Self::start(names, model, log_dir, "b", &[]);
        a.wait_ready(Duration::from_secs(60));
        b.wait_ready(Duration::from_secs(60));
        (a, b)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "worker exited early ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if http_get(self.port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "worker not ready: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET on loopback through the worker's own probe client: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    ddit_worker::client::probe::get(
        &format!("http://127.0.0.1:{port}{path}"),
        Duration::from_secs(5),
    )
    .ok()
}

pub async fn s3_client() -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(
        var("AWS_ACCESS_KEY_ID", "GK0ddit0000000000000000001"),
        var(
            "AWS_SECRET_ACCESS_KEY",
            "0ddit0test0secret000000000000000000000000000000000000000000000001",
        ),
        None,
        None,
        "e2e",
    );
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(var("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900"))
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn redis_client() -> redis::Client {
    redis::Client::open(var("DDIT_REDIS_URL", "redis://127.0.0.1:6379")).unwrap()
}

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis_client()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A pub/sub connection subscribed to the workers' results channel (one job id per stored result).
pub async fn results_subscription(names: &Names) -> redis::aio::PubSub {
    let mut pubsub = redis_client().get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}:results", names.redis_prefix))
        .await
        .unwrap();
    pubsub
}

/// Publishes jobs with publisher confirms, declaring the topology first.
pub async fn publish(names: &Names, bodies: &[Vec<u8>]) {
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-client").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare(&ch, &cfg).await.unwrap();
    for b in bodies {
        amqp::publish_job(
            &ch,
            &cfg.queue,
            b,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Messages waiting in a queue.
pub async fn queue_depth(names: &Names, queue: &str) -> u32 {
    queue_state(names, queue).await.message_count()
}

/// Consumers of a queue (a worker that stopped consuming has none there).
pub async fn queue_consumers(names: &Names, queue: &str) -> u32 {
    queue_state(names, queue).await.consumer_count()
}

/// A queue as the broker reports it (a passive declare).
async fn queue_state(names: &Names, queue: &str) -> lapin::Queue {
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-inspect").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    q
}

/// Messages waiting in all the retry queues.
pub async fn retry_depth(names: &Names) -> u32 {
    let mut n = 0;
    for q in names.amqp().retry_queues() {
        n += queue_depth(names, &q).await;
    }
    n
}

/// The key of an `s3://{bucket}/{key}` URI in the test bucket.
pub fn s3_key(uri: &str) -> &str {
    uri.strip_prefix(&format!("s3://{}/", bucket())).unwrap()
}

/// The sha256 (hex) of an object of the test bucket, or why it could not be read.
pub async fn object_sha256(s3: &aws_sdk_s3::Client, key: &str) -> Result<String, String> {
    use sha2::Digest;
    let obj = s3.get_object().bucket(bucket()).key(key).send().await;
    let obj = obj.map_err(|e| format!("missing: {e}"))?;
    let bytes = obj.body.collect().await.map_err(|e| e.to_string())?;
    Ok(ddit_schemas::hex(&sha2::Sha256::digest(bytes.into_bytes())))
}

/// Checks that every output a result names is in S3 with the bytes its sha256 says.
pub async fn assert_outputs_match(results: &[JobResult]) {
    let s3 = s3_client().await;
    for o in results.iter().flat_map(|r| &r.outputs) {
        let sha = object_sha256(&s3, s3_key(&o.uri)).await;
        assert_eq!(sha.as_deref(), Ok(o.sha256.as_str()), "{}", o.uri);
    }
}

/// How many results are stored under the test's prefix.
pub async fn result_count(names: &Names) -> usize {
    let mut r = redis().await;
    let keys: Vec<String> =
        redis::AsyncCommands::keys(&mut r, format!("{}:result:*", names.redis_prefix))
            .await
            .unwrap();
    keys.len()
}

/// Takes every message from the dead-letter queue: (body, its `x-ddit-reason` header).
pub async fn take_dead_letters(names: &Names) -> Vec<(Vec<u8>, Option<String>)> {
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-dlq").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    let opts = lapin::options::BasicGetOptions { no_ack: true };
    while let Some(m) = ch.basic_get(names.dlq.as_str().into(), opts).await.unwrap() {
        let reason = amqp::header(&m.delivery.properties, "x-ddit-reason");
        out.push((m.delivery.data.clone(), reason));
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Waits for results of `ids` in Redis; returns them (missing ones are absent).
pub async fn wait_results(names: &Names, ids: &[String], timeout: Duration) -> Vec<JobResult> {
    use redis::AsyncCommands;
    let mut r = redis().await;
    let start = Instant::now();
    loop {
        let keys: Vec<String> = ids
            .iter()
            .map(|i| format!("{}:result:{i}", names.redis_prefix))
            .collect();
        let vals: Vec<Option<String>> = r.mget(&keys).await.unwrap();
        let got: Vec<JobResult> = vals
            .iter()
            .flatten()
            .map(|v| serde_json::from_str(v).unwrap())
            .collect();
        if got.len() == ids.len() || start.elapsed() > timeout {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn cleanup(names: &Names) {
    use redis::AsyncCommands;
    let mut r = redis().await;
    let keys: Vec<String> = r
        .keys(format!("{}:*", names.redis_prefix))
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: () = r.del(keys).await.unwrap_or(());
    }
    let cfg = names.amqp();
    if let Ok(conn) = amqp::connect(&cfg, "e2e-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let retries = cfg.retry_queues();
            for q in [&names.queue, &names.dlq].into_iter().chain(&retries) {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            let _ = ch
                .exchange_delete(names.dlx.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
