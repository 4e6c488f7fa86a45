//! Jobs admitted but not stepping yet: waiting for their input image, or for their preparation.
//!
//! An input image is read off the inference thread ([`InputFetcher`]: the service reads `s3://`
//! objects on its runtime), so a slow object store holds up only the job that waits for it; the
//! runner steps its other jobs meanwhile and looks for finished reads between steps. Preparation
//! runs once per admission round, after the round's arrivals are in: the prompts of the generate
//! jobs admitted together go through the text encoder in one pass per prompt length (T5 is
//! row-wise, so a job's text stream is the one it gets alone: `worker/tests/batched_stages.rs`).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ddit_schemas::Status;

use super::work::{Active, Work};
use super::{Hooks, Model, Runner};
use crate::error::{Result, WorkerError};
use crate::tasks::input::InputFetcher;
use crate::tasks::{GeneratePlan, Plan};
use crate::tensor::Tensor;

/// How long a runner whose only jobs wait for their input waits for a read before it looks at
/// its job source again.
pub(super) const FETCH_POLL: Duration = Duration::from_millis(5);

/// Where a pending job's input image stands.
pub(super) enum Input {
    /// No image to read (generation).
    None,
    /// Being read; the read reports under this id.
    Reading(u64),
    /// Read (or failed to be).
    Read(Result<Vec<u8>>),
}

/// An admitted job: who it is, its times, and the span its work is recorded under.
pub(super) struct Admitted {
    pub job_id: String,
    pub task: &'static str,
    pub started: Instant,
    /// When it was delivered (the job timeout counts from then; without a delivery: `started`).
    pub received: Instant,
    /// The deadline or the job timeout, whichever comes first (checked between steps).
    pub ends: Option<Instant>,
    pub queue_ms: u64,
    /// The job's span: its steps are recorded under it, on whichever thread runs them.
    pub span: tracing::Span,
}

impl Admitted {
    fn activate(self, work: Work) -> Active {
        Active {
            job: self,
            batch_max: 0,
            work,
            reported: None,
        }
    }
}

/// An admitted job before its first step.
pub(super) struct Pending {
    pub job: Admitted,
    pub plan: Plan,
    pub input: Input,
}

impl Pending {
    /// Rows it will add to a forward pass.
    pub(super) fn rows(&self) -> usize {
        match &self.plan {
            Plan::Generate(p) => p.num_images as usize,
            Plan::Caption(_) | Plan::Vqa(_) => 1,
        }
    }

    fn reading(&self) -> bool {
        matches!(self.input, Input::Reading(_))
    }
}

/// The runner's reads in flight: each reports its id and bytes on one channel.
pub(super) struct Reads {
    tx: mpsc::Sender<(u64, Result<Vec<u8>>)>,
    rx: mpsc::Receiver<(u64, Result<Vec<u8>>)>,
    next: u64,
}

impl Reads {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self { tx, rx, next: 0 }
    }

    /// Starts reading `uri` through `fetcher`; the id its bytes will come under.
    pub(super) fn start(&mut self, fetcher: &dyn InputFetcher, uri: &str) -> u64 {
        let id = self.next;
        self.next += 1;
        let reply = Reply {
            id,
            tx: Some(self.tx.clone()),
        };
        fetcher.fetch(uri, Box::new(move |bytes| reply.send(bytes)));
        id
    }
}

/// Where one read answers. A read dropped unanswered (its task panicked, its runtime shut down)
/// answers with a transient error, so that its job never waits for ever. A read whose job has
/// gone (canceled, given back) answers no one: ignored.
struct Reply {
    id: u64,
    tx: Option<mpsc::Sender<(u64, Result<Vec<u8>>)>>,
}

impl Reply {
    fn send(mut self, bytes: Result<Vec<u8>>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.id, bytes));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let e = WorkerError::unavailable("input image", "the read ended without an answer");
            let _ = tx.send((self.id, Err(e)));
        }
    }
}

/// A plan's input image, if it has one.
pub(super) fn image_of(plan: &Plan) -> Option<&str> {
    match plan {
        Plan::Generate(_) => None,
        Plan::Caption(p) => Some(&p.image),
        Plan::Vqa(p) => Some(&p.image),
    }
}

