//! `ddit-worker submit`: the bulk client.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ddit_worker::adapters::s3::S3Config;
use ddit_worker::client::submit::{self, DefaultTask, SubmitConfig};

use super::serve::{AmqpArgs, RedisArgs, S3Args};

#[derive(Clone, Copy, ValueEnum)]
enum SubmitTask {
    Caption,
    Vqa,
    Generate,
}

/// Settings of `submit`.
#[derive(Args, Clone)]
pub struct SubmitArgs {
    /// A folder of images (.png, .jpg, .webp), a JSONL manifest (one item per line: `image`,
    /// `question`, `prompt`, `task`, `id`, and optional `steps`, `seed`, ...), or WebDataset `.tar`
    /// shards or `.parquet` files: a path, a glob (`shards/*.tar`) or brace ranges
    /// (`shard-{000..009}.tar`). Read as a stream.
    #[arg(long, env = "DDIT_INPUT")]
    input: PathBuf,
    /// Parquet input: the column of images (bytes, `{bytes, path}` structs, or s3://, data: or
    /// local paths).
    #[arg(long, default_value = "image", env = "DDIT_IMAGE_COLUMN")]
    image_column: String,
    /// Parquet input: the column that keys each sample (default: `key` if present, else
    /// `{file}:{row}`).
    #[arg(long, env = "DDIT_KEY_COLUMN")]
    key_column: Option<String>,
    /// Parquet input: let local image paths lead out of the shard's folder (`..`, absolute
    /// paths, symlinks); without it such a row is an error.
    #[arg(long, env = "DDIT_ALLOW_PATHS_OUTSIDE_SHARD")]
    allow_paths_outside_shard: bool,
    /// Task of items that name none.
    #[arg(long, value_enum, default_value = "caption", env = "DDIT_TASK")]
    task: SubmitTask,
    /// Question of VQA items that carry none.
    #[arg(long, env = "DDIT_QUESTION")]
    question: Option<String>,
    /// Output JSONL (one line per item: `item` plus the result), or `.parquet` with the same
    /// columns (collected in `{out}.jsonl`, written when all are done). Journal: `{out}.submitted`.
    #[arg(long, env = "DDIT_OUT")]
    out: PathBuf,
    /// Most jobs published and not yet answered (flow control).
    #[arg(long, default_value_t = 64, env = "DDIT_AHEAD")]
    ahead: usize,
    /// Names the jobs (`{batch}-{hash of item}`); default: derived from the input path and task.
    #[arg(long, env = "DDIT_BATCH")]
    batch: Option<String>,
    /// Milliseconds between two reads of the results in flight.
    #[arg(long, default_value_t = 200, env = "DDIT_POLL_MS")]
    poll_ms: u64,
    /// Stop with an error when a job has had no result for this many seconds (0: wait forever).
    /// The journal is kept: a rerun keeps waiting for the same jobs.
    #[arg(long, default_value_t = 0, env = "DDIT_RESULT_TIMEOUT")]
    result_timeout: u64,
    /// Hide the progress bar even on a terminal.
    #[arg(long, env = "DDIT_NO_PROGRESS")]
    no_progress: bool,
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    tls: super::serve::TlsArgs,
    #[command(flatten)]
    s3: S3Args,
    #[command(flatten)]
    redis: RedisArgs,
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    log: String,
}

impl TryFrom<SubmitArgs> for SubmitConfig {
    type Error = anyhow::Error;

    fn try_from(a: SubmitArgs) -> anyhow::Result<Self> {
        let uses = [
            a.amqp.tls_use(),
            ("--redis-url", Some(&a.redis.redis_url)),
            a.s3.tls_use(),
        ];
        let ca_pem = a.tls.ca_pem_for(&uses)?;
        Ok(SubmitConfig {
            input: a.input,
            image_column: Some(a.image_column),
            key_column: a.key_column,
            allow_paths_outside_shard: a.allow_paths_outside_shard,
            task: match a.task {
                SubmitTask::Caption => DefaultTask::Caption,
                SubmitTask::Vqa => DefaultTask::Vqa,
                SubmitTask::Generate => DefaultTask::Generate,
            },
            question: a.question,
            out: a.out,
            ahead: a.ahead.max(1),
            batch: a.batch,
            amqp: a.amqp.config(1, ca_pem.clone()),
            s3: S3Config {
                ca_pem,
                ..a.s3.config(0)
            },
            redis_url: a.redis.redis_url,
            redis_prefix: a.redis.redis_prefix,
            poll: std::time::Duration::from_millis(a.poll_ms.max(10)),
            result_timeout: (a.result_timeout > 0)
                .then(|| std::time::Duration::from_secs(a.result_timeout)),
            show_progress: !a.no_progress,
        })
    }
}

pub fn run(a: SubmitArgs) -> anyhow::Result<()> {
    super::init_logging(&a.log);
    let cfg = SubmitConfig::try_from(a)?;
    let out = cfg.out.clone();
    let s = super::runtime()?.block_on(submit::run(cfg))?;
    eprintln!(
        "submit: {} items, {} done before, {} recovered from redis, {} resumed, {} published; {} succeeded, {} failed -> {}",
        s.items,
        s.done_before,
        s.recovered,
        s.resumed,
        s.published,
        s.succeeded,
        s.failed,
        out.display()
    );
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
