//! `ddit-worker dlq replay`: dead letters back to the work queue.
//!
//! Each dead letter is read (`basic.get`, unacknowledged), and a replayed one is published again
//! to the work queue with publisher confirms; the dead letter is acked only once its copy is
//! confirmed, so a replay that dies midway loses nothing (at worst a job is in both queues, and
//! the worker's `SET NX` result keeps one outcome). One run reads at most the messages that were
//! waiting when it started (or `max`), so letters that fail again while it runs are not replayed
//! in a loop.
//!
//! A job the worker dead-lettered has a final result in Redis, and a worker acks a job that has
//! a result without running it. So a replayed job would vanish unrun: without `rerun`, such a
//! letter is kept in the dead-letter queue and said so; with `rerun`, its `failed` result (only
//! `failed`) is deleted first and the job runs again. Every replay also drops the job's attempt
//! count and last cause, and the copy leaves out the attempt and death headers, so the job gets
//! a fresh `--delivery-limit`. A letter without a usable job id (not JSON, an invalid id) is
//! kept: a worker would dead-letter it again.

use std::io::Write;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use redis::aio::ConnectionManager;
use serde::Serialize;

use crate::adapters::amqp::{self, AmqpConfig, Message};
use crate::error::{Result, WorkerError};

/// What `dlq replay` does.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub amqp: AmqpConfig,
    pub redis_url: String,
    pub redis_prefix: String,
    /// Most letters to read (default: those waiting at the start).
    pub max: Option<u64>,
    /// List the letters; move nothing, delete nothing.
    pub dry_run: bool,
    /// Delete a replayed job's `failed` result so that the worker runs it again.
    pub rerun: bool,
}

/// The run's counts (the summary line).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Letters in the dead-letter queue at the start.
    pub waiting: u64,
    /// Letters read.
    pub read: u64,
    /// Letters moved to the work queue (with `dry_run`: that would be).
    pub replayed: u64,
    /// Of those, jobs whose `failed` result was deleted (`rerun`).
    pub results_dropped: u64,
    /// Letters left in the dead-letter queue because their job has a result.
    pub kept_with_result: u64,
    /// Letters left there because they carry no usable job id.
    pub kept_without_id: u64,
}

/// One dead letter as read.
struct Letter {
    job_id: Option<String>,
    reason: String,
    deaths: u32,
}

/// What happens to a letter.
enum Verdict {
    Replay { drop_result: bool },
    KeepResult,
    KeepNoId,
}

/// Headers a replayed copy leaves out: the broker's death and delivery records and the
/// worker's attempt counts (the service's `x-ddit-attempts` and `x-ddit-uncharged`), so that
/// the job starts over.
const DROPPED_HEADERS: [&str; 4] = [
    "x-death",
    "x-delivery-count",
    "x-ddit-attempts",
    "x-ddit-uncharged",
];

/// Why the worker dead-lettered a message that has no usable job id.
const REASON_HEADER: &str = "x-ddit-reason";

/// Replays the dead-letter queue of `cfg.amqp` as `cfg` says, one line per letter to `out`.
pub async fn replay(cfg: &ReplayConfig, out: &mut impl Write) -> Result<ReplaySummary> {
    let client = crate::adapters::redis::client(&cfg.redis_url, cfg.amqp.ca_pem.as_deref())?;
    let mut redis = ConnectionManager::new(client)
        .await
        .map_err(|e| WorkerError::unavailable("redis", e))?;
    let conn = amqp::connect(&cfg.amqp, "ddit-dlq-replay").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| WorkerError::unavailable("amqp channel", e))?;
    amqp::declare(&ch, &cfg.amqp).await?;
    let waiting = u64::from(depth(&ch, &cfg.amqp.dead_letter_queue).await?);
    let mut s = ReplaySummary {
        waiting,
        ..ReplaySummary::default()
    };
    let mut held = Vec::new();
    let res = replay_letters(cfg, &ch, &mut redis, out, &mut s, &mut held).await;
    // What is kept goes back where it was (also when the run failed midway).
    for acker in held {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(e) = acker.nack(requeue).await {
            tracing::warn!("returning a kept dead letter: {e}");
        }
    }
    let _ = conn.close(200, "done".into()).await;
    res.map(|()| s)
}

