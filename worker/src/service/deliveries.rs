//! The service's side of each delivery: admission (parse, duplicate and existing-result checks),
//! results (store, then ack or dead-letter), progress and step metrics from inference threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ddit_schemas::{Job, JobResult, ModelRef, Status};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::attempts::{self, Retained};
use super::inference::Event;
use super::metrics::{JobLabels, Metrics, StepLabels};
use super::{telemetry, ServeConfig};
use crate::adapters::redis::ResultStore;
use crate::adapters::s3::S3Store;
use crate::adapters::{amqp, with_backoff};
use crate::error::WorkerError;
use crate::runner::ended_result;

pub(super) struct InFlight {
    pub acker: Acker,
    task: String,
    pub duplicates: Vec<Acker>,
    span: tracing::Span,
    received: Instant,
    /// Which attempt this delivery is (1 = the first).
    pub attempt: u32,
    /// What a retry republishes.
    pub message: Retained,
}

impl InFlight {
    /// The delivery and its duplicates, which share its fate.
    pub fn ackers(&self) -> impl Iterator<Item = &Acker> {
        std::iter::once(&self.acker).chain(&self.duplicates)
    }
}

pub(super) struct Service {
    pub cfg: ServeConfig,
    pub redis: ResultStore,
    pub s3: S3Store,
    pub metrics: Arc<Metrics>,
    pub model: ModelRef,
    pub in_flight: HashMap<String, InFlight>,
    /// Jobs to the inference threads, each with its span; `None` once draining.
    pub jobs: Option<mpsc::Sender<super::inference::Sent>>,
    /// A confirm-mode channel for retry copies and dead letters (set once the broker is reached).
    pub publisher: Option<lapin::Channel>,
    /// What was handed over and not started, and the flag that stops starting it.
    pub queued: super::inference::Queued,
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The canceled jobs among those in hand (read by the inference threads).
    pub canceled: super::inference::CancelSet,
}

fn job_id_of(data: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(data)
        .ok()?
        .get("job_id")?
        .as_str()
        .filter(|s| crate::tasks::validate_job_id(s).is_ok())
        .map(str::to_string)
}

impl Service {
    fn failed(&self, job_id: &str, task: Option<&str>, e: &WorkerError) -> JobResult {
        ended_result(&self.model, job_id, task, Status::Failed, Some(e))
    }

    pub(super) async fn nack_requeue(acker: &Acker) {
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
    async fn dead_letter(&self, d: &Delivery, mut r: JobResult) {
        r.attempts
            .get_or_insert(attempts::attempt_of(&d.properties, 1));
        let r = &r;
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
            Err(_) => {
                // Nothing stored: back through the retry queue, not counted as an attempt.
                let made = attempts::attempt_of(&d.properties, 0).saturating_sub(1);
                self.retry_later(std::slice::from_ref(&d.acker), &Retained::of(d), made, 1)
                    .await;
            }
        }
    }

    pub(super) async fn on_delivery(&mut self, d: Delivery) {
        self.metrics.in_flight.inc();
        if d.redelivered {
            self.metrics.redeliveries.inc();
        }
        if !self.take(d).await {
            self.metrics.in_flight.dec();
        }
    }

