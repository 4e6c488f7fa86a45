//! `ddit-worker eval shapes`: ShapesEval's jobs (crate `ddit-shapes-eval`) run through the same
//! runner as any job, then scored.

use std::path::Path;

use ddit_schemas::Status;
use ddit_shapes_eval::{jobs, load_set, score, EvalError, Report};

use crate::adapters::local::memory::{Collect, MemSink, VecSource};
use crate::error::{Result, WorkerError};
use crate::runner::{run_threads, Model, RunnerConfig};
use crate::tasks::input::LocalFetcher;
use crate::text::TextCodec;

pub struct EvalOptions {
    pub limit: Option<usize>,
    pub runner: RunnerConfig,
    pub seed: u64,
}

impl From<EvalError> for WorkerError {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Io { path, source } => WorkerError::io(path.display().to_string(), source),
            EvalError::Invalid { path, message } => WorkerError::Config {
                name: path.display().to_string(),
                message,
            },
        }
    }
}

/// Runs every scene: a caption job, one VQA job per question, one generation job from the
/// caption, on one runner per model. Returns the scores, the generated images with their prompts
/// and every prediction.
pub fn run<M: Model + Send>(
    models: &mut [M],
    codec: &TextCodec,
    set: &Path,
    opts: EvalOptions,
) -> Result<Report> {
    let mut scenes = load_set(set)?;
    if let Some(n) = opts.limit {
        scenes.truncate(n);
    }
    let mut src = VecSource::new(jobs(&scenes, set, opts.seed));
    let mut hooks = Collect::default();
    let mut sinks: Vec<MemSink> = models.iter().map(|_| MemSink::default()).collect();
    run_threads(
        models,
        codec,
        &LocalFetcher,
        &opts.runner,
        &mut src,
        &mut sinks,
        &mut hooks,
    );
    let text_of = |id: &str| {
        hooks
            .get(id)
            .filter(|r| r.status == Status::Succeeded)
            .and_then(|r| r.text.clone())
    };
    Ok(score(&scenes, text_of, |id| {
        sinks.iter().find_map(|s| s.first(id))
    }))
}
