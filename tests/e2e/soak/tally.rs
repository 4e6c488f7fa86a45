//! The soak test's counters, from what the services hold at the end.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::{ErrorKind, JobResult, Status};
use futures_util::StreamExt;

use super::jobs::{Expect, Plan};

/// How many times each job id was announced on `{prefix}:results` (a worker announces only the
/// result it stored): more than once is a second result.
pub type Announced = Arc<Mutex<HashMap<String, u32>>>;

/// Subscribes to the results channel, reconnecting across the Redis restart.
pub fn listen(url: &str, prefix: &str) -> Announced {
    let seen = Announced::default();
    let (url, channel, out) = (url.to_string(), format!("{prefix}:results"), seen.clone());
    tokio::spawn(async move {
        loop {
            if let Ok(mut ps) = async {
                let c = redis::Client::open(url.as_str())?;
                let mut ps = c.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            }
            .await
            {
                let mut messages = ps.on_message();
                while let Some(m) = messages.next().await {
                    if let Ok(id) = m.get_payload::<String>() {
                        *out.lock().unwrap().entry(id).or_default() += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    seen
}

async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let c = redis::Client::open(url).ok()?;
    c.get_multiplexed_async_connection().await.ok()
}

async fn results(names: &Names, url: &str, ids: &[String]) -> Option<Vec<Option<String>>> {
    let mut r = connect(url).await?;
    let keys: Vec<String> = ids
        .iter()
        .map(|i| format!("{}:result:{i}", names.redis_prefix))
        .collect();
    redis::AsyncCommands::mget(&mut r, &keys).await.ok()
}

/// Waits until every id has a result and the work and retry queues are empty.
pub async fn wait_done(names: &Names, url: &str, ids: &[String], limit: Duration) -> bool {
    let start = Instant::now();
    let mut last = 0;
    while start.elapsed() < limit {
        let have = results(names, url, ids)
            .await
            .map_or(0, |v| v.iter().flatten().count());
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

#[derive(Default)]
pub struct Tally {
    jobs: usize,
    lost: usize,
    duplicates: usize,
    mismatched: usize,
    without_result: usize,
    dead_lettered: usize,
    panics: usize,
    pub details: String,
}

impl Tally {
    pub async fn count(
        names: &Names,
        url: &str,
        plan: &Plan,
        announced: &Announced,
        logs: &[String],
    ) -> Self {
        let mut t = Self {
            jobs: (plan.msgs.iter())
                .filter(|m| m.expect == Expect::Succeeds)
                .filter_map(|m| m.id.as_ref())
                .collect::<HashSet<_>>()
                .len(),
            ..Self::default()
        };
        let ids = plan.result_ids();
        let stored = results(names, url, &ids).await.unwrap();
        let by_id: HashMap<&str, JobResult> = ids
            .iter()
            .zip(&stored)
            .filter_map(|(id, v)| Some((id.as_str(), serde_json::from_str(v.as_ref()?).ok()?)))
            .collect();
        t.endings(names, plan, &by_id);
        t.dead_letters(names, plan).await;
        t.second_results(announced, &ids, names, url).await;
        t.outputs(names, by_id.values()).await;
        t.panics = logs
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains("panicked at") || l.contains("panic in"))
            .inspect(|l| t.details.push_str(&format!("panic: {l}\n")))
            .count();
        t
    }

    /// Each message against what it must end with.
    fn endings(&mut self, names: &Names, plan: &Plan, by_id: &HashMap<&str, JobResult>) {
        let mut judged = HashSet::new();
        for m in &plan.msgs {
            let Some(id) = &m.id else { continue };
            if !judged.insert(id) {
                continue; // the second copy of a job published twice
            }
            let Some(r) = by_id.get(id.as_str()) else {
                self.without_result += 1;
                self.details.push_str(&format!("{id}: no result\n"));
                continue;
            };
            let true_ending = match m.expect {
                Expect::Succeeds => r.status == Status::Succeeded,
                Expect::FailsForever => {
                    r.status == Status::Failed
                        && r.attempts == Some(names.delivery_limit)
                        && r.error
                            .as_ref()
                            .is_some_and(|e| e.kind == ErrorKind::Unavailable)
                }
                Expect::Fuzz => true,
            };
            if !true_ending {
                self.lost += 1;
                self.details.push_str(&format!(
                    "{id}: ended {:?} after {:?} attempts: {:?}\n",
                    r.status, r.attempts, r.error
                ));
            }
        }
    }

    /// Every message without a usable id, and every job failed for good, is in the DLQ.
    async fn dead_letters(&mut self, names: &Names, plan: &Plan) {
        let dead = take_dead_letters(names).await;
        self.dead_lettered = dead.len();
        let mut bodies: HashMap<&[u8], usize> = HashMap::new();
        for (body, _) in &dead {
            *bodies.entry(body.as_slice()).or_default() += 1;
        }
        for m in &plan.msgs {
            let must = m.id.is_none() || m.expect == Expect::FailsForever;
            if must && bodies.get(m.body.as_slice()).copied().unwrap_or(0) == 0 {
                self.lost += 1;
                let shown = String::from_utf8_lossy(&m.body[..m.body.len().min(80)]).into_owned();
                self.details
                    .push_str(&format!("not dead-lettered: {shown:?}\n"));
            }
        }
        let reasonless = dead.iter().filter(|(_, r)| r.is_none()).count();
        self.details.push_str(&format!(
            "dead letters: {} ({reasonless} without an x-ddit-reason: failed jobs, whose reason is their result)\n",
            dead.len()
        ));
    }

    /// A job announced twice stored two results; a result under an id nobody sent is one too.
    async fn second_results(
        &mut self,
        announced: &Announced,
        ids: &[String],
        names: &Names,
        url: &str,
    ) {
        let seen = announced.lock().unwrap().clone();
        for (id, n) in &seen {
            if *n > 1 {
                self.duplicates += (*n - 1) as usize;
                self.details
                    .push_str(&format!("{id}: {n} results announced\n"));
            }
        }
        let known: HashSet<&String> = ids.iter().collect();
        let mut r = connect(url).await.unwrap();
        let keys: Vec<String> =
            redis::AsyncCommands::keys(&mut r, format!("{}:result:*", names.redis_prefix))
                .await
                .unwrap();
        let prefix = format!("{}:result:", names.redis_prefix);
        for k in keys {
            let id = k.strip_prefix(&prefix).unwrap_or(&k).to_string();
            if !known.contains(&id) {
                self.duplicates += 1;
                self.details
                    .push_str(&format!("a result nobody asked for: {k}\n"));
            }
        }
    }

    /// Every output a result names is in S3 with its sha256; objects no result names (a losing
    /// copy killed before its cleanup) are listed, and harmless.
    async fn outputs<'a>(&mut self, names: &Names, results: impl Iterator<Item = &'a JobResult>) {
        let s3 = s3_client().await;
        let mut named = HashSet::new();
        for o in results.flat_map(|r| &r.outputs) {
            let key = s3_key(&o.uri).to_string();
            let sha = object_sha256(&s3, &key).await.unwrap_or_else(|e| e);
            if sha != o.sha256 {
                self.mismatched += 1;
                self.details
                    .push_str(&format!("{key}: {sha} but the result says {}\n", o.sha256));
            }
            named.insert(key);
        }
        let mut orphans = BTreeSet::new();
        let mut pages = s3
            .list_objects_v2()
            .bucket(bucket())
            .prefix(format!("{}/", names.s3_prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for o in page.unwrap().contents() {
                let key = o.key().unwrap_or_default();
                if !named.contains(key) && !key.contains("/inputs/") {
                    orphans.insert(key.to_string());
                }
            }
        }
        let some: Vec<&String> = orphans.iter().take(5).collect();
        self.details.push_str(&format!(
            "objects no result names (losing copies killed before their cleanup): {} {some:?}\n",
            orphans.len()
        ));
    }

    pub fn clean(&self) -> bool {
        self.lost + self.duplicates + self.mismatched + self.without_result + self.panics == 0
    }

    pub fn line(&self) -> String {
        format!(
            "soak: jobs={} lost={} duplicates={} mismatched={} without_result={} dead_lettered={} panics={}",
            self.jobs,
            self.lost,
            self.duplicates,
            self.mismatched,
            self.without_result,
            self.dead_lettered,
            self.panics
        )
    }
}
