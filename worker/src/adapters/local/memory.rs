//! Jobs, results and images kept in memory: `ddit-worker generate|caption|vqa`, ShapesEval and
//! tests run the runner through these.

use ddit_schemas::{Job, JobResult};

use crate::error::Result;
use crate::runner::{Hooks, ImageSink, Incoming, JobSource, Wait};

/// Jobs from a list, in order.
pub struct VecSource(std::vec::IntoIter<Incoming>);

impl VecSource {
    pub fn new(jobs: impl IntoIterator<Item = Job>) -> Self {
        Self::of(jobs.into_iter().map(Incoming::job))
    }

    pub fn of(incoming: impl IntoIterator<Item = Incoming>) -> Self {
        Self(incoming.into_iter().collect::<Vec<_>>().into_iter())
    }
}

impl JobSource for VecSource {
    fn next_job(&mut self, _wait: Wait) -> Option<Incoming> {
        self.0.next()
    }
}

/// Every result and progress event; cancels the jobs listed in `cancel`.
#[derive(Default)]
pub struct Collect {
    pub results: Vec<JobResult>,
    pub progress: Vec<(String, usize, usize)>,
    pub cancel: Vec<String>,
}

impl Collect {
    /// The result of `job_id`, if it has one.
    pub fn get(&self, job_id: &str) -> Option<&JobResult> {
        self.results.iter().find(|r| r.job_id == job_id)
    }
}

impl Hooks for Collect {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        self.progress.push((job_id.to_string(), step, total));
    }
    fn canceled(&mut self, job_id: &str) -> bool {
        self.cancel.iter().any(|c| c == job_id)
    }
    fn result(&mut self, r: JobResult) {
        self.results.push(r);
    }
}

/// PNGs by (job id, index); URIs are `mem://{job_id}/{index}.png`.
#[derive(Default)]
pub struct MemSink(pub Vec<(String, u32, Vec<u8>)>);

impl MemSink {
    /// The first image of `job_id`.
    pub fn first(&self, job_id: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(id, i, _)| id == job_id && *i == 0)
            .map(|(_, _, png)| png.as_slice())
    }
}

impl ImageSink for MemSink {
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], _seed: u64) -> Result<String> {
        self.0.push((job_id.to_string(), index, png.to_vec()));
        Ok(format!("mem://{job_id}/{index}.png"))
    }
}
