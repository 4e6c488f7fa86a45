//! Local mode: the same engine and tasks with a JSONL job file in, a folder and a JSONL result
//! file out. No broker, no S3, no Redis. [`memory`] keeps jobs, results and images in memory
//! (single commands, ShapesEval, tests).

pub mod memory;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

use ddit_schemas::{Job, JobResult, Status};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Result, WorkerError};
use crate::runner::{Hooks, ImageSink, Incoming, JobSource, Wait};

/// Jobs from a JSONL file, skipping those already answered and duplicate ids.
pub struct FileSource {
    jobs: std::vec::IntoIter<Incoming>,
    pub total: usize,
    pub skipped: usize,
}

impl FileSource {
    pub fn open(path: &Path, done: &HashSet<String>) -> Result<Self> {
        let f = File::open(path).map_err(|e| WorkerError::Config {
            name: "jobs".into(),
            message: format!("{}: {e}", path.display()),
        })?;
        let mut seen = HashSet::new();
        let mut jobs = Vec::new();
        let mut skipped = 0;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line =
                line.map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
            if line.trim().is_empty() {
                continue;
            }
            let inc = parse_job_line(&line, n + 1);
            let id = match &inc {
                Incoming::Job { job, .. } => job.job_id.clone(),
                Incoming::Unparseable { job_id, .. } => job_id.clone(),
            };
            if done.contains(&id) || !seen.insert(id) {
                skipped += 1;
                continue;
            }
            jobs.push(inc);
        }
        Ok(Self {
            total: jobs.len(),
            skipped,
            jobs: jobs.into_iter(),
        })
    }
}

/// Parses one job; a bad one keeps whatever `job_id` it carried (or `line-N`).
pub fn parse_job_line(line: &str, n: usize) -> Incoming {
    match serde_json::from_str::<Job>(line) {
        Ok(j) => Incoming::job(j),
        Err(e) => {
            let job_id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("job_id").and_then(|s| s.as_str()).map(str::to_string))
                .filter(|s| crate::tasks::validate_job_id(s).is_ok())
                .unwrap_or_else(|| format!("line-{n}"));
            Incoming::Unparseable {
                job_id,
                error: WorkerError::invalid("job", e.to_string()),
            }
        }
    }
}

impl JobSource for FileSource {
    fn next_job(&mut self, _wait: Wait) -> Option<Incoming> {
        self.jobs.next()
    }
}

/// Images under `DIR/{job_id}/{n}.png`; URIs are relative to `DIR`.
#[derive(Clone)]
pub struct FolderSink {
    pub dir: PathBuf,
}

impl ImageSink for FolderSink {
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], _seed: u64) -> Result<String> {
        let rel = format!("{job_id}/{index}.png");
        let path = self.dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| WorkerError::io(format!("creating {}", parent.display()), e))?;
        }
        // Write then rename: a crash never leaves a half-written image under the final name.
        let tmp = path.with_extension("png.part");
        std::fs::write(&tmp, png)
            .map_err(|e| WorkerError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| WorkerError::io(format!("renaming {}", tmp.display()), e))?;
        Ok(rel)
    }
}

/// Job ids that already have a result in `results.jsonl`.
pub fn finished_ids(results: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    if !results.exists() {
        return Ok(ids);
    }
    let f = File::open(results)
        .map_err(|e| WorkerError::io(format!("reading {}", results.display()), e))?;
    for line in BufReader::new(f).lines() {
        let line =
            line.map_err(|e| WorkerError::io(format!("reading {}", results.display()), e))?;
        // A torn last line (crash mid-write) is ignored: that job runs again.
        if let Ok(r) = serde_json::from_str::<JobResult>(&line) {
            ids.insert(r.job_id);
        }
    }
    Ok(ids)
}

/// Opens a JSONL file for appending; a torn last line (a crash mid-write) is terminated first,
/// so the next line starts on its own.
pub fn open_append(path: &Path) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| WorkerError::io(format!("opening {}", path.display()), e))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) > 0 {
        let bytes = std::fs::read(path)
            .map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
        if bytes.last() != Some(&b'\n') {
            file.write_all(b"\n")
                .map_err(|e| WorkerError::io(format!("writing {}", path.display()), e))?;
        }
    }
    Ok(file)
}

/// Appends results, one JSON line each, flushed as they come; drives the progress bar.
pub struct ResultFile {
    file: File,
    bar: ProgressBar,
    pub counts: Counts,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub succeeded: usize,
    pub failed: usize,
    pub expired: usize,
    pub canceled: usize,
}

impl ResultFile {
    pub fn open(path: &Path, total: usize, show_progress: bool) -> Result<Self> {
        let file = open_append(path)?;
        let bar = if show_progress && std::io::stderr().is_terminal() {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} jobs {elapsed_precise} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Ok(Self {
            file,
            bar,
            counts: Counts::default(),
        })
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Hooks for ResultFile {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        if total > 0 {
            self.bar.set_message(format!("{job_id} {step}/{total}"));
        }
    }

    fn result(&mut self, r: JobResult) {
        match r.status {
            Status::Succeeded => self.counts.succeeded += 1,
            Status::Failed => self.counts.failed += 1,
            Status::Expired => self.counts.expired += 1,
            Status::Canceled => self.counts.canceled += 1,
        }
        if let Some(e) = &r.error {
            tracing::warn!(job_id = %r.job_id, kind = e.kind.as_str(), "{}", e.message);
        }
        match serde_json::to_string(&r) {
            Ok(line) => {
                if let Err(e) = writeln!(self.file, "{line}").and_then(|_| self.file.flush()) {
                    tracing::error!(job_id = %r.job_id, "cannot write result: {e}");
                }
            }
            Err(e) => tracing::error!(job_id = %r.job_id, "cannot serialise result: {e}"),
        }
        self.bar.inc(1);
    }
}
