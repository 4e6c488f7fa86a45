//! Cross-job batching: many jobs step together, one forward pass per group per step.
//!
//! Jobs of the same task and shapes form a group (generation: latent size and prompt length;
//! captioning and VQA: canvas length and image tokens). Each tick, every active job advances by
//! exactly one sampler step; the jobs of a group that need the model share one forward pass (up
//! to `max_batch` rows). Masked-diffusion jobs whose canvas did not change reuse their cached
//! probabilities and skip the pass. New jobs join between ticks, once their input image is read
//! (off this thread) and the prompts of the jobs admitted together are encoded in one pass;
//! finished, failed or canceled jobs leave, the images of the jobs that finish together decoded
//! in one pass. Every job keeps its own RNG, so batching never changes which numbers it draws.
//!
//! The runner sees the model only through [`Model`]; the ONNX Runtime engine is one
//! implementation, and the unit tests (`tests.rs`) use a fake one.

mod finish;
mod handoff;
mod model;
mod pending;
mod step;
#[cfg(test)]
mod tests;
mod threads;
mod work;

use std::sync::Arc;
use std::time::Instant;

use ddit_schemas::{ErrorInfo, Job, JobResult, ModelRef, Status};
use time::OffsetDateTime;

use crate::clock::parse_time;
use crate::error::{Result, WorkerError};
use crate::image_io::ImageLimits;
use crate::tasks::input::InputFetcher;
use crate::tasks::JobLimits;
use crate::text::TextCodec;
pub use finish::{encode_images, ended_result, Decoded, Png};
pub use handoff::Handoff;
use handoff::Member;
pub use model::{BlockCache, CacheUpdate, Model};
use pending::{Admitted, Input, Pending, Reads};
pub use threads::run_threads;
use work::Active;

/// How captioning turns an image into a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    /// `mean + exp(logvar/2)·ε`, as D-DiT does (ε from the job's RNG).
    Sample,
    /// The posterior mean (deterministic in the image).
    Mean,
}

/// The default [`RunnerConfig::decode_pixels`]: four 1024 × 1024 images.
pub const DECODE_PIXELS: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub max_batch: usize,
    /// Most images one VAE decode pass takes (at most `max_batch`): TensorRT's VAE profile
    /// holds one image, so a TensorRT worker decodes one at a time.
    pub decode_batch: usize,
    /// Most pixels one VAE decode pass outputs (one image at least): the decoder's activations
    /// grow with them (full-resolution feature maps), so large images go fewer at a time.
    pub decode_pixels: u64,
    pub caption_latent: LatentMode,
    pub image_limits: ImageLimits,
    /// Caps on what one job may ask for (pixels, images, steps, text).
    pub limits: JobLimits,
    /// Longest a job may take from its delivery (from admission when the source gives no
    /// delivery time); it then ends `expired` (at admission or between steps).
    pub job_timeout: Option<std::time::Duration>,
    /// Least time between two progress reports of one job (its first and last steps are always
    /// reported): each report wakes the service's event loop, which then competes with the steps.
    pub progress_every: std::time::Duration,
    /// How long a runner that was idle keeps admitting arriving jobs before its first pass, so that
    /// a burst starts as full batches instead of a pass of one job and a staggered tail (a source
    /// that never blocks is not affected).
    pub batch_window: std::time::Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            decode_batch: 8,
            decode_pixels: DECODE_PIXELS,
            caption_latent: LatentMode::Sample,
            image_limits: ImageLimits::default(),
            limits: JobLimits::DEFAULT,
            job_timeout: None,
            progress_every: std::time::Duration::ZERO,
            batch_window: std::time::Duration::ZERO,
        }
    }
}

/// A job as received: parsed (with the tracing span its steps are recorded under, and when it was
/// delivered if the source knows: the job timeout counts from then), or the reason it could not
/// be (with whatever id it carried).
pub enum Incoming {
    Job {
        job: Box<Job>,
        span: tracing::Span,
        received: Option<Instant>,
    },
    Unparseable {
        job_id: String,
        error: WorkerError,
    },
}