impl<M: Model> Runner<'_, M> {
    /// Whether this runner holds no job at all.
    pub(super) fn idle(&self) -> bool {
        self.active.is_empty() && self.pending.is_empty()
    }

    /// Whether every job this runner holds (one at least) waits for its input image.
    pub(super) fn only_reading(&self) -> bool {
        self.active.is_empty()
            && !self.pending.is_empty()
            && self.pending.iter().all(Pending::reading)
    }

    /// Takes the reads that have finished; with `wait`, waits up to [`FETCH_POLL`] for one when
    /// nothing else could run.
    pub(super) fn collect_reads(&mut self, wait: bool) {
        let first = (wait && self.only_reading())
            .then(|| self.reads.rx.recv_timeout(FETCH_POLL).ok())
            .flatten();
        for (id, bytes) in first.into_iter().chain(self.reads.rx.try_iter()) {
            let reading = |p: &&mut Pending| matches!(p.input, Input::Reading(i) if i == id);
            if let Some(p) = self.pending.iter_mut().find(reading) {
                p.input = Input::Read(bytes);
            }
        }
    }

    /// Cancellation, deadlines and the job timeout for the jobs still waiting for their input.
    pub(super) fn drop_ended_reads(&mut self, hooks: &mut dyn Hooks) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let (p, reading) = (&self.pending[i].job, self.pending[i].reading());
            let r = if !reading {
                None
            } else if hooks.canceled(&p.job_id) {
                p.span.in_scope(|| tracing::info!("canceled"));
                Some(self.failed(&p.job_id, Some(p.task), Status::Canceled, None))
            } else if p.ends.is_some_and(|t| now >= t) {
                let message = format!(
                    "the deadline or the job timeout passed {:.1} s after the delivery, while \
                     its input image was being read",
                    p.received.elapsed().as_secs_f64()
                );
                p.span.in_scope(|| tracing::warn!("{message}"));
                Some(self.expired(&p.job_id, p.task, message))
            } else {
                None
            };
            match r {
                Some(r) => {
                    self.pending.remove(i);
                    hooks.result(r);
                }
                None => i += 1,
            }
        }
    }

    /// Gives back every pending job (the runner is halted).
    pub(super) fn give_back_pending(&mut self, hooks: &mut dyn Hooks) {
        for Pending { job, .. } in self.pending.drain(..) {
            job.span
                .in_scope(|| tracing::warn!("given back unfinished"));
            hooks.given_back(&job.job_id);
        }
    }

    /// Prepares the pending jobs whose input is at hand and makes them active, in the order they
    /// were admitted; a job that cannot be prepared gets its failed result.
    pub(super) fn prepare_ready(&mut self, hooks: &mut dyn Hooks) {
        let all = std::mem::take(&mut self.pending);
        let (waiting, ready): (Vec<_>, Vec<_>) = all.into_iter().partition(Pending::reading);
        self.pending = waiting;
        let mut works: Vec<Option<Result<Work>>> = Vec::with_capacity(ready.len());
        let mut prompts = Vec::new();
        let mut jobs = Vec::with_capacity(ready.len());
        for (i, Pending { job, plan, input }) in ready.into_iter().enumerate() {
            let work = job.span.in_scope(|| match plan {
                Plan::Generate(g) => match self.prompt_ids(&g) {
                    Ok(ids) => {
                        prompts.push((i, g, ids));
                        None
                    }
                    Err(e) => Some(Err(e)),
                },
                masked => Some(self.guard("preparing the job", |r| r.prepare(masked, input))),
            });
            works.push(work);
            jobs.push(job);
        }
        self.encode_prompts(prompts, &mut works);
        for (p, work) in jobs.into_iter().zip(works) {
            let work =
                work.unwrap_or_else(|| Err(WorkerError::Internal("a job left unprepared".into())));
            match work {
                Ok(w) => {
                    p.span
                        .in_scope(|| tracing::debug!(rows = w.rows(), "admitted"));
                    self.active.push(p.activate(w));
                }
                Err(e) => {
                    p.span.in_scope(|| tracing::warn!("failed: {e}"));
                    hooks.failure(&e);
                    hooks.result(self.failed(&p.job_id, Some(p.task), Status::Failed, Some(&e)));
                }
            }
        }
    }

    /// The generate jobs' prompts through the text encoder, one pass per prompt length and
    /// `max_batch` jobs; each job's work into `works` at its index.
    fn encode_prompts(
        &mut self,
        prompts: Vec<(usize, GeneratePlan, [Vec<i64>; 2])>,
        works: &mut [Option<Result<Work>>],
    ) {
        let mut by_len: BTreeMap<usize, Vec<_>> = BTreeMap::new();
        for p in prompts {
            by_len.entry(p.2[0].len()).or_default().push(p);
        }
        for (_, group) in by_len {
            let mut group = group.into_iter().peekable();
            while group.peek().is_some() {
                let chunk: Vec<_> = group.by_ref().take(self.cfg.max_batch.max(1)).collect();
                let ids: Vec<&[Vec<i64>; 2]> = chunk.iter().map(|(_, _, ids)| ids).collect();
                let streams = self.encode_texts(&ids);
                for ((i, plan, _), stream) in chunk.into_iter().zip(streams) {
                    if let Some(w) = works.get_mut(i) {
                        *w = Some(stream.map(|context| self.generate_work(plan, context)));
                    }
                }
            }
        }
    }

    /// Each job's [negative, positive] text streams, from one pass over all of them; when that
    /// pass fails, each job again alone, so that one bad job does not fail the others.
    fn encode_texts(&mut self, ids: &[&[Vec<i64>; 2]]) -> Vec<Result<[Tensor; 2]>> {
        let rows: Vec<Vec<i64>> = ids.iter().flat_map(|p| p.iter().cloned()).collect();
        let out = self.guard("encoding prompts", |r| r.model.encode_text(&rows));
        let out = out.and_then(|t| match t.batch() == rows.len() {
            true => Ok(t),
            false => Err(WorkerError::Internal(format!(
                "text streams {:?} for {} prompts",
                t.shape,
                rows.len()
            ))),
        });
        match out {
            Ok(t) => (0..ids.len())
                .map(|k| Ok([t.row(2 * k), t.row(2 * k + 1)]))
                .collect(),
            Err(e) if ids.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::warn!(
                    jobs = ids.len(),
                    "batched text encoding failed, retrying jobs alone: {e}"
                );
                ids.iter()
                    .flat_map(|p| self.encode_texts(std::slice::from_ref(p)))
                    .collect()
            }
        }
    }

    /// `f`, with a panic turned into an error naming `what`: the thread and the other jobs live on.
    pub(super) fn guard<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let run = std::panic::AssertUnwindSafe(|| f(self));
        std::panic::catch_unwind(run)
            .unwrap_or_else(|x| Err(super::step::panicked(what, x.as_ref())))
    }
}
