//! `ddit-worker serve`: jobs from AMQP, images to S3, results and progress to Redis.
//!
//! Delivery semantics: bounded prefetch, manual acks. A delivery is acked only after its images
//! are in S3 and its result is in Redis (`SET NX`). A job whose result already exists is acked
//! without recomputing. Transient failures (S3, Redis) are retried with backoff, then the
//! delivery is requeued (the quorum queue's delivery limit dead-letters a message that keeps
//! failing). Permanent failures store a failed result and reject the delivery to the
//! dead-letter queue. Shutdown stops consuming, finishes in-flight jobs before the deadline,
//! requeues the rest, and returns.

pub mod amqp;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod redis;
pub mod s3;
pub mod telemetry;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddit_schemas::{Job, JobResult, ModelRef, Status};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::engine::{EngineConfig, Package};
use crate::error::{Result, WorkerError};
use crate::runner::{ended_result, RunnerConfig};
use amqp::AmqpConfig;
use inference::{Event, PoolConfig};
use metrics::{JobLabels, Metrics, StepLabels};
use redis::{RedisConfig, ResultStore};
use s3::{S3Config, S3Io, S3Store};

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
    /// Least time between two progress events of one job.
    pub progress_interval: Duration,
    pub name: String,
}

struct InFlight {
    acker: Acker,
    task: String,
    duplicates: Vec<Acker>,
    span: tracing::Span,
    received: Instant,
}

struct Service {
    cfg: ServeConfig,
    redis: ResultStore,
    metrics: Arc<Metrics>,
    model: ModelRef,
    in_flight: HashMap<String, InFlight>,
    last_progress: HashMap<String, Instant>,
    jobs: Option<mpsc::Sender<Job>>,
}

fn job_id_of(data: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(data)
        .ok()?
        .get("job_id")?
        .as_str()
        .filter(|s| crate::tasks::validate_job_id(s).is_ok())
        .map(str::to_string)
}