impl Incoming {
    /// A job with a fresh `job` span (local modes; the service passes the delivery's span).
    pub fn job(job: Job) -> Self {
        let span = tracing::info_span!("job", job_id = %job.job_id, task = job.task.name());
        Incoming::Job {
            job: Box::new(job),
            span,
            received: None,
        }
    }
}

/// How long [`JobSource::next_job`] may wait for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Not at all: `None` means "none right now".
    No,
    /// Until this instant: `None` means none came by then (a past instant is [`Wait::No`]).
    Until(Instant),
    /// Until one is available: `None` means the source is exhausted (or shutting down).
    Forever,
}

/// Where jobs come from. A source that has every job at hand may ignore `wait`.
pub trait JobSource {
    fn next_job(&mut self, wait: Wait) -> Option<Incoming>;
}

/// Where generated images go.
pub trait ImageSink {
    /// Stores one PNG; returns the output's URI.
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], seed: u64) -> Result<String>;

    /// Stores a finished job's images and completes its result: here, in order, by default. A sink
    /// that stores them beside the step loop returns `None` and reports the result itself once
    /// every image is stored (the service's uploads).
    fn finish(&mut self, job: Decoded) -> Option<JobResult> {
        Some(job.store_in(self))
    }
}

/// What the service plugs in: progress, cancellation and the results themselves.
pub trait Hooks {
    fn progress(&mut self, _job_id: &str, _step: usize, _total: usize) {}
    fn canceled(&mut self, _job_id: &str) -> bool {
        false
    }
    fn result(&mut self, result: JobResult);
    /// One batched forward pass took `seconds` for `rows` rows (`kind`: generate or masked).
    fn step(&mut self, _kind: &'static str, _rows: usize, _seconds: f64) {}
    /// A forward pass, or a job's preparation, failed with `e`.
    fn failure(&mut self, _e: &WorkerError) {}
    /// Whether the runner must stop stepping and give back every job it holds (the service's
    /// circuit breaker is open). Asked before each forward pass and each admission.
    fn halted(&mut self) -> bool {
        false
    }
    /// A job given back unfinished once [`Hooks::halted`]: it gets no result from this runner.
    fn given_back(&mut self, _job_id: &str) {}
}

pub struct Runner<'a, M: Model> {
    pub model: &'a mut M,
    pub codec: &'a TextCodec,
    pub fetcher: &'a dyn InputFetcher,
    pub cfg: RunnerConfig,
    active: Vec<Active>,
    /// Admitted jobs before their first step: reading their input, or to be prepared.
    pending: Vec<Pending>,
    reads: Reads,
    /// Shared with the process's other runners, when it has several.
    handoff: Option<Member>,
}

impl<'a, M: Model> Runner<'a, M> {
    pub fn new(
        model: &'a mut M,
        codec: &'a TextCodec,
        fetcher: &'a dyn InputFetcher,
        cfg: RunnerConfig,
    ) -> Self {
        Self {
            model,
            codec,
            fetcher,
            cfg,
            active: Vec::new(),
            pending: Vec::new(),
            reads: Reads::new(),
            handoff: None,
        }
    }

    /// Joins the runners that share `handoff`: idle, it takes jobs they hand it; busy, it hands
    /// half of its jobs to one of them that is idle.
    pub fn with_handoff(mut self, handoff: Arc<Handoff>) -> Self {
        self.handoff = Some(Member::new(handoff));
        self
    }

    fn model_ref(&self) -> ModelRef {
        let m = &self.model.manifest().model;
        ModelRef {
            name: m.name.clone(),
            hash: m.hash.clone(),
        }
    }

    fn failed(
        &self,
        job_id: &str,
        task: Option<&str>,
        status: Status,
        err: Option<&WorkerError>,
    ) -> JobResult {
        ended_result(&self.model_ref(), job_id, task, status, err)
    }

