//! The service's side of each delivery: admission (parse, duplicate and existing-result checks),
//! results (store, then ack or dead-letter), progress and step metrics from inference threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddit_schemas::{Job, JobResult, ModelRef, Status};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::inference::Event;
use super::metrics::{JobLabels, Metrics, StepLabels};
use super::{telemetry, ServeConfig};
use crate::adapters::redis::ResultStore;
use crate::adapters::{amqp, with_backoff};
use crate::error::WorkerError;
use crate::runner::ended_result;

pub(super) struct InFlight {
    pub acker: Acker,
    task: String,
    pub duplicates: Vec<Acker>,
    span: tracing::Span,
    received: Instant,
}

pub(super) struct Service {
    pub cfg: ServeConfig,
    pub redis: ResultStore,
    pub metrics: Arc<Metrics>,
    pub model: ModelRef,
    pub in_flight: HashMap<String, InFlight>,
    pub last_progress: HashMap<String, Instant>,
    /// Jobs to the inference threads, each with its span; `None` once draining.
    pub jobs: Option<mpsc::Sender<(Job, tracing::Span)>>,
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

    pub(super) async fn on_delivery(&mut self, d: Delivery) {
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
        let job_span = span.clone();
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
            if tx.send((job, job_span)).await.is_err() {
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
        Event::Ready | Event::LoadFailed(_) => {}
    }
}
