//! Several runners over one job source: each on its own thread with its own model (its own ONNX
//! Runtime sessions), taking jobs as it has room and reporting to the same hooks. On the CPU a
//! small model runs faster this way than one runner splitting each operator across cores.

use std::sync::{Mutex, PoisonError};

use ddit_schemas::JobResult;

use super::{Handoff, Hooks, ImageSink, Incoming, JobSource, Model, Runner, RunnerConfig, Wait};
use crate::tasks::input::InputFetcher;
use crate::text::TextCodec;

/// Runs every job of `source`: one runner per model, runner `i` storing images through
/// `sinks[i]`, the runners sharing a [`Handoff`]. With one model it runs on the calling thread. `source.next_job` is called under a
/// lock, so a source that blocks holds the others back: local sources never block.
pub fn run_threads<M, S>(
    models: &mut [M],
    codec: &TextCodec,
    fetcher: &(dyn InputFetcher + Sync),
    cfg: &RunnerConfig,
    source: &mut (dyn JobSource + Send),
    sinks: &mut [S],
    hooks: &mut (dyn Hooks + Send),
) where
    M: Model + Send,
    S: ImageSink + Send,
{
    if let ([model], [sink]) = (&mut *models, &mut *sinks) {
        Runner::new(model, codec, fetcher, cfg.clone()).run(source, sink, hooks);
        return;
    }
    let (source, hooks) = (Mutex::new(source), Mutex::new(hooks));
    let handoff = Handoff::new();
    std::thread::scope(|s| {
        for (model, sink) in models.iter_mut().zip(sinks.iter_mut()) {
            let (source, hooks, handoff) = (&source, &hooks, handoff.clone());
            s.spawn(move || {
                Runner::new(model, codec, fetcher, cfg.clone())
                    .with_handoff(handoff)
                    .run(&mut Shared(source), sink, &mut Shared(hooks));
            });
        }
    });
}

/// One runner's handle on what all of them share.
struct Shared<'a, T: ?Sized>(&'a Mutex<&'a mut T>);

impl<T: ?Sized> Shared<'_, T> {
    fn with<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        // A runner that panicked while holding the lock left the data whole: every call below
        // is one short operation.
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut **guard)
    }
}

impl<T: JobSource + ?Sized> JobSource for Shared<'_, T> {
    fn next_job(&mut self, wait: Wait) -> Option<Incoming> {
        self.with(|s| s.next_job(wait))
    }
}

impl<T: Hooks + ?Sized> Hooks for Shared<'_, T> {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        self.with(|h| h.progress(job_id, step, total))
    }
    fn canceled(&mut self, job_id: &str) -> bool {
        self.with(|h| h.canceled(job_id))
    }
    fn result(&mut self, result: JobResult) {
        self.with(|h| h.result(result))
    }
    fn step(&mut self, kind: &'static str, rows: usize, seconds: f64) {
        self.with(|h| h.step(kind, rows, seconds))
    }
    fn failure(&mut self, e: &crate::error::WorkerError) {
        self.with(|h| h.failure(e))
    }
    fn halted(&mut self) -> bool {
        self.with(|h| h.halted())
    }
    fn given_back(&mut self, job_id: &str) {
        self.with(|h| h.given_back(job_id))
    }
}