/// Retries `f` with exponential backoff (0.2 s doubling, `tries` attempts).
pub(crate) async fn with_backoff<T, F, Fut>(what: &str, tries: u32, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    let mut last = None;
    for attempt in 0..tries {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::warn!(attempt, "{what}: {e}");
                last = Some(e);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    Err(last.unwrap_or_else(|| WorkerError::Internal(format!("{what}: no attempt"))))
}

impl Service {
    fn failed(&self, job_id: &str, task: Option<&str>, e: &WorkerError) -> JobResult {
        ended_result(&self.model, job_id, task, Status::Failed, Some(e))
    }

    async fn nack_requeue(acker: &Acker) {
        if let Err(e) = acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
        {
            tracing::warn!("nack: {e}");
        }
    }

    /// Stores a permanent failure and dead-letters the delivery.
    async fn dead_letter(&self, d: &Delivery, r: &JobResult) {
        let stored = with_backoff("store failed result", 5, || self.redis.put_result(r)).await;
        match stored {
            Ok(_) => {
                self.metrics
                    .jobs
                    .get_or_create(&JobLabels {
                        task: r.task.clone().unwrap_or_else(|| "unknown".into()),
                        status: "failed".into(),
                    })
                    .inc();
                if let Err(e) = d.acker.reject(BasicRejectOptions { requeue: false }).await {
                    tracing::warn!("reject: {e}");
                }
            }
            Err(_) => Self::nack_requeue(&d.acker).await,
        }
        self.metrics.in_flight.dec();
    }

    async fn on_delivery(&mut self, d: Delivery) {
        self.metrics.in_flight.inc();
        if d.redelivered {
            self.metrics.redeliveries.inc();
        }
        let traceparent = amqp::header(&d.properties, "traceparent");
        let job: Job = match serde_json::from_slice(&d.data) {
            Ok(j) => j,
            Err(e) => {
                let id =
                    job_id_of(&d.data).unwrap_or_else(|| format!("delivery-{}", d.delivery_tag));
                let r = self.failed(&id, None, &WorkerError::invalid("job", e.to_string()));
                tracing::warn!(job_id = %id, "invalid job: {e}");
                return self.dead_letter(&d, &r).await;
            }
        };
        if let Err(e) = crate::tasks::validate_job_id(&job.job_id) {
            let r = self.failed(
                &format!("delivery-{}", d.delivery_tag),
                Some(job.task.name()),
                &e,
            );
            return self.dead_letter(&d, &r).await;
        }
        let span = tracing::info_span!("job", job_id = %job.job_id, task = job.task.name(), redelivered = d.redelivered);
        telemetry::continue_trace(&span, traceparent.as_deref());
        if let Some(f) = self.in_flight.get_mut(&job.job_id) {
            // A duplicate publish while the first copy runs: acked with it.
            f.duplicates.push(d.acker);
            return;
        }
        match self.redis.has_result(&job.job_id).await {
            Ok(true) => {
                span.in_scope(|| {
                    tracing::info!("result exists; acknowledging without recomputing")
                });
                if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!("ack: {e}");
                }
                self.metrics.in_flight.dec();
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("redis unavailable, requeueing {}: {e}", job.job_id);
                tokio::time::sleep(Duration::from_millis(500)).await;
                Self::nack_requeue(&d.acker).await;
                self.metrics.in_flight.dec();
                return;
            }
        }
        span.in_scope(|| tracing::info!("accepted"));
        self.in_flight.insert(
            job.job_id.clone(),
            InFlight {
                acker: d.acker,
                task: job.task.name().into(),
                duplicates: vec![],
                span,
                received: Instant::now(),
            },
        );
        if let Some(tx) = &self.jobs {
            if tx.send(job).await.is_err() {
                tracing::error!("inference threads are gone");
            }
        }
    }

    async fn on_result(&mut self, r: JobResult) {
        let Some(f) = self.in_flight.remove(&r.job_id) else {
            tracing::warn!(job_id = %r.job_id, "result for a job not in flight");
            return;
        };
        self.last_progress.remove(&r.job_id);
        let span = f.span.clone();
        async {
            let retryable = r.error.as_ref().is_some_and(|e| e.retryable);
            let mut all = vec![f.acker];
            all.extend(f.duplicates);
            if retryable {
                tracing::warn!("transient failure, requeueing: {:?}", r.error);
                for a in &all {
                    Self::nack_requeue(a).await;
                }
            } else {
                match with_backoff("store result", 6, || self.redis.put_result(&r)).await {
                    Ok(stored) => {
                        if !stored {
                            tracing::info!("a result already existed (duplicate delivery)");
                        }
                        let status = serde_json::to_value(r.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                        self.metrics
                            .jobs
                            .get_or_create(&JobLabels {
                                task: f.task.clone(),
                                status: status.clone(),
                            })
                            .inc();
                        if let Some(m) = &r.metrics {
                            self.metrics
                                .queue_wait_seconds
                                .observe(m.queue_ms as f64 / 1000.0);
                        }
                        let permanent_failure = r.status == Status::Failed;
                        for (i, a) in all.iter().enumerate() {
                            let res = if permanent_failure && i == 0 {
                                a.reject(BasicRejectOptions { requeue: false }).await
                            } else {
                                a.ack(BasicAckOptions::default()).await
                            };
                            if let Err(e) = res {
                                tracing::warn!("ack: {e}");
                            }
                        }
                        tracing::info!(
                            status,
                            elapsed_ms = f.received.elapsed().as_millis() as u64,
                            "done"
                        );
                    }
                    Err(e) => {
                        tracing::error!("cannot store the result, requeueing: {e}");
                        for a in &all {
                            Self::nack_requeue(a).await;
                        }
                    }
                }
            }
            for _ in &all {
                self.metrics.in_flight.dec();
            }
        }
        .instrument(span)
        .await;
    }

    async fn on_progress(&mut self, job_id: String, step: usize, total: usize) {
        let now = Instant::now();
        let due = self
            .last_progress
            .get(&job_id)
            .is_none_or(|t| now.duration_since(*t) >= self.cfg.progress_interval);
        if due || (total > 0 && step >= total) {
            self.last_progress.insert(job_id.clone(), now);
            if let Err(e) = self.redis.publish_progress(&job_id, step, total).await {
                tracing::debug!("progress: {e}");
            }
        }
    }
}

/// Runs the service until `shutdown` resolves, then drains and returns.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
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

    let state = Arc::new(http::AppState {
        model_ready: false.into(),
        broker: Mutex::new(None),
        redis: redis.clone(),
        s3: s3.clone(),
        metrics: metrics.clone(),
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
    let pool = inference::start(
        PoolConfig {
            threads: cfg.inference_threads,
            model: cfg.model.clone(),
            engine: cfg.engine.clone(),
            runner: cfg.runner.clone(),
            capacity: usize::from(cfg.amqp.prefetch).max(1),
        },
        io,
        canceled.clone(),
        ev_tx,
    );
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
    state.model_ready.store(true, Ordering::SeqCst);

    // Connect, declare and consume as one retried unit: a hard broker error during set-up (for
    // example two workers declaring the same quorum queue at once) closes the connection, so each
    // attempt starts from a fresh connection.
    let tag = format!("{}-{}", cfg.name, std::process::id());
    let (conn, ch, mut consumer) = with_backoff("connect to the broker", 10, || async {
        let conn = amqp::connect(&cfg.amqp, &cfg.name).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| WorkerError::Unavailable {
                what: "amqp channel".into(),
                message: e.to_string(),
            })?;
        amqp::declare(&ch, &cfg.amqp).await?;
        let consumer = amqp::consume(&ch, &cfg.amqp, &tag).await?;
        Ok((Arc::new(conn), ch, consumer))
    })
    .await?;
    if let Ok(mut b) = state.broker.lock() {
        *b = Some(conn.clone());
    }
    tracing::info!(queue = %cfg.amqp.queue, prefetch = cfg.amqp.prefetch, "consuming");

    let mut svc = Service {
        cfg: cfg.clone(),
        redis,
        metrics,
        model,
        in_flight: HashMap::new(),
        last_progress: HashMap::new(),
        jobs: Some(pool.jobs),
    };
    let mut cancel_poll = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => svc.on_delivery(d).await,
                Some(Err(e)) => tracing::warn!("consumer: {e}"),
                None => { tracing::warn!("consumer closed"); break; }
            },
            ev = events.recv() => match ev {
                Some(ev) => handle_event(&mut svc, ev).await,
                None => break,
            },
            _ = cancel_poll.tick() => {
                let ids: Vec<String> = svc.in_flight.keys().cloned().collect();
                if let Ok(c) = svc.redis.canceled(&ids).await {
                    if let Ok(mut set) = canceled.lock() {
                        set.extend(c);
                    }
                }
            }
        }
    }

    // Graceful shutdown: stop consuming, finish what is in flight before the deadline, requeue
    // the rest.
    tracing::info!(in_flight = svc.in_flight.len(), "shutting down");
    let _ = ch
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    svc.jobs = None;
    let deadline = tokio::time::Instant::now() + cfg.shutdown_deadline;
    while !svc.in_flight.is_empty() {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            ev = events.recv() => match ev {
                Some(ev) => handle_event(&mut svc, ev).await,
                None => break,
            },
        }
    }
    for (id, f) in svc.in_flight.drain() {
        tracing::info!(job_id = %id, "requeueing unfinished job");
        Service::nack_requeue(&f.acker).await;
        for a in &f.duplicates {
            Service::nack_requeue(a).await;
        }
    }
    let _ = ch.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn handle_event(svc: &mut Service, ev: Event) {
    match ev {
        Event::Result(r) => svc.on_result(*r).await,
        Event::Progress {
            job_id,
            step,
            total,
        } => svc.on_progress(job_id, step, total).await,
        Event::Step {
            kind,
            rows,
            seconds,
        } => {
            svc.metrics
                .step_seconds
                .get_or_create(&StepLabels {
                    kind: kind.to_string(),
                })
                .observe(seconds);
            svc.metrics.batch_size.observe(rows as f64);
        }
        Event::Ready | Event::LoadFailed(_) => {}
    }
}
