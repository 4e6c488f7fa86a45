//! `ddit-worker submit`: the bulk client. A folder of images (or a JSONL manifest of images or
//! prompts) in; one JSONL of results out, through the same queue, bucket and Redis as the fleet.
//!
//! - **Submit.** Each local input image is uploaded to `s3://{bucket}/{prefix}/inputs/{batch}/…`;
//!   the job is then published (persistent, publisher confirms) and its id appended to the
//!   journal `{out}.submitted` once the broker has confirmed it.
//! - **Collect.** Results are read from Redis (`{redis_prefix}:result:{job_id}`, the workers' source
//!   of truth) for every job in flight, each poll one `MGET`; each result is appended to `out` as one
//!   line (`item` plus the result fields) and flushed.
//! - **Flow control.** At most `ahead` jobs are published and not yet answered.
//! - **Resume.** Job ids are derived from the batch name and the item, so a rerun names the same jobs.
//!   Items whose line is in `out` are skipped; items with a result already in Redis are written
//!   without publishing; items in the journal are waited for, not published again. Only the rest
//!   is published. A crash can at worst publish one job twice (between the broker's confirm and the
//!   journal write); the workers answer a job id once (`SET NX`) and acknowledge copies whose
//!   result exists without recomputing.

//!
//! [`items`] reads the input, [`journal`] the files kept between runs, and [`Submitter`] fills
//! the window and collects results.

mod items;
mod journal;
mod submitter;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapters::amqp::AmqpConfig;
use crate::adapters::s3::S3Config;
use crate::error::Result;
use items::bad_input;
pub use items::{default_batch, job_id_for, load_items, Item, ManifestLine};
use submitter::Submitter;

/// The task of items that do not name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultTask {
    Caption,
    Vqa,
    Generate,
}

impl DefaultTask {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            DefaultTask::Caption => "caption",
            DefaultTask::Vqa => "vqa",
            DefaultTask::Generate => "generate",
        }
    }
}

#[derive(Clone)]
pub struct SubmitConfig {
    /// A folder of images or a `.jsonl` manifest.
    pub input: PathBuf,
    pub task: DefaultTask,
    /// The question of VQA items that carry none.
    pub question: Option<String>,
    pub out: PathBuf,
    /// Most jobs published and not yet answered.
    pub ahead: usize,
    /// Names the jobs (`{batch}-{hash of item}`); default derived from the input path and task.
    pub batch: Option<String>,
    pub amqp: AmqpConfig,
    pub s3: S3Config,
    pub redis_url: String,
    pub redis_prefix: String,
    pub poll: Duration,
    /// Give up (exit with an error, journal kept) when no result arrived for this long.
    pub result_timeout: Option<Duration>,
    pub show_progress: bool,
}

/// What one run did (also printed as the last line on stderr).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub items: usize,
    /// Already in the output file when the run started.
    pub done_before: usize,
    /// Found in Redis without publishing (finished while no client was watching).
    pub recovered: usize,
    /// In the journal from an earlier run: waited for, not published again.
    pub resumed: usize,
    /// Published by this run.
    pub published: usize,
    pub succeeded: usize,
    pub failed: usize,
}

/// Runs the client (see the module doc).
pub async fn run(cfg: SubmitConfig) -> Result<Summary> {
    let batch = match &cfg.batch {
        Some(b) => b.clone(),
        None => default_batch(&cfg.input, cfg.task),
    };
    crate::tasks::validate_job_id(&format!("{batch}-0")).map_err(|_| {
        bad_input(
            "batch",
            "1-100 characters from [A-Za-z0-9_.:-], starting with a letter or digit",
        )
    })?;
    if batch.len() > 100 {
        return Err(bad_input("batch", "at most 100 characters"));
    }
    let items = load_items(&cfg, &batch)?;
    let done = journal::finished(&cfg.out)?;
    let mut summary = Summary {
        items: items.len(),
        ..Summary::default()
    };
    let mut queue = VecDeque::new();
    for it in items {
        if done.contains(&it.job.job_id) {
            summary.done_before += 1;
        } else {
            queue.push_back(it);
        }
    }
    let mut s = Submitter::connect(&cfg, batch, queue, summary).await?;
    loop {
        s.fill().await?;
        if s.idle() {
            break;
        }
        s.collect().await?;
    }
    Ok(s.finish().await)
}