async fn replay_letters(
    cfg: &ReplayConfig,
    ch: &Channel,
    redis: &mut ConnectionManager,
    out: &mut impl Write,
    s: &mut ReplaySummary,
    held: &mut Vec<lapin::Acker>,
) -> Result<()> {
    let limit = cfg.max.map_or(s.waiting, |m| m.min(s.waiting));
    let dlq = ShortString::from(cfg.amqp.dead_letter_queue.as_str());
    while s.read < limit {
        let get = ch
            .basic_get(dlq.clone(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| WorkerError::unavailable("amqp basic.get", e))?;
        let Some(m) = get else { break };
        s.read += 1;
        let d = m.delivery;
        let letter = read_letter(&d.data, &d.properties);
        let result = match &letter.job_id {
            Some(id) => result_of(redis, &cfg.redis_prefix, id).await?,
            None => None,
        };
        let verdict = match (&letter.job_id, &result) {
            (None, _) => Verdict::KeepNoId,
            (Some(_), None) => Verdict::Replay { drop_result: false },
            (Some(_), Some(r)) if cfg.rerun && r.status == "failed" => {
                Verdict::Replay { drop_result: true }
            }
            (Some(_), Some(_)) => Verdict::KeepResult,
        };
        let line = describe(cfg, &letter, result.as_ref(), &verdict);
        match verdict {
            Verdict::KeepNoId => s.kept_without_id += 1,
            Verdict::KeepResult => s.kept_with_result += 1,
            Verdict::Replay { drop_result } => {
                s.replayed += 1;
                s.results_dropped += u64::from(drop_result);
            }
        }
        let id = letter.job_id.as_deref().unwrap_or_default();
        match verdict {
            Verdict::Replay { drop_result } if !cfg.dry_run => {
                forget(redis, &cfg.redis_prefix, id, drop_result).await?;
                let copy = Message {
                    exchange: "",
                    routing_key: &cfg.amqp.queue,
                    body: &d.data,
                    headers: replay_headers(&d.properties),
                    expiration_ms: None,
                };
                amqp::publish(ch, copy).await?;
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| WorkerError::unavailable("amqp ack", e))?;
            }
            _ => held.push(d.acker),
        }
        writeln!(out, "{line}").map_err(|e| WorkerError::Internal(format!("output: {e}")))?;
    }
    Ok(())
}

/// Messages ready in `queue`.
async fn depth(ch: &Channel, queue: &str) -> Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map_err(|e| WorkerError::unavailable("amqp declare (passive)", e))?;
    Ok(q.message_count())
}

/// The job id (if usable), why the letter died and how many times it did.
fn read_letter(body: &[u8], props: &BasicProperties) -> Letter {
    let job_id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("job_id")?.as_str().map(str::to_string))
        .filter(|id| crate::tasks::validate_job_id(id).is_ok());
    let headers = props.headers().clone().unwrap_or_default();
    let deaths = death_records(&headers);
    let first_reason = deaths.first().and_then(|t| field_str(t, "reason"));
    let reason = amqp::header(props, REASON_HEADER)
        .or(first_reason)
        .unwrap_or_else(|| "-".into());
    let deaths = deaths
        .iter()
        .map(|t| amqp::field_count(t, "count").unwrap_or(1))
        .fold(0u32, u32::saturating_add);
    Letter {
        job_id,
        reason,
        deaths,
    }
}

