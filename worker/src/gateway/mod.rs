//! `ddit-worker gateway`: an HTTP front door to the same queue the workers consume.
//!
//! Stateless: what it knows of a job lives in Redis (records, idempotency keys, limits; see
//! [`crate::adapters::redis::gateway`]), so replicas scale horizontally behind any load balancer.
//! A job is validated against `schemas/job.schema.json`, its `data:` or uploaded images are put
//! in S3, and it is published with a broker confirm before the client gets its `202`.
//! [`api`] holds the `/v1` routes and their OpenAPI document; [`auth`] the tokens and limits;
//! [`events`] status and Server-Sent Events over the replica's one pub/sub connection ([`hub`]);
//! [`server`] the HTTP limits; the playground page is `playground.html`. Health, readiness and
//! metrics are served on their own address (`--ops-listen`), never on the public one.

mod api;
pub mod auth;
mod error;
mod events;
mod hub;
mod limits;
mod server;
mod submit;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::adapters::amqp::{self, AmqpConfig};
use crate::adapters::redis::{RedisConfig, ResultStore};
use crate::adapters::s3::{S3Config, S3Store};
use crate::adapters::with_backoff;
use crate::error::{Result, WorkerError};
pub use auth::{Limits, Tokens};
pub use server::HttpLimits;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub amqp: AmqpConfig,
    pub s3: S3Config,
    pub redis: RedisConfig,
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics` (no token; keep it off the public network).
    pub ops_listen: SocketAddr,
    pub http: HttpLimits,
    /// Event streams one client may hold open on one replica.
    pub max_streams_per_client: usize,
    /// The longest an event stream stays open (an `EventSource` reconnects).
    pub max_stream: std::time::Duration,
    pub tokens: Tokens,
    /// Each client's limits unless its line in the tokens file sets its own.
    pub limits: Limits,
    /// Largest request body (413 above it); uploads count.
    pub max_body_bytes: usize,
    /// Most jobs in one `POST /v1/jobs/batch`.
    pub max_batch_jobs: usize,
    /// The broker connection's name.
    pub name: String,
}

pub struct Gateway {
    cfg: GatewayConfig,
    redis: ResultStore,
    s3: S3Store,
    schema: jsonschema::Validator,
    link: tokio::sync::Mutex<Option<(lapin::Connection, lapin::Channel)>>,
    /// Whether the link was up at its last use (read by `/readyz` while another holds `link`).
    link_up: std::sync::atomic::AtomicBool,
    limiter: limits::Limiter,
    hub: Arc<hub::Hub>,
    metrics: GatewayMetrics,
    /// Set when shutdown begins: open event streams end, so that in-flight requests can finish.
    stopping: tokio::sync::watch::Sender<bool>,
}

struct GatewayMetrics {
    registry: Registry,
    accepted: Counter,
    limited: Counter,
    publish_seconds: Histogram,
}

impl GatewayMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ddit_gateway");
        let accepted = Counter::default();
        registry.register(
            "jobs_accepted",
            "Jobs published (replays excluded)",
            accepted.clone(),
        );
        let limited = Counter::default();
        registry.register("limited", "Requests refused with 429", limited.clone());
        let publish_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "publish_seconds",
            "Publish to broker confirm",
            publish_seconds.clone(),
        );
        Self {
            registry,
            accepted,
            limited,
            publish_seconds,
        }
    }
}

impl Gateway {
    /// Connects Redis and S3 (the broker on first use, and again whenever its link is down).
    pub async fn connect(cfg: GatewayConfig) -> Result<Self> {
        let redis = with_backoff("connect to redis", 10, || {
            ResultStore::connect(cfg.redis.clone())
        })
        .await?;
        let s3 = S3Store::connect(cfg.s3.clone()).await?;
        let schema_doc: Value = serde_json::from_str(ddit_schemas::JOB_SCHEMA)
            .map_err(|e| WorkerError::Internal(format!("job schema: {e}")))?;
        let schema = jsonschema::validator_for(&schema_doc)
            .map_err(|e| WorkerError::Internal(format!("job schema: {e}")))?;
        let gw = Self {
            hub: Arc::new(hub::Hub::new(cfg.max_streams_per_client)),
            cfg,
            redis,
            s3,
            schema,
            link: tokio::sync::Mutex::new(None),
            link_up: Default::default(),
            limiter: limits::Limiter::new(new_replica_name()),
            metrics: GatewayMetrics::new(),
            stopping: tokio::sync::watch::Sender::new(false),
        };
        if let Err(e) = gw.channel().await {
            tracing::error!("broker not reachable yet: {e}");
        }
        Ok(gw)
    }

    /// A publishing channel, (re)connecting and declaring the queue when there is none.
    async fn channel(&self) -> Result<lapin::Channel> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        self.link_up.store(false, Relaxed);
        let conn = amqp::connect(&self.cfg.amqp, &self.cfg.name).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| WorkerError::unavailable("amqp channel", e))?;
        amqp::declare(&ch, &self.cfg.amqp).await?;
        *link = Some((conn, ch.clone()));
        self.link_up.store(true, Relaxed);
        Ok(ch)
    }
}

/// The OpenAPI document: the `/v1` routes' annotations, with the job and result contracts
/// (`schemas/*.schema.json`, JSON Schema 2020-12 as OpenAPI 3.1 takes it) as components.
fn openapi_json(doc: &utoipa::openapi::OpenApi) -> Value {
    let mut v = serde_json::to_value(doc).unwrap_or_default();
    let contracts = [
        ("Job", ddit_schemas::JOB_SCHEMA),
        ("JobResult", ddit_schemas::RESULT_SCHEMA),
        ("Progress", ddit_schemas::PROGRESS_SCHEMA),
    ];
    if let Some(schemas) = v
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, text) in contracts {
            if let Ok(s) = serde_json::from_str::<Value>(text) {
                schemas.insert(name.into(), s);
            }
        }
    }
    let job_ref = serde_json::json!({"$ref": "#/components/schemas/Job"});
    if let Some(s) =
        v.pointer_mut("/paths/~1v1~1jobs/post/requestBody/content/application~1json/schema")
    {
        *s = job_ref;
    }
    let result_ref = serde_json::json!({"oneOf": [{"$ref": "#/components/schemas/JobResult"}, {"type": "null"}]});
    if let Some(s) = v.pointer_mut("/components/schemas/JobState/properties/result") {
        *s = result_ref;
    }
    v
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the broker link is up and Redis and the bucket answer. Never waits on a broker
/// connect: a link that is down is reported, and reconnected in the background.
async fn readyz(State(gw): State<Arc<Gateway>>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    let up = match gw.link.try_lock() {
        Ok(link) => link
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected()),
        // A publish holds it for an instant, a reconnect for longer: the last state tells.
        Err(_) => gw.link_up.load(std::sync::atomic::Ordering::Relaxed),
    };
    if !up {
        problems.push("amqp: not connected".to_string());
        let again = gw.clone();
        tokio::spawn(async move {
            if let Err(e) = again.channel().await {
                tracing::warn!("broker: {e}");
            }
        });
    }
    if let Err(e) = gw.redis.ping().await {
        problems.push(e.to_string());
    }
    if let Err(e) = gw.s3.ping().await {
        problems.push(e.to_string());
    }
    crate::service::http::readiness(&problems)
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &gw.metrics.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// A name for this replica among those counting limits in Redis: the host and 32 random bits.
fn new_replica_name() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{host}-{}", ddit_schemas::hex(&b))
}

/// The public application: `/v1`, the playground at `/` and `/openapi.json`.
pub fn router(gw: Arc<Gateway>) -> Router {
    let (v1, doc) = api::v1();
    let doc = Arc::new(openapi_json(&doc));
    let limit = gw.cfg.max_body_bytes;
    v1.route("/", get(|| async { Html(include_str!("playground.html")) }))
        .route(
            "/openapi.json",
            get(move || async move { axum::Json(doc.as_ref().clone()) }),
        )
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gw)
}

/// The operator's application: health, readiness and metrics.
fn ops_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gw)
}

async fn bind(addr: SocketAddr, name: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| WorkerError::Config {
            name: name.into(),
            message: format!("{addr}: {e}"),
        })
}

/// Serves until `shutdown` resolves, then ends the open event streams (a client's `EventSource`
/// reconnects, to another replica) and finishes the other requests in progress.
pub async fn run(
    cfg: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if cfg.tokens.is_empty() {
        return Err(WorkerError::Config {
            name: "tokens-file".into(),
            message: "no client in it".into(),
        });
    }
    let (listen, ops_listen, http) = (cfg.listen, cfg.ops_listen, cfg.http);
    let gw = Arc::new(Gateway::connect(cfg).await?);
    let listener = bind(listen, "listen").await?;
    let ops = bind(ops_listen, "ops-listen").await?;
    tracing::info!(%listen, %ops_listen, clients = gw.cfg.tokens.len(), "gateway listening");
    tokio::spawn(hub::listen_forever(
        Arc::downgrade(&gw.hub),
        gw.redis.clone(),
    ));
    let stop = gw.stopping.subscribe();
    let ops_server = tokio::spawn(server::serve(
        ops,
        ops_router(gw.clone()),
        http,
        stop.clone(),
    ));
    let stopping = gw.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.stopping.send_replace(true);
    });
    server::serve(listener, router(gw), http, stop).await;
    let _ = ops_server.await;
    Ok(())
}
