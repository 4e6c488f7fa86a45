//! `ddit-worker gateway`: the HTTP front door.

use std::time::Duration;

use clap::Args;
use ddit_worker::adapters::redis::RedisConfig;
use ddit_worker::adapters::s3::S3Config;
use ddit_worker::gateway::{self, GatewayConfig, Limits, Tokens};

use super::serve::{AmqpArgs, RedisArgs, S3Args, TlsArgs};

#[derive(Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    s3: S3Args,
    #[command(flatten)]
    redis: RedisArgs,
    /// Seconds the gateway's job records and idempotency keys are kept (as results are).
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "DDIT_RESULT_TTL")]
    result_ttl: u64,
    /// HTTP address of the API, the playground and /openapi.json.
    #[arg(long, default_value = "0.0.0.0:8080", env = "DDIT_GATEWAY_LISTEN")]
    listen: std::net::SocketAddr,
    /// HTTP address of /healthz, /readyz and /metrics (no token: keep it off the public network).
    #[arg(long, default_value = "0.0.0.0:9090", env = "DDIT_GATEWAY_OPS_LISTEN")]
    ops_listen: std::net::SocketAddr,
    /// Seconds a client has to send a request's whole header; the connection is closed after.
    #[arg(long, default_value_t = 10, env = "DDIT_HEADER_TIMEOUT")]
    header_timeout: u64,
    /// Seconds a request (its body included) has to be answered; 408 after. Event streams and
    /// outputs start within it and then stream.
    #[arg(long, default_value_t = 60, env = "DDIT_REQUEST_TIMEOUT")]
    request_timeout: u64,
    /// Open connections per replica; more wait to be accepted.
    #[arg(long, default_value_t = 4096, env = "DDIT_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Event streams one client may hold open on one replica; 429 above it.
    #[arg(long, default_value_t = 16, env = "DDIT_MAX_STREAMS_PER_CLIENT")]
    max_streams_per_client: usize,
    /// Seconds an event stream stays open at most; it then ends without a result, and an
    /// `EventSource` reconnects.
    #[arg(long, default_value_t = 900, env = "DDIT_MAX_STREAM_SECS")]
    max_stream_secs: u64,
    /// The clients: one `name:sha256-hex-of-token[:requests-per-minute[:jobs-in-flight]]` per line.
    #[arg(long, env = "DDIT_TOKENS_FILE")]
    tokens_file: std::path::PathBuf,
    /// Requests per minute per client, over all replicas (0: unlimited); 429 above it.
    #[arg(long, default_value_t = 600, env = "DDIT_RATE_LIMIT")]
    rate_limit: u64,
    /// Jobs per client accepted and without a result yet (0: unlimited); 429 above it.
    #[arg(long, default_value_t = 256, env = "DDIT_MAX_IN_FLIGHT")]
    max_in_flight: usize,
    /// Largest request body in bytes, uploads included; 413 above it.
    #[arg(long, default_value_t = 16 << 20, env = "DDIT_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Largest input image kept in S3, in bytes (the workers' `--max-image-bytes`).
    #[arg(long, default_value_t = 16 << 20, env = "DDIT_MAX_IMAGE_BYTES")]
    max_image_bytes: usize,
    /// Most jobs in one `POST /v1/jobs/batch`.
    #[arg(long, default_value_t = 100, env = "DDIT_MAX_BATCH_JOBS")]
    max_batch_jobs: usize,
    /// Threads serving requests. 1 (one event loop) answers fastest on a small host; scale out
    /// with replicas, or raise it for a replica that should use more cores.
    #[arg(long, default_value_t = 1, env = "DDIT_GATEWAY_THREADS")]
    threads: usize,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info", env = "DDIT_LOG")]
    log: String,
}

impl TryFrom<GatewayArgs> for GatewayConfig {
    type Error = anyhow::Error;

    fn try_from(a: GatewayArgs) -> anyhow::Result<Self> {
        let path = &a.tokens_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--tokens-file {}: {e}", path.display()))?;
        let tokens = Tokens::parse(&text)
            .map_err(|e| anyhow::anyhow!("--tokens-file {}: {e}", path.display()))?;
        let uses = [
            a.amqp.tls_use(),
            ("--redis-url", Some(&a.redis.redis_url)),
            a.s3.tls_use(),
        ];
        let ca_pem = a.tls.ca_pem_for(&uses)?;
        Ok(GatewayConfig {
            amqp: a.amqp.config(1, ca_pem.clone()),
            s3: S3Config {
                ca_pem: ca_pem.clone(),
                ..a.s3.config(a.max_image_bytes)
            },
            redis: RedisConfig {
                url: a.redis.redis_url,
                prefix: a.redis.redis_prefix,
                result_ttl_secs: a.result_ttl,
                ca_pem,
            },
            listen: a.listen,
            ops_listen: a.ops_listen,
            http: gateway::HttpLimits {
                header_timeout: Duration::from_secs(a.header_timeout.max(1)),
                request_timeout: Duration::from_secs(a.request_timeout.max(1)),
                max_connections: a.max_connections.max(1),
            },
            max_streams_per_client: a.max_streams_per_client.max(1),
            max_stream: Duration::from_secs(a.max_stream_secs.max(1)),
            tokens,
            limits: Limits {
                requests_per_minute: a.rate_limit,
                jobs_in_flight: a.max_in_flight,
            },
            max_body_bytes: a.max_body_bytes,
            max_batch_jobs: a.max_batch_jobs.max(1),
            name: "ddit-gateway".into(),
        })
    }
}

pub fn run(a: GatewayArgs) -> anyhow::Result<()> {
    super::init_logging(&a.log);
    let threads = a.threads;
    let cfg = GatewayConfig::try_from(a)?;
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .build()?;
    rt.block_on(gateway::run(cfg, super::serve::shutdown_signal()))?;
    Ok(())
}
