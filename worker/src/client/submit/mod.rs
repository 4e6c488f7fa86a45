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
//! [`items`] reads the input as a stream ([`shards`]: WebDataset and Parquet), [`journal`] the
//! files kept between runs, [`Submitter`] fills the window and collects results, and
//! [`parquet_out`] writes `--out x.parquet` at the end.

mod items;
mod journal;
#[cfg(feature = "datasets")]
mod parquet_out;
#[cfg(feature = "datasets")]
mod shards;
mod submitter;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::adapters::amqp::AmqpConfig;
use crate::adapters::s3::S3Config;
use crate::error::Result;
use items::bad_input;
pub use items::{default_batch, job_id_for, read_items, spawn_items, Item, Local, ManifestLine};
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
    /// A folder of images, a `.jsonl` manifest, or `.tar` / `.parquet` shards (globs and brace
    /// ranges allowed).
    pub input: PathBuf,
    /// Parquet input: the column holding images (bytes, `{bytes, path}`, or URIs); default `image`.
    pub image_column: Option<String>,
    /// Parquet input: the column naming samples; default `key` when present, else `{file}:{row}`.
    pub key_column: Option<String>,
    /// Parquet input: local paths may lead out of the shard's folder (by `..`, an absolute path
    /// or a symlink); by default such a cell is an error.
    pub allow_paths_outside_shard: bool,
    pub task: DefaultTask,
    /// The question of VQA items that carry none.
    pub question: Option<String>,
    /// The results: JSONL, or Parquet when it ends in `.parquet` (see [`results_path`]).
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
    let results = results_path(&cfg.out);
    let done = journal::finished(&results)?;
    let items = spawn_items(cfg.clone(), batch.clone());
    let mut s = Submitter::connect(&cfg, batch, items, done).await?;
    loop {
        s.fill().await?;
        if s.idle() {
            break;
        }
        s.collect().await?;
    }
    let summary = s.finish().await;
    if results != cfg.out {
        #[cfg(feature = "datasets")]
        parquet_out::jsonl_to_parquet(&results, &cfg.out)?;
    }
    Ok(summary)
}

/// Where results are appended as JSONL (the resumable record): `out` itself, or `{out}.jsonl`
/// when `out` is a `.parquet` file, which is written from it once every item has its result.
pub fn results_path(out: &Path) -> PathBuf {
    if cfg!(feature = "datasets") && out.extension().is_some_and(|e| e == "parquet") {
        PathBuf::from(format!("{}.jsonl", out.display()))
    } else {
        out.to_path_buf()
    }
}
