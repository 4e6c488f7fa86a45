//! `ddit-worker serve`, and the connection flags it shares with `submit` and the model store.

use clap::Args;
use ddit_worker::adapters::amqp::AmqpConfig;
use ddit_worker::adapters::redis::RedisConfig;
use ddit_worker::adapters::s3::S3Config;
use ddit_worker::service::{self, ServeConfig};

use super::engine::EngineArgs;

/// The broker and queue (shared by `serve` and `submit`; both declare the queue identically).
#[derive(Args, Clone)]
pub struct AmqpArgs {
    /// AMQP URL (the password is never logged).
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "DDIT_AMQP_URL",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Work queue (a durable quorum queue, declared if absent).
    #[arg(long, default_value = "ddit.jobs", env = "DDIT_QUEUE")]
    queue: String,
    /// Attempts per job: the last one stores a final `failed` result and dead-letters the message
    /// (also the quorum queue's `x-delivery-limit`, which catches what no worker could count).
    #[arg(long, default_value_t = 5, env = "DDIT_DELIVERY_LIMIT")]
    delivery_limit: u32,
    /// Dead-letter exchange (fanout); its queue is `{exchange}.queue` unless set.
    #[arg(long, default_value = "ddit.dlx", env = "DDIT_DEAD_LETTER_EXCHANGE")]
    dead_letter_exchange: String,
    #[arg(long, env = "DDIT_DEAD_LETTER_QUEUE")]
    dead_letter_queue: Option<String>,
}

impl AmqpArgs {
    /// What `--tls-ca-file` checks: the flag and its URL.
    pub fn tls_use(&self) -> TlsUse<'_> {
        ("--amqp-url", Some(&self.amqp_url))
    }

    pub fn config(self, prefetch: u16, ca_pem: Option<String>) -> AmqpConfig {
        AmqpConfig {
            ca_pem,
            url: self.amqp_url,
            queue: self.queue,
            prefetch: prefetch.max(1),
            delivery_limit: self.delivery_limit.max(1),
            dead_letter_queue: self
                .dead_letter_queue
                .unwrap_or_else(|| format!("{}.queue", self.dead_letter_exchange)),
            dead_letter_exchange: self.dead_letter_exchange,
        }
    }
}

/// TLS trust for `amqps://` and `rediss://` (shared by `serve` and `submit`).
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// PEM file of a private CA that the certificates of amqps://, rediss:// and https S3
    /// servers are verified against.
    #[arg(long, env = "DDIT_TLS_CA_FILE")]
    tls_ca_file: Option<std::path::PathBuf>,
}

/// A connection `--tls-ca-file` is meant for: its flag and URL (`None`: the default, TLS).
pub type TlsUse<'a> = (&'static str, Option<&'a String>);

impl TlsArgs {
    /// [`Self::ca_pem`], for a command connecting to `uses`: with a CA file, each of them must be
    /// TLS (`amqps://`, `rediss://`, `https://`). A plaintext one is an error naming its flag and
    /// scheme (never the URL, which may hold a password): the CA would go unused and the
    /// connection unencrypted.
    pub fn ca_pem_for(&self, uses: &[TlsUse<'_>]) -> anyhow::Result<Option<String>> {
        if self.tls_ca_file.is_some() {
            for (flag, url) in uses {
                let Some(url) = url else { continue };
                let scheme = url.split_once("://").map_or("", |(s, _)| s);
                let tls = ["amqps", "rediss", "https"];
                if !tls.iter().any(|t| scheme.eq_ignore_ascii_case(t)) {
                    anyhow::bail!(
                        "--tls-ca-file is given but {flag} is not a TLS URL (scheme `{scheme}`): \
                         the CA would go unused and the connection unencrypted; use a TLS \
                         URL (amqps://, rediss://, https://) or drop --tls-ca-file"
                    );
                }
            }
        }
        self.ca_pem()
    }

    pub fn ca_pem(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--tls-ca-file {}: {e}", path.display()))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            anyhow::bail!("--tls-ca-file {}: no PEM certificate in it", path.display());
        }
        Ok(Some(pem))
    }
}

/// Where S3 is. Credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); they are never logged.
#[derive(Args, Clone)]
pub struct S3ConnArgs {
    /// S3 endpoint, e.g. http://127.0.0.1:3900 (unset: AWS).
    #[arg(long, env = "DDIT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1", env = "DDIT_S3_REGION")]
    s3_region: String,
    /// Path-style addressing (local S3 servers).
    #[arg(long, env = "DDIT_S3_PATH_STYLE")]
    s3_path_style: bool,
}