    /// Runs until the source is exhausted and every admitted job has its result (with a
    /// handoff: and no other runner holds jobs it could hand over).
    pub fn run(
        &mut self,
        source: &mut dyn JobSource,
        sink: &mut dyn ImageSink,
        hooks: &mut dyn Hooks,
    ) {
        let mut exhausted = false;
        loop {
            self.set_busy(!self.idle());
            if !exhausted {
                exhausted = self.admit_round(source, hooks);
            }
            self.collect_reads(true);
            self.drop_ended_reads(hooks);
            if hooks.halted() {
                for a in self.active.drain(..) {
                    a.job
                        .span
                        .in_scope(|| tracing::warn!("given back unfinished"));
                    hooks.given_back(&a.job.job_id);
                }
                self.give_back_pending(hooks);
            }
            self.prepare_ready(hooks);
            if self.active.is_empty() {
                if exhausted && self.idle() {
                    return;
                }
                continue;
            }
            if let Some(m) = &self.handoff {
                m.handoff.offer(&mut self.active);
            }
            self.tick(sink, hooks);
        }
    }

    /// Admits arrivals while there is room; returns whether the source is exhausted.
    fn admit_round(&mut self, source: &mut dyn JobSource, hooks: &mut dyn Hooks) -> bool {
        // Set when this runner wakes from idle: it admits arrivals until then before its pass.
        let mut fill_until = None;
        while self.rows() < self.cfg.max_batch.max(1) {
            if self.idle() && self.take_handed_off() {
                break;
            }
            // Reads done in place (files, data URIs) answered already: no wait for them.
            self.collect_reads(false);
            let wait = match (self.idle(), fill_until) {
                // Another runner may hand this one jobs: look at the source, then at it.
                (true, _) if self.others_busy() => Wait::No,
                (true, _) => Wait::Forever,
                (false, Some(t)) => Wait::Until(t),
                // Only jobs whose input is being read: a short wait, then a look at the reads.
                (false, None) if self.only_reading() => {
                    Wait::Until(Instant::now() + pending::FETCH_POLL)
                }
                (false, None) => Wait::No,
            };
            match source.next_job(wait) {
                Some(Incoming::Job { job, .. }) if hooks.halted() => hooks.given_back(&job.job_id),
                Some(inc) => {
                    // Busy from now, so that an idle runner waits for it instead of leaving.
                    self.set_busy(true);
                    if wait == Wait::Forever && !self.cfg.batch_window.is_zero() {
                        fill_until = Some(Instant::now() + self.cfg.batch_window);
                    }
                    self.admit(inc, hooks)
                }
                None => return wait == Wait::Forever,
            }
        }
        false
    }

    fn set_busy(&mut self, busy: bool) {
        if let Some(m) = &mut self.handoff {
            m.set_busy(busy);
        }
    }

    fn others_busy(&self) -> bool {
        self.handoff
            .as_ref()
            .is_some_and(|m| m.handoff.others_busy())
    }

    /// Idle: takes jobs handed over, waiting briefly for them while another runner holds jobs.
    fn take_handed_off(&mut self) -> bool {
        let Some(m) = &self.handoff else {
            return false;
        };
        let h = &m.handoff;
        let wait = if h.others_busy() {
            handoff::POLL
        } else {
            std::time::Duration::ZERO
        };
        self.active = h.take(self.cfg.max_batch.max(1), wait);
        self.set_busy(!self.active.is_empty());
        !self.active.is_empty()
    }

    /// Rows of the jobs this runner holds, the pending ones included.
    fn rows(&self) -> usize {
        let pending: usize = self.pending.iter().map(Pending::rows).sum();
        self.active.iter().map(Active::rows).sum::<usize>() + pending
    }