    /// Admits a delivery, or settles it at once (dead letter, duplicate result, retry later).
    /// Returns whether it is now in flight (a duplicate joins its first copy: true).
    async fn take(&mut self, d: Delivery) -> bool {
        let received = Instant::now();
        let traceparent = amqp::header(&d.properties, "traceparent");
        let Some(id) = job_id_of(&d.data) else {
            let why = "no usable job_id (not JSON, or a missing or invalid id)";
            self.dead_letter_unusable(&d, why).await;
            return false;
        };
        let job: Job = match serde_json::from_slice(&d.data) {
            Ok(j) => j,
            Err(e) if self.in_flight.contains_key(&id) => {
                // The slot belongs to the valid job running under this id.
                let why = format!("invalid job carrying the id of a job in flight: {e}");
                self.dead_letter_unusable(&d, &why).await;
                return false;
            }
            Err(e) => {
                let r = self.failed(&id, None, &WorkerError::invalid("job", e.to_string()));
                tracing::warn!(job_id = %id, "invalid job: {e}");
                self.dead_letter(&d, r).await;
                return false;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.job_id, task = job.task.name(), redelivered = d.redelivered);
        telemetry::continue_trace(&span, traceparent.as_deref());
        if let Some(f) = self.in_flight.get_mut(&job.job_id) {
            // A duplicate publish while the first copy runs: acked with it.
            f.duplicates.push(d.acker);
            return true;
        }
        let Some(attempt) = self.admit(&d, &job, &span).await else {
            return false;
        };
        span.in_scope(|| tracing::info!(attempt, "accepted"));
        let job_span = span.clone();
        let message = Retained::of(&d);
        self.in_flight.insert(
            job.job_id.clone(),
            InFlight {
                acker: d.acker,
                task: job.task.name().into(),
                duplicates: vec![],
                span,
                received,
                attempt,
                message,
            },
        );
        if let Some(tx) = &self.jobs {
            if tx.send((job, job_span, received)).await.is_err() {
                tracing::error!("inference threads are gone");
            }
        }
        true
    }

    /// Decides whether a parsed job runs: an existing result acks it, Redis trouble sends it
    /// back through the retry queue, and a job past its last attempt gets its final result.
    /// Returns the attempt number when it runs.
    async fn admit(&self, d: &Delivery, job: &Job, span: &tracing::Span) -> Option<u32> {
        let limit = self.cfg.amqp.delivery_limit;
        let counted = match self.redis.result_or_cancel(&job.job_id).await {
            Ok((true, _)) => {
                self.settle_existing(d, job, span).await;
                return None;
            }
            Ok((false, canceled)) => {
                if canceled {
                    // Canceled while queued: the runner answers it before it starts.
                    if let Ok(mut set) = self.canceled.lock() {
                        set.insert(job.job_id.clone());
                    }
                }
                self.redis.begin_attempt(&job.job_id).await
            }
            Err(e) => Err(e),
        };
        let (counted, last) = match counted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("redis unavailable, retrying {} later: {e}", job.job_id);
                let again = attempts::attempt_of(&d.properties, 0).saturating_sub(1);
                self.retry_later(std::slice::from_ref(&d.acker), &Retained::of(d), again, 1)
                    .await;
                return None;
            }
        };
        let attempt = attempts::attempt_of(&d.properties, counted);
        if attempt <= limit {
            return Some(attempt);
        }
        let r = attempts::exhausted(self, &job.job_id, Some(job.task.name()), last, attempt - 1);
        span.in_scope(|| tracing::warn!(attempts = attempt - 1, "attempts ran out"));
        self.dead_letter(d, r).await;
        None
    }

    /// A delivery whose job already has a result is acked without recomputing, except a
    /// redelivery of a failed job: the worker that stored the failure died before it rejected
    /// the message, so this delivery takes it to the dead-letter queue as that worker would have
    /// (a fresh copy of an ended job, not redelivered, is acked).
    async fn settle_existing(&self, d: &Delivery, job: &Job, span: &tracing::Span) {
        let failed = d.redelivered
            && matches!(self.redis.get_result(&job.job_id).await,
                Ok(Some(r)) if r.status == Status::Failed);
        let res = if failed {
            span.in_scope(|| tracing::info!("failed result exists; dead-lettering the redelivery"));
            d.acker.reject(BasicRejectOptions { requeue: false }).await
        } else {
            span.in_scope(|| tracing::info!("result exists; acknowledging without recomputing"));
            d.acker.ack(BasicAckOptions::default()).await
        };
        if let Err(e) = res {
            tracing::warn!("ack: {e}");
        }
    }

    async fn on_result(&mut self, mut r: JobResult) {
        let Some(f) = self.in_flight.remove(&r.job_id) else {
            tracing::warn!(job_id = %r.job_id, "result for a job not in flight");
            return;
        };
        r.attempts = Some(f.attempt);
        let span = f.span.clone();
        async {
            let transient = r.error.clone().filter(|e| e.retryable);
            match transient {
                Some(e) if f.attempt < self.cfg.amqp.delivery_limit => {
                    tracing::warn!(attempt = f.attempt, "transient failure: {}", e.message);
                    if let Err(e) = self.redis.record_failure(&r.job_id, &e).await {
                        tracing::warn!("cannot record the cause: {e}");
                    }
                    let ackers: Vec<Acker> = f.ackers().cloned().collect();
                    self.retry_later(&ackers, &f.message, f.attempt, f.attempt)
                        .await;
                }
                _ => self.settle(&r, &f).await,
            }
            for _ in f.ackers() {
                self.metrics.in_flight.dec();
            }
        }
        .instrument(span)
        .await;
    }

    /// Stores a final result (a success, a permanent failure, or the last attempt's transient
    /// one), then acks; a failed job's delivery is rejected to the dead-letter queue. If the
    /// result cannot be stored, the job goes back through the retry queue.
    async fn settle(&self, r: &JobResult, f: &InFlight) {
        let stored = match self.store(r).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!("cannot store the result, retrying the job later: {e}");
                return self.retry_unstored(f).await;
            }
        };
        if !stored {
            tracing::info!("a result already existed (duplicate delivery)");
            self.discard_losing_outputs(r).await;
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
        let failed = r.status == Status::Failed;
        for (i, a) in f.ackers().enumerate() {
            let res = if failed && i == 0 {
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
            attempts = f.attempt,
            elapsed_ms = f.received.elapsed().as_millis() as u64,
            "done"
        );
    }

    /// Stores a final result (retried with backoff). A worker built with the test-only
    /// `fault-injection` feature fails the first store of each job whose id contains
    /// `ddit-inject-unstored`, as a Redis outage would.
    async fn store(&self, r: &JobResult) -> crate::error::Result<bool> {
        #[cfg(feature = "fault-injection")]
        if r.job_id.contains("ddit-inject-unstored") {
            static FAILED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let mut failed = FAILED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !failed.contains(&r.job_id) {
                failed.push(r.job_id.clone());
                return Err(WorkerError::unavailable("redis", "injected store failure"));
            }
        }
        with_backoff("store result", 6, || self.redis.put_result(r)).await
    }

    /// A copy of a job that lost `SET NX` deletes the images the stored result does not name
    /// (with content-addressed keys, identical bytes share a key and are kept).
    async fn discard_losing_outputs(&self, r: &JobResult) {
        if r.outputs.is_empty() {
            return;
        }
        let winner = match self.redis.get_result(&r.job_id).await {
            Ok(Some(w)) => w,
            Ok(None) => return,
            Err(e) => return tracing::warn!("cannot read the stored result: {e}"),
        };
        let stale: Vec<String> = r
            .outputs
            .iter()
            .filter(|o| !winner.outputs.iter().any(|w| w.uri == o.uri))
            .map(|o| o.uri.clone())
            .collect();
        match self.s3.delete_uris(&stale).await {
            Ok(()) => tracing::info!(deleted = stale.len(), "removed the losing copy's images"),
            Err(e) => tracing::warn!("cannot remove the losing copy's images: {e}"),
        }
    }

    /// Progress as the runner reports it (at most once per `--progress-interval-ms` per job).
    async fn on_progress(&mut self, job_id: String, step: usize, total: usize) {
        if let Err(e) = self.redis.publish_progress(&job_id, step, total).await {
            tracing::debug!("progress: {e}");
        }
    }
}

pub(super) async fn handle_event(svc: &mut Service, ev: Event) {
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
        Event::BreakerOpen => {
            svc.metrics.breaker_open.set(1);
        }
        Event::GivenBack(job_id) => {
            svc.take_back(&job_id).await;
        }
        Event::Ready | Event::LoadFailed(_) => {}
    }
}
