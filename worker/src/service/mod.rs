//! `ddit-worker serve`: jobs from AMQP, images to S3, results and progress to Redis.
//!
//! Delivery semantics: bounded prefetch, manual acks. A delivery is acked only after its images
//! are in S3 and its result is in Redis (`SET NX`). A job whose result already exists is acked
//! without recomputing. Transient failures (S3, Redis) are retried with backoff, then the
//! delivery is requeued (the quorum queue's delivery limit dead-letters a message that keeps
//! failing). Permanent failures store a failed result and reject the delivery to the
//! dead-letter queue. Shutdown stops consuming, finishes in-flight jobs before the deadline,
//! requeues the rest, and returns.
//!
//! [`serve`] is three phases: [`start`] (verify the package once, connect Redis and S3, HTTP,
//! load the inference threads), [`connect`] (the broker), then the loop and [`drain`].

mod attempts;
pub mod breaker;
mod deliveries;
#[cfg(feature = "gpu")]
mod gpu;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod telemetry;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddit_schemas::ModelRef;
use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::mpsc;

use crate::adapters::amqp::{self, AmqpConfig};
use crate::adapters::redis::{RedisConfig, ResultStore};
use crate::adapters::s3::{S3Config, S3Io, S3Store};
use crate::adapters::with_backoff;
use crate::engine::{EngineConfig, Package};
use crate::error::{Result, WorkerError};
use crate::runner::RunnerConfig;
use deliveries::{handle_event, Service};
use inference::{Event, PoolConfig};
use metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub amqp: AmqpConfig,
    pub s3: S3Config,
    pub redis: RedisConfig,
    pub model: PathBuf,
    pub engine: EngineConfig,
    pub runner: RunnerConfig,
    pub inference_threads: usize,
    pub shutdown_deadline: Duration,
    pub listen: SocketAddr,
    /// First delay before a transient failure's retry (doubled per attempt, jittered, ≤ 60 s).
    pub retry_delay: Duration,
    /// Consecutive device faults that open the circuit breaker (0: never).
    pub breaker_threshold: u32,
    pub name: String,
}

/// What [`start`] brings up before the broker is reached.
struct Started {
    svc: Service,
    state: Arc<http::AppState>,
    events: mpsc::UnboundedReceiver<Event>,
    breaker: Arc<breaker::Breaker>,
}

/// Runs the service until `shutdown` resolves, then drains and returns.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let Started {
        mut svc,
        state,
        mut events,
        breaker,
    } = start(&cfg).await?;
    let canceled = svc.canceled.clone();
    let tag = format!("{}-{}", cfg.name, std::process::id());
    let (conn, ch, mut consumer) = connect(&cfg, &tag).await?;
    svc.publisher = Some(
        conn.create_channel()
            .await
            .map_err(|e| WorkerError::unavailable("amqp publishing channel", e))?,
    );
    if let Ok(mut b) = state.broker.lock() {
        *b = Some(conn.clone());
    }
    tracing::info!(
        queue = %cfg.amqp.queue,
        prefetch = cfg.amqp.prefetch,
        inference_threads = cfg.inference_threads,
        intra_threads = cfg.engine.intra_threads,
        "consuming"
    );
    let mut cancel_poll = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    let mut signaled = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => { signaled = true; break },
            d = consumer.next() => match d {
                Some(Ok(d)) => svc.on_delivery(d).await,
                Some(Err(e)) => tracing::warn!("consumer: {e}"),
                None => { tracing::warn!("consumer closed"); break; }
            },
            ev = events.recv() => match ev {
                // The breaker's own event follows its opening: the loop ends at it at the latest.
                Some(ev) => {
                    handle_event(&mut svc, ev).await;
                    if breaker.is_open() {
                        break;
                    }
                }
                None => break,
            },
            _ = cancel_poll.tick() => {
                let ids: Vec<String> = svc.in_flight.keys().cloned().collect();
                // The set holds the canceled jobs among those in hand, no more: bounded by
                // the prefetch, whatever the worker's uptime.
                if let Ok(c) = svc.redis.canceled(&ids).await {
                    if let Ok(mut set) = canceled.lock() {
                        *set = c.into_iter().collect();
                    }
                }
            }
        }
    }
    drain(&mut svc, &mut events, (&ch, &mut consumer), &tag).await;
    if breaker.is_open() && !signaled {
        // Given back what it held; unhealthy and unready until the orchestrator restarts it.
        tracing::error!("circuit breaker open: consuming nothing until restarted");
        shutdown.await;
    }
    let _ = ch.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Verifies the package (hashed once for the whole process), connects Redis and S3, serves