    /// Checks the job's times and plans it, starts reading its input image, and makes it
    /// pending (prepared with the round's other arrivals); or answers it at once with a failed or
    /// expired result.
    fn admit(&mut self, inc: Incoming, hooks: &mut dyn Hooks) {
        let (job, span, received) = match inc {
            Incoming::Job {
                job,
                span,
                received,
            } => (job, span, received),
            Incoming::Unparseable { job_id, error } => {
                hooks.result(self.failed(&job_id, None, Status::Failed, Some(&error)));
                return;
            }
        };
        let task = job.task.name();
        if hooks.canceled(&job.job_id) {
            // Canceled while queued: no text or image encoding, no step.
            span.in_scope(|| tracing::info!("canceled before it started"));
            hooks.result(self.failed(&job.job_id, Some(task), Status::Canceled, None));
            return;
        }
        let started = Instant::now();
        let received = received.unwrap_or(started).min(started);
        let planned = span.in_scope(|| {
            let queue_ms = self.check_times(&job, received)?;
            let plan =
                crate::tasks::plan(&job, self.model.manifest(), &self.cfg.limits).map_err(|e| {
                    hooks.failure(&e);
                    Box::new(self.failed(&job.job_id, Some(task), Status::Failed, Some(&e)))
                })?;
            let input = match pending::image_of(&plan) {
                Some(uri) => Input::Reading(self.reads.start(self.fetcher, uri)),
                None => Input::None,
            };
            Ok::<_, Box<JobResult>>((queue_ms, plan, input))
        });
        match planned {
            Ok((queue_ms, plan, input)) => self.pending.push(Pending {
                job: Admitted {
                    job_id: job.job_id.clone(),
                    task,
                    started,
                    received,
                    ends: self.ends_at(&job, started, received),
                    queue_ms,
                    span,
                },
                plan,
                input,
            }),
            Err(r) => hooks.result(*r),
        }
    }

    /// When the job must have ended: its deadline or `job_timeout` after `received` (its
    /// delivery), the earlier.
    fn ends_at(&self, job: &Job, started: Instant, received: Instant) -> Option<Instant> {
        let by_deadline = job.deadline.as_deref().and_then(|d| {
            let left = parse_time("deadline", d).ok()? - OffsetDateTime::now_utc();
            Some(started + std::time::Duration::try_from(left).unwrap_or_default())
        });
        let by_timeout = self.cfg.job_timeout.map(|t| received + t);
        by_deadline.into_iter().chain(by_timeout).min()
    }

    /// The job's time in the queue (ms), or its failed or expired result (its deadline, or the
    /// job timeout counted from `received`, passed before it started).
    fn check_times(
        &self,
        job: &Job,
        received: Instant,
    ) -> std::result::Result<u64, Box<JobResult>> {
        let task = Some(job.task.name());
        let fail =
            |e: &WorkerError| Box::new(self.failed(&job.job_id, task, Status::Failed, Some(e)));
        let now = OffsetDateTime::now_utc();
        let mut queue_ms = 0;
        if let Some(s) = &job.submitted_at {
            let t = parse_time("submitted_at", s).map_err(|e| fail(&e))?;
            queue_ms = (now - t).whole_milliseconds().max(0) as u64;
        }
        if let Some(d) = &job.deadline {
            if parse_time("deadline", d).map_err(|e| fail(&e))? <= now {
                let message = format!("deadline {d} passed before the job started");
                return Err(Box::new(self.expired(
                    &job.job_id,
                    job.task.name(),
                    message,
                )));
            }
        }
        let waited = received.elapsed();
        if let Some(t) = self.cfg.job_timeout.filter(|t| waited >= *t) {
            let message = format!(
                "the job timeout ({:.1} s) passed {:.1} s after the delivery, before the job \
                 started (it waited behind other jobs in this worker's prefetch buffer)",
                t.as_secs_f64(),
                waited.as_secs_f64()
            );
            return Err(Box::new(self.expired(
                &job.job_id,
                job.task.name(),
                message,
            )));
        }
        Ok(queue_ms)
    }

    /// An `expired` result saying why (a deadline or the job timeout passed).
    fn expired(&self, job_id: &str, task: &str, message: String) -> JobResult {
        let mut r = self.failed(job_id, Some(task), Status::Expired, None);
        r.error = Some(ErrorInfo {
            kind: ddit_schemas::ErrorKind::InvalidJob,
            message,
            retryable: false,
        });
        r
    }
}