impl S3ConnArgs {
    /// What `--tls-ca-file` checks (unset: AWS, over https).
    pub fn tls_use(&self) -> TlsUse<'_> {
        ("--s3-endpoint", self.s3_endpoint.as_ref())
    }

    pub fn config(self, bucket: String, prefix: String, max_input_bytes: usize) -> S3Config {
        S3Config {
            endpoint: self.s3_endpoint,
            region: self.s3_region,
            bucket,
            prefix,
            path_style: self.s3_path_style,
            input_buckets: vec![],
            max_input_bytes,
            ca_pem: None,
        }
    }
}

/// The bucket and key prefix of a fleet.
#[derive(Args, Clone)]
pub struct S3Args {
    #[command(flatten)]
    conn: S3ConnArgs,
    /// Bucket for generated images (and, for `submit`, uploaded inputs).
    #[arg(long, env = "DDIT_S3_BUCKET")]
    s3_bucket: String,
    /// Key prefix: images go to `{prefix}/{job_id}/{n}-{sha256}.png`, submitted inputs to
    /// `{prefix}/inputs/{batch}/`.
    #[arg(long, default_value = "ddit", env = "DDIT_S3_PREFIX")]
    s3_prefix: String,
}

impl S3Args {
    pub fn tls_use(&self) -> TlsUse<'_> {
        self.conn.tls_use()
    }

    pub fn config(self, max_input_bytes: usize) -> S3Config {
        self.conn
            .config(self.s3_bucket, self.s3_prefix, max_input_bytes)
    }
}

/// Where results live.
#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Redis URL.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        env = "DDIT_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Redis key prefix.
    #[arg(long, default_value = "ddit", env = "DDIT_REDIS_PREFIX")]
    pub redis_prefix: String,
}

/// `serve`: the engine flags and the service's own.
#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Settings of `serve`.
#[derive(Args, Clone)]
struct ServeArgs {
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Unacknowledged deliveries per worker (default: `2 × --max-batch × --inference-threads`,
    /// so the next batch's jobs wait in memory while the last one's images upload).
    #[arg(long, env = "DDIT_PREFETCH")]
    prefetch: Option<u16>,
    #[command(flatten)]
    s3: S3Args,
    /// Extra buckets input images may be read from (comma-separated; the output bucket always may).
    #[arg(long, value_delimiter = ',', env = "DDIT_S3_INPUT_BUCKETS")]
    s3_input_buckets: Vec<String>,
    #[command(flatten)]
    redis: RedisArgs,
    /// Seconds a result is kept in Redis.
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "DDIT_RESULT_TTL")]
    result_ttl: u64,
    /// Most rows in one forward pass.
    #[arg(long, default_value_t = 8, env = "DDIT_MAX_BATCH")]
    max_batch: usize,
    /// Seconds allowed to finish in-flight jobs after SIGTERM/SIGINT; the rest are requeued.
    #[arg(long, default_value_t = 30, env = "DDIT_SHUTDOWN_DEADLINE")]
    shutdown_deadline: u64,
    /// HTTP address for /healthz, /readyz, /metrics.
    #[arg(long, default_value = "0.0.0.0:9090", env = "DDIT_LISTEN")]
    listen: std::net::SocketAddr,
    /// Milliseconds an idle inference thread keeps admitting arriving jobs (up to `--max-batch`
    /// rows) before its first forward pass, so that a burst starts as full batches; 0: at once.
    #[arg(long, default_value_t = 20, env = "DDIT_BATCH_WINDOW_MS")]
    batch_window_ms: u64,
    /// Least milliseconds between two progress events of one job.
    #[arg(long, default_value_t = 500, env = "DDIT_PROGRESS_INTERVAL_MS")]
    progress_interval_ms: u64,
    /// Milliseconds before the first retry of a transient failure; doubled per attempt (at most
    /// 60 s) and jittered. `--delivery-limit` is the number of attempts.
    #[arg(long, default_value_t = 2000, env = "DDIT_RETRY_DELAY_MS")]
    retry_delay_ms: u64,
    /// Consecutive device faults (CUDA illegal address, launch failure, ECC, ...) after which the
    /// worker stops consuming, gives back its jobs uncharged and fails /healthz and /readyz; 0: off.
    #[arg(long, default_value_t = 3, env = "DDIT_BREAKER_THRESHOLD")]
    breaker_threshold: u32,
    /// OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces (unset: no export).
    #[arg(long, env = "DDIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Name of this worker (AMQP connection name, consumer tag).
    #[arg(long, default_value = "ddit-worker", env = "DDIT_WORKER_NAME")]
    worker_name: String,
}