/// HTTP, and waits until every inference thread has loaded its sessions.
async fn start(cfg: &ServeConfig) -> Result<Started> {
    let pkg = Package::open(&cfg.model)?;
    let model = ModelRef {
        name: pkg.manifest.model.name.clone(),
        hash: pkg.manifest.model.hash.clone(),
    };
    let metrics = Arc::new(Metrics::new(cfg.engine.primary()));
    let redis = with_backoff("connect to redis", 10, || {
        ResultStore::connect(cfg.redis.clone())
    })
    .await?;
    let s3 = S3Store::connect(cfg.s3.clone()).await?;
    // S3 trouble (a wrong key, an outage) keeps the worker unready, not dead: /readyz says why,
    // and jobs that need S3 are retried and requeued.
    if let Err(e) = s3.ping().await {
        tracing::error!("s3 bucket {} not reachable: {e}", cfg.s3.bucket);
    }
    let alive = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let breaker = Arc::new(breaker::Breaker::new(cfg.breaker_threshold));
    let state = Arc::new(http::AppState {
        model_ready: false.into(),
        threads_alive: alive.clone(),
        threads: cfg.inference_threads.max(1),
        broker: Mutex::new(None),
        redis: redis.clone(),
        s3: s3.clone(),
        metrics: metrics.clone(),
        breaker: breaker.clone(),
    });
    let bound = http::spawn(cfg.listen, state.clone()).await?;
    tracing::info!(%bound, "http listening");

    let canceled: inference::CancelSet = Arc::new(Mutex::new(HashSet::new()));
    let (ev_tx, mut events) = mpsc::unbounded_channel();
    let io = S3Io {
        store: s3.clone(),
        handle: tokio::runtime::Handle::current(),
        model_hash: model.hash.clone(),
    };
    let pool_cfg = PoolConfig {
        threads: cfg.inference_threads,
        package: pkg,
        engine: cfg.engine.clone(),
        runner: cfg.runner.clone(),
        capacity: usize::from(cfg.amqp.prefetch).max(1),
        alive,
        breaker: breaker.clone(),
    };
    let pool = inference::start(pool_cfg, io, canceled.clone(), ev_tx)?;
    wait_ready(cfg, &mut events).await?;
    if let Some(placed) = crate::engine::placement::observed() {
        metrics.set_provider(&placed);
    }
    state.model_ready.store(true, Ordering::SeqCst);
    let svc = Service {
        cfg: cfg.clone(),
        redis,
        s3,
        metrics,
        model,
        in_flight: HashMap::new(),
        jobs: Some(pool.jobs),
        publisher: None,
        queued: pool.queued,
        draining: pool.draining,
        canceled,
    };
    Ok(Started {
        svc,
        state,
        events,
        breaker,
    })
}

/// Waits for every inference thread's `Ready`; the first load failure ends `serve`.
async fn wait_ready(cfg: &ServeConfig, events: &mut mpsc::UnboundedReceiver<Event>) -> Result<()> {
    let mut ready = 0;
    while ready < cfg.inference_threads.max(1) {
        match events.recv().await {
            Some(Event::Ready) => ready += 1,
            Some(Event::LoadFailed(m)) => {
                return Err(WorkerError::Package {
                    path: cfg.model.display().to_string(),
                    message: m,
                })
            }
            Some(_) => {}
            None => return Err(WorkerError::Internal("inference threads exited".into())),
        }
    }
    Ok(())
}

/// Connects, declares and consumes as one retried unit: a hard broker error during set-up (for
/// example two workers declaring the same quorum queue at once) closes the connection, so each
/// attempt starts from a fresh connection.
async fn connect(cfg: &ServeConfig, tag: &str) -> Result<(Arc<Connection>, Channel, Consumer)> {
    with_backoff("connect to the broker", 10, || async {
        let conn = amqp::connect(&cfg.amqp, &cfg.name).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| WorkerError::unavailable("amqp channel", e))?;
        amqp::declare(&ch, &cfg.amqp).await?;
        let consumer = amqp::consume(&ch, &cfg.amqp, tag).await?;
        Ok((Arc::new(conn), ch, consumer))
    })
    .await
}

/// Graceful shutdown: stop consuming, requeue at once what no inference thread has started,
/// finish what runs before the deadline, requeue the rest.
async fn drain(
    svc: &mut Service,
    events: &mut mpsc::UnboundedReceiver<Event>,
    (ch, consumer): (&Channel, &mut Consumer),
    tag: &str,
) {
    tracing::info!(in_flight = svc.in_flight.len(), "shutting down");
    let _ = ch
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
    let unadmitted = svc.return_unadmitted(consumer).await;
    svc.draining.store(true, Ordering::SeqCst);
    svc.jobs = None;
    let mut not_started = 0;
    {
        let queued = svc.queued.clone();
        let mut rx = queued.lock().await;
        while let Ok((job, ..)) = rx.try_recv() {
            // Never started: a fresh copy goes back, and it costs no attempt.
            if svc.take_back(&job.job_id).await {
                not_started += 1;
            }
        }
    }
    tracing::info!(
        not_started,
        unadmitted,
        "requeued the jobs no inference thread had started"
    );
    let deadline = tokio::time::Instant::now() + svc.cfg.shutdown_deadline;
    while !svc.in_flight.is_empty() {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            ev = events.recv() => match ev {
                Some(ev) => handle_event(svc, ev).await,
                None => break,
            },
        }
    }
    for (id, f) in svc.in_flight.drain() {
        tracing::info!(job_id = %id, "requeueing unfinished job");
        for a in f.ackers() {
            Service::nack_requeue(a).await;
        }
    }
}