/// The broker's `x-death` records (one per queue and reason), newest first.
fn death_records(h: &FieldTable) -> Vec<FieldTable> {
    match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

fn field_str(t: &FieldTable, name: &str) -> Option<String> {
    match t.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The copy's headers: the letter's, less [`DROPPED_HEADERS`] and the `x-first-death-*` and
/// `x-last-death-*` records (a `traceparent` stays).
fn replay_headers(props: &BasicProperties) -> FieldTable {
    let Some(h) = props.headers() else {
        return FieldTable::default();
    };
    h.inner()
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            !DROPPED_HEADERS.contains(&k)
                && !k.starts_with("x-first-death-")
                && !k.starts_with("x-last-death-")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into()
}

/// A stored result: its status and, when failed, the error kind.
struct Stored {
    status: String,
    error_kind: Option<String>,
}

async fn result_of(
    redis: &mut ConnectionManager,
    prefix: &str,
    id: &str,
) -> Result<Option<Stored>> {
    use redis::AsyncCommands;
    let body: Option<String> = redis
        .get(format!("{prefix}:result:{id}"))
        .await
        .map_err(|e| WorkerError::unavailable("redis", e))?;
    Ok(body.map(|b| {
        let v = serde_json::from_str::<serde_json::Value>(&b).unwrap_or_default();
        let text = |v: Option<&serde_json::Value>| v.and_then(|s| s.as_str()).map(str::to_string);
        Stored {
            status: text(v.get("status")).unwrap_or_else(|| "unreadable".into()),
            error_kind: text(v.pointer("/error/kind")),
        }
    }))
}

/// Drops a job's attempt count and last cause (the adapter's `{prefix}:attempts:{id}` and
/// `{prefix}:last_error:{id}`) and, with `result`, its result and last progress.
async fn forget(redis: &mut ConnectionManager, prefix: &str, id: &str, result: bool) -> Result<()> {
    use redis::AsyncCommands;
    let mut keys = vec![
        format!("{prefix}:attempts:{id}"),
        format!("{prefix}:last_error:{id}"),
    ];
    if result {
        keys.push(format!("{prefix}:result:{id}"));
        keys.push(format!("{prefix}:step:{id}"));
    }
    let _: i64 = redis
        .del(keys)
        .await
        .map_err(|e| WorkerError::unavailable("redis", e))?;
    Ok(())
}

/// One output line: what happened, the job, why it died, and its stored result.
fn describe(cfg: &ReplayConfig, l: &Letter, r: Option<&Stored>, v: &Verdict) -> String {
    let what = match v {
        Verdict::Replay { .. } if cfg.dry_run => "would-replay",
        Verdict::Replay { .. } => "replayed",
        Verdict::KeepResult | Verdict::KeepNoId => "kept",
    };
    let result = match r {
        None => "none".to_string(),
        Some(Stored {
            status,
            error_kind: Some(k),
        }) => format!("{status}:{k}"),
        Some(s) => s.status.clone(),
    };
    let note = match v {
        Verdict::Replay { drop_result: true } => " (result dropped: runs again)",
        Verdict::KeepResult if r.is_some_and(|r| r.status == "failed") => {
            " (has a result: --rerun to run it again)"
        }
        Verdict::KeepResult => " (has a final result that is not `failed`)",
        Verdict::KeepNoId => " (no usable job id)",
        Verdict::Replay { .. } => "",
    };
    let id = l.job_id.as_deref().unwrap_or("-");
    format!(
        "{what} {id} reason={} deaths={} result={result}{note}",
        l.reason, l.deaths
    )
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} waiting, {} read, {} replayed ({} results dropped), {} kept with a result, \
             {} kept without a job id",
            self.waiting,
            self.read,
            self.replayed,
            self.results_dropped,
            self.kept_with_result,
            self.kept_without_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn death(reason: &str, count: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        AMQPValue::FieldTable(t)
    }

    fn props(extra: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in extra {
            h.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn a_letter_names_its_job_reason_and_deaths() {
        let deaths = AMQPValue::FieldArray(FieldArray::from(vec![
            death("rejected", 2),
            death("delivery_limit", 1),
        ]));
        let p = props(&[("x-death", deaths)]);
        let l = read_letter(br#"{"job_id":"gw:alice:7","task":"generate"}"#, &p);
        assert_eq!(l.job_id.as_deref(), Some("gw:alice:7"));
        assert_eq!((l.reason.as_str(), l.deaths), ("rejected", 3));
        let reason = AMQPValue::LongString(LongString::from("not JSON"));
        let l = read_letter(b"\xff{", &props(&[("x-ddit-reason", reason)]));
        assert_eq!(
            (l.job_id, l.reason.as_str(), l.deaths),
            (None, "not JSON", 0)
        );
    }

    #[test]
    fn a_copy_leaves_out_death_and_attempt_headers() {
        let n = |v: i64| AMQPValue::LongLongInt(v);
        let tp = AMQPValue::LongString(LongString::from("00-ab-cd-01"));
        let p = props(&[
            ("x-death", AMQPValue::FieldArray(FieldArray::default())),
            ("x-first-death-reason", n(1)),
            ("x-last-death-queue", n(1)),
            ("x-delivery-count", n(3)),
            ("x-ddit-attempts", n(4)),
            ("x-ddit-uncharged", n(1)),
            ("traceparent", tp),
        ]);
        let h = replay_headers(&p);
        let keys: Vec<&str> = h.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["traceparent"]);
    }
}