impl TryFrom<ServeCmd> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(c: ServeCmd) -> anyhow::Result<Self> {
        let (e, s) = (c.engine, c.serve);
        let uses = [
            s.amqp.tls_use(),
            ("--redis-url", Some(&s.redis.redis_url)),
            s.s3.tls_use(),
        ];
        let ca_pem = s.tls.ca_pem_for(&uses)?;
        let threads = e.threads(&e.read_manifest()?, None)?;
        let rows = 2 * s.max_batch.max(1) * threads.inference;
        let prefetch = s
            .prefetch
            .unwrap_or_else(|| u16::try_from(rows).unwrap_or(u16::MAX));
        Ok(ServeConfig {
            amqp: s.amqp.config(prefetch, ca_pem.clone()),
            s3: S3Config {
                input_buckets: s.s3_input_buckets,
                ca_pem: ca_pem.clone(),
                ..s.s3.config(e.max_image_bytes)
            },
            redis: RedisConfig {
                url: s.redis.redis_url,
                prefix: s.redis.redis_prefix,
                result_ttl_secs: s.result_ttl,
                ca_pem,
            },
            engine: e.config(s.max_batch, threads.intra)?,
            runner: ddit_worker::runner::RunnerConfig {
                progress_every: std::time::Duration::from_millis(s.progress_interval_ms),
                batch_window: std::time::Duration::from_millis(s.batch_window_ms),
                ..e.runner(s.max_batch)
            },
            model: e.model,
            inference_threads: threads.inference,
            shutdown_deadline: std::time::Duration::from_secs(s.shutdown_deadline),
            listen: s.listen,
            retry_delay: std::time::Duration::from_millis(s.retry_delay_ms),
            breaker_threshold: s.breaker_threshold,
            name: s.worker_name,
        })
    }
}

pub fn run(c: ServeCmd) -> anyhow::Result<()> {
    let (log, otlp) = (c.engine.log.clone(), c.serve.otlp_endpoint.clone());
    let cfg = ServeConfig::try_from(c)?;
    let mut telemetry = service::telemetry::init_telemetry(&log, otlp.as_deref(), &cfg.name)?;
    let rt = super::runtime()?;
    let res = rt.block_on(service::serve(cfg, shutdown_signal()));
    telemetry.shutdown();
    // Inference threads may still be finishing a job that was requeued; the process ends here.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res.map_err(Into::into)
}

/// Resolves on SIGTERM or SIGINT.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_with_a_plaintext_url_is_an_error_naming_the_flag() {
        let d = tempfile::tempdir().expect("tmp");
        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let tls = TlsArgs {
            tls_ca_file: Some(ca),
        };
        let amqps = "amqps://u:hunter2@h/%2f".to_string();
        let redis = "redis://:hunter2@h:6379".to_string();
        let rediss = "rediss://:hunter2@h:6390".to_string();
        let http = "http://h:3900".to_string();
        let e = tls
            .ca_pem_for(&[("--amqp-url", Some(&amqps)), ("--redis-url", Some(&redis))])
            .expect_err("plaintext redis")
            .to_string();
        assert!(e.contains("--redis-url") && e.contains("`redis`"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = tls
            .ca_pem_for(&[("--s3-endpoint", Some(&http))])
            .expect_err("plaintext s3")
            .to_string();
        assert!(e.contains("--s3-endpoint"), "{e}");
        let all_tls = [
            ("--amqp-url", Some(&amqps)),
            ("--redis-url", Some(&rediss)),
            ("--s3-endpoint", None),
        ];
        assert!(tls.ca_pem_for(&all_tls).expect("tls").is_some());
        // Without a CA file, plaintext is allowed.
        let none = TlsArgs { tls_ca_file: None };
        assert!(none.ca_pem_for(&[("--redis-url", Some(&redis))]).is_ok());
    }
}
