//! What the soak test reads from the services: announcements and progress while it runs, and at
//! the end the stored results, the dead letters, the objects and the workers' logs.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::{JobResult, Progress};
use futures_util::StreamExt;

use super::jobs::{self, Plan};
use super::tally::Observed;

/// What the workers announced while the soak ran.
#[derive(Default)]
pub struct Heard {
    /// Results announced on `{prefix}:results`, by id (a worker announces only what it stored).
    announced: HashMap<String, u32>,
    /// Per job: its last progress step, and how many runs its progress showed (a step at or
    /// below the one before starts a new run).
    progress: HashMap<String, (u64, u32)>,
}

pub type Listener = Arc<Mutex<Heard>>;

impl Heard {
    fn hear(&mut self, channel: &str, results: &str, payload: String) {
        if channel == results {
            *self.announced.entry(payload).or_default() += 1;
            return;
        }
        let Ok(p) = serde_json::from_str::<Progress>(&payload) else {
            return;
        };
        let e = self.progress.entry(p.job_id).or_insert((u64::MAX, 0));
        if p.step <= e.0 {
            e.1 += 1;
        }
        e.0 = p.step;
    }
}

/// Subscribes to the results channel and every job's progress, reconnecting across the Redis
/// restart (what is published while it is down is not heard: the runs it counts are a floor).
pub fn listen(url: &str, prefix: &str) -> Listener {
    let heard = Listener::default();
    let (url, out) = (url.to_string(), heard.clone());
    let results = format!("{prefix}:results");
    let progress = format!("{prefix}:progress:*");
    tokio::spawn(async move {
        loop {
            if let Ok(mut ps) = async {
                let c = redis::Client::open(url.as_str())?;
                let mut ps = c.get_async_pubsub().await?;
                ps.subscribe(&results).await?;
                ps.psubscribe(&progress).await?;
                Ok::<_, redis::RedisError>(ps)
            }
            .await
            {
                let mut messages = ps.on_message();
                while let Some(m) = messages.next().await {
                    if let Ok(payload) = m.get_payload::<String>() {
                        let channel = m.get_channel_name().to_string();
                        out.lock().unwrap().hear(&channel, &results, payload);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    heard
}

async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let c = redis::Client::open(url).ok()?;
    c.get_multiplexed_async_connection().await.ok()
}

async fn stored(names: &Names, url: &str, ids: &[String]) -> Option<Vec<Option<String>>> {
    let mut r = connect(url).await?;
    let keys: Vec<String> = ids
        .iter()
        .map(|i| format!("{}:result:{i}", names.redis_prefix))
        .collect();
    redis::AsyncCommands::mget(&mut r, &keys).await.ok()
}

/// Waits until every id has a result and the work and retry queues are empty, or `limit`
/// passes; returns whether it ended. The tally runs either way.
pub async fn wait_done(names: &Names, url: &str, ids: &[String], limit: Duration) -> bool {
    let start = Instant::now();
    let mut last = 0;
    while start.elapsed() < limit {
        let have = (stored(names, url, ids).await).map_or(0, |v| v.iter().flatten().count());
        if have != last {
            eprintln!(
                "soak: {have} of {} results at {:?}",
                ids.len(),
                start.elapsed()
            );
            last = have;
        }
        let drained = have == ids.len()
            && queue_depth(names, &names.queue).await == 0
            && retry_depth(names).await == 0;
        if drained {
            // The last dead-letterings follow their results.
            tokio::time::sleep(Duration::from_secs(3)).await;
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// A log without its colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out + rest
}

/// From the workers' logs: the panics, and per job the copies that finished and then found a
/// result already stored (each a run that did the whole work a second time).
fn read_logs(logs: &[String], seen: &mut Observed) -> HashMap<String, u32> {
    let mut lost_races = HashMap::new();
    for line in logs.iter().flat_map(|l| l.lines()).map(plain) {
        if line.contains("panicked at") || line.contains("panic in") {
            seen.panics.push(line);
        } else if line.contains("a result already existed") {
            let id = line
                .split("job_id=")
                .nth(1)
                .and_then(|s| s.split([' ', '}']).next());
            if let Some(id) = id {
                *lost_races.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    lost_races
}

async fn read_objects(seen: &mut Observed) {
    let s3 = s3_client().await;
    let uris: HashSet<String> = (seen.results.values())
        .flat_map(|r| &r.outputs)
        .map(|o| o.uri.clone())
        .collect();
    for uri in uris {
        let found = match uri.strip_prefix(&format!("s3://{}/", bucket())) {
            Some(key) => object_sha256(&s3, key).await,
            None => Err("not in the test bucket".into()),
        };
        seen.objects.insert(uri, found);
    }
}

/// The announcements, and the runs of each job: the most its progress or the logs show.
fn take_heard(heard: &Listener, lost_races: HashMap<String, u32>, seen: &mut Observed) {
    let heard = heard.lock().unwrap();
    let restarts = (heard.progress.values())
        .filter(|(_, runs)| *runs > 1)
        .count();
    let raced: u32 = lost_races.values().sum();
    eprintln!("soak: {restarts} jobs' progress started over; {raced} finished copies found a result stored");
    seen.announced = heard.announced.clone();
    for (id, (_, runs)) in &heard.progress {
        let raced = lost_races.get(id).copied().unwrap_or(0);
        seen.runs.insert(id.clone(), (*runs).max(1 + raced));
    }
    for (id, raced) in lost_races {
        seen.runs.entry(id).or_insert(1 + raced);
    }
}

/// The local CLI's answer to a caption or VQA job of the plan, on the same model and inputs:
/// what the job should end with.
fn reference_text(model: &Path, dir: &Path, body: &[u8]) -> Option<String> {
    let j: serde_json::Value = serde_json::from_slice(body).ok()?;
    let task = j["task"].as_str()?;
    let p = &j["params"];
    let rgb = if task == "caption" {
        jobs::CAPTION_RGB
    } else {
        jobs::VQA_RGB
    };
    let image = dir.join(format!("reference-{task}.png"));
    std::fs::write(&image, jobs::png(rgb)).ok()?;
    let mut c = Command::new(worker_bin());
    c.arg(task)
        .arg("--model")
        .arg(model)
        .arg("--image")
        .arg(&image);
    c.args([
        "--steps",
        &p["steps"].to_string(),
        "--seed",
        &p["seed"].to_string(),
    ]);
    if let Some(q) = p["question"].as_str() {
        c.args(["--question", q]);
    }
    let out = c.output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success().then_some(text)
}

/// The good caption and VQA jobs that succeeded with an empty text which the same job, run
/// locally, answers with an empty text too (the tiny fixture model does for a few seeds).
fn empty_by_the_model(model: &Path, dir: &Path, plan: &Plan, seen: &mut Observed) {
    for m in plan
        .msgs
        .iter()
        .filter(|m| m.expect == jobs::Expect::Succeeds)
    {
        let Some(id) = &m.id else { continue };
        let empty = (seen.results.get(id)).is_some_and(|r| {
            r.outputs.is_empty() && r.text.as_deref().is_some_and(|t| t.trim().is_empty())
        });
        if empty && reference_text(model, dir, &m.body).as_deref() == Some("") {
            seen.model_says_empty.insert(id.clone());
        }
    }
}

/// Everything the tally judges, read once the soak has stopped.
pub async fn gather(
    names: &Names,
    (url, model, dir): (&str, &Path, &Path),
    plan: &Plan,
    heard: &Listener,
    logs: &[String],
) -> Observed {
    let mut seen = Observed::default();
    let ids = plan.result_ids();
    let values = stored(names, url, &ids).await.unwrap_or_default();
    for (id, v) in ids.iter().zip(values) {
        // An unreadable result counts as none (`without_result`).
        match v.map(|v| serde_json::from_str::<JobResult>(&v)) {
            Some(Ok(r)) => drop(seen.results.insert(id.clone(), r)),
            Some(Err(e)) => eprintln!("soak: {id}: an unreadable result: {e}"),
            None => {}
        }
    }
    let prefix = format!("{}:result:", names.redis_prefix);
    let mut r = connect(url).await.expect("the soak's redis");
    let keys: Vec<String> = redis::AsyncCommands::keys(&mut r, format!("{prefix}*"))
        .await
        .unwrap_or_default();
    let planned: HashSet<&String> = ids.iter().collect();
    seen.unplanned_results = (keys.iter())
        .map(|k| k.strip_prefix(&prefix).unwrap_or(k).to_string())
        .filter(|id| !planned.contains(id))
        .collect();
    seen.dead = take_dead_letters(names).await;
    let lost_races = read_logs(logs, &mut seen);
    take_heard(heard, lost_races, &mut seen);
    read_objects(&mut seen).await;
    empty_by_the_model(model, dir, plan, &mut seen);
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 3442's caption is empty on the fixture model: the 10,000-job soak's workers said so,
    /// and so does the local run the tally asks; seed 3443's is not.
    #[test]
    fn the_reference_run_answers_an_empty_caption_where_the_service_did() {
        let dir = tempfile::tempdir().unwrap();
        let model = export_model(dir.path());
        let body = |seed: u32| {
            let j = serde_json::json!({"job_id": "j", "task": "caption",
                "params": {"image": "s3://b/x.png", "steps": 4, "seed": seed}});
            serde_json::to_vec(&j).unwrap()
        };
        let text = |seed| reference_text(&model, dir.path(), &body(seed));
        assert_eq!(text(3442).as_deref(), Some(""));
        assert!(text(3443).is_some_and(|t| !t.is_empty()));
    }

    #[test]
    fn a_lost_race_is_read_from_a_coloured_log_line() {
        let line = "\x1b[2m2026-12-07T19:00:00Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[1mjob\x1b[0m\
            \x1b[1m{\x1b[0m\x1b[3mjob_id\x1b[0m\x1b[2m=\x1b[0mjob-00007 \x1b[3mtask\x1b[0m\
            \x1b[2m=\x1b[0mgenerate\x1b[1m}\x1b[0m\x1b[2m:\x1b[0m ddit_worker::service::deliveries: \
            a result already existed (duplicate delivery)";
        let logs = [format!("{line}\nthread 'x' panicked at src/a.rs:1:1\n")];
        let mut seen = Observed::default();
        let raced = read_logs(&logs, &mut seen);
        assert_eq!(raced.get("job-00007"), Some(&1));
        assert_eq!(seen.panics.len(), 1);
    }
}
