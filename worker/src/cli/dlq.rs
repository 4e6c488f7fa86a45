//! `ddit-worker dlq`: the dead-letter queue, for the person on call.

use clap::{Args, Subcommand};
use ddit_worker::client::dlq::{self, ReplayConfig};

use super::serve::{AmqpArgs, RedisArgs, TlsArgs};

#[derive(Subcommand)]
pub enum DlqCmd {
    /// Moves dead letters back to the work queue (publisher confirms; each letter is acked only
    /// after its copy is confirmed). Reads at most the letters waiting when it starts. A job
    /// with a result in Redis is kept there unless --rerun. Prints one line per letter
    /// (`replayed|would-replay|kept JOB_ID reason=… deaths=… result=…`) and a summary.
    Replay(Box<ReplayArgs>),
}

/// Settings of `dlq replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// Most letters to read (default: all those waiting at the start).
    #[arg(long)]
    max: Option<u64>,
    /// List the letters (job id, dead-letter reason, `x-death` count, stored result); move
    /// nothing and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Delete each replayed job's final `failed` result (and its last progress) so that a worker
    /// runs it again. Without it, a letter whose job has a result stays in the dead-letter queue:
    /// a worker acks a job that has a result without running it. Results other than `failed` are
    /// never deleted.
    #[arg(long)]
    rerun: bool,
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    log: String,
}

pub fn run(cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::Replay(a) => replay(*a),
    }
}

fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    super::init_logging(&a.log);
    let uses = [a.amqp.tls_use(), ("--redis-url", Some(&a.redis.redis_url))];
    let ca_pem = a.tls.ca_pem_for(&uses)?;
    let cfg = ReplayConfig {
        amqp: a.amqp.config(1, ca_pem),
        redis_url: a.redis.redis_url,
        redis_prefix: a.redis.redis_prefix,
        max: a.max,
        dry_run: a.dry_run,
        rerun: a.rerun,
    };
    let mut out = std::io::stdout().lock();
    let s = super::runtime()?.block_on(dlq::replay(&cfg, &mut out))?;
    let what = if cfg.dry_run { "dry run" } else { "replay" };
    println!(
        "dlq {what}: {s} ({} -> {})",
        cfg.amqp.dead_letter_queue, cfg.amqp.queue
    );
    Ok(())
}
