//! The submit loop's state: the window of jobs published and not yet answered, filled from the
//! queue of items and emptied by reading results from Redis.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use ddit_schemas::{JobResult, Status, TaskParams};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use super::items::{content_type, Item};
use super::{journal, SubmitConfig, Summary};
use crate::adapters::amqp;
use crate::adapters::local::open_append;
use crate::adapters::s3::S3Store;
use crate::error::{Result, WorkerError};

/// The connections are opened only when something is left to do.
struct Links {
    redis: ConnectionManager,
    s3: Option<S3Store>,
    conn: lapin::Connection,
    ch: lapin::Channel,
}

pub(super) struct Submitter<'a> {
    cfg: &'a SubmitConfig,
    batch: String,
    queue: VecDeque<Item>,
    journaled: HashSet<String>,
    /// job id -> (item name, when it was published or found in flight)
    in_flight: HashMap<String, (String, Instant)>,
    summary: Summary,
    bar: ProgressBar,
    out: File,
    journal: File,
    links: Option<Links>,
}

fn progress_bar(cfg: &SubmitConfig, s: &Summary) -> ProgressBar {
    if !(cfg.show_progress && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(s.items as u64), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_position(s.done_before as u64);
    b
}

impl<'a> Submitter<'a> {
    /// Opens the output and the journal, and connects Redis, S3 (when an item is a local file)
    /// and the broker when the queue is not empty.
    pub async fn connect(
        cfg: &'a SubmitConfig,
        batch: String,
        queue: VecDeque<Item>,
        summary: Summary,
    ) -> Result<Submitter<'a>> {
        let jpath = journal::journal_path(&cfg.out);
        let journaled = journal::read_journal(&jpath)?;
        let links = if queue.is_empty() {
            None
        } else {
            Some(Self::open_links(cfg, &queue).await?)
        };
        Ok(Submitter {
            bar: progress_bar(cfg, &summary),
            out: open_append(&cfg.out)?,
            journal: open_append(&jpath)?,
            cfg,
            batch,
            queue,
            journaled,
            in_flight: HashMap::new(),
            summary,
            links,
        })
    }

    async fn open_links(cfg: &SubmitConfig, queue: &VecDeque<Item>) -> Result<Links> {
        // `--tls-ca-file` is one trust for both connections.
        let client = crate::adapters::redis::client(&cfg.redis_url, cfg.amqp.ca_pem.as_deref())?;
        let redis = ConnectionManager::new(client)
            .await
            .map_err(|e| WorkerError::unavailable("redis", e))?;
        let s3 = if queue.iter().any(|i| i.local_image.is_some()) {
            Some(S3Store::connect(cfg.s3.clone()).await?)
        } else {
            None
        };
        let conn = amqp::connect(&cfg.amqp, "ddit-submit").await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| WorkerError::unavailable("amqp channel", e))?;
        amqp::declare(&ch, &cfg.amqp).await?;
        Ok(Links {
            redis,
            s3,
            conn,
            ch,
        })
    }

    fn result_key(&self, id: &str) -> String {
        format!("{}:result:{id}", self.cfg.redis_prefix)
    }

    /// The connections; there are none only when nothing was left to do at start.
    fn links(&self) -> Result<&Links> {
        self.links
            .as_ref()
            .ok_or_else(|| WorkerError::Internal("submit: not connected".into()))
    }

    /// Nothing queued and nothing in flight.
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.queue.is_empty()
    }

    /// Appends one result line (`item` plus the result) and counts it.
    fn write_result(&mut self, name: &str, body: &str) -> Result<()> {
        let mut v: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| WorkerError::Internal(format!("result of {name} is not JSON: {e}")))?;
        let status = serde_json::from_value::<JobResult>(v.clone())
            .map(|r| r.status)
            .ok();
        if let Some(o) = v.as_object_mut() {
            o.insert("item".into(), serde_json::Value::String(name.to_string()));
        }
        let line = serde_json::to_string(&v).map_err(|e| WorkerError::Internal(e.to_string()))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| WorkerError::io(format!("writing {}", self.cfg.out.display()), e))?;
        if status == Some(Status::Succeeded) {
            self.summary.succeeded += 1;
        } else {
            self.summary.failed += 1;
        }
        self.bar.inc(1);
        Ok(())
    }

    /// Publishes queued items until `ahead` jobs are in flight. An item whose result is already
    /// in Redis is written without publishing; one in the journal is waited for.
    pub async fn fill(&mut self) -> Result<()> {
        let ahead = self.cfg.ahead.max(1);
        while self.in_flight.len() < ahead {
            let Some(it) = self.queue.pop_front() else {
                break;
            };
            let id = it.job.job_id.clone();
            let key = self.result_key(&id);
            // A `ConnectionManager` clone shares the one connection.
            let existing: Option<String> = self
                .links()?
                .redis
                .clone()
                .get(key)
                .await
                .map_err(|e| WorkerError::unavailable("redis", e))?;
            if let Some(body) = existing {
                self.summary.recovered += 1;
                self.write_result(&it.name, &body)?;
            } else if self.journaled.contains(&id) {
                self.summary.resumed += 1;
                self.in_flight.insert(id, (it.name, Instant::now()));
            } else {
                self.publish(it).await?;
            }
        }
        Ok(())
    }

    /// Uploads a local input, publishes the job (confirmed) and journals its id.
    async fn publish(&mut self, mut it: Item) -> Result<()> {
        let links = self.links()?;
        if let (Some(path), Some(s3)) = (&it.local_image, &links.s3) {
            let uri = upload(s3, &self.batch, &it.name, path).await?;
            match &mut it.job.task {
                TaskParams::Caption(p) => p.image = uri,
                TaskParams::Vqa(p) => p.image = uri,
                TaskParams::Generate(_) => {}
            }
        }
        it.job.submitted_at = Some(crate::clock::now_rfc3339());
        let body = serde_json::to_vec(&it.job).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let queue = &self.cfg.amqp.queue;
        crate::adapters::with_backoff("publish", 5, || {
            amqp::publish_job(&links.ch, queue, &body, None)
        })
        .await?;
        let id = it.job.job_id;
        writeln!(self.journal, "{id}")
            .and_then(|_| self.journal.flush())
            .map_err(|e| {
                let p = journal::journal_path(&self.cfg.out);
                WorkerError::io(format!("writing {}", p.display()), e)
            })?;
        self.summary.published += 1;
        self.in_flight.insert(id, (it.name, Instant::now()));
        Ok(())
    }

    /// Reads the results in flight (one `MGET`); sleeps one poll when none arrived, and gives up
    /// after `result_timeout` without a result.
    pub async fn collect(&mut self) -> Result<()> {
        self.bar
            .set_message(format!("{} in flight", self.in_flight.len()));
        let ids: Vec<String> = self.in_flight.keys().cloned().collect();
        let keys: Vec<String> = ids.iter().map(|i| self.result_key(i)).collect();
        let vals: Vec<Option<String>> = self
            .links()?
            .redis
            .clone()
            .mget(&keys)
            .await
            .map_err(|e| WorkerError::unavailable("redis", e))?;
        let mut got_any = false;
        for (id, body) in ids.iter().zip(vals) {
            // Only a job whose result arrived leaves the window.
            let Some(body) = body else { continue };
            if let Some((name, _)) = self.in_flight.remove(id) {
                self.write_result(&name, &body)?;
                got_any = true;
            }
        }
        if got_any {
            return Ok(());
        }
        if let Some(limit) = self.cfg.result_timeout {
            let late = self
                .in_flight
                .iter()
                .find(|(_, (_, t))| t.elapsed() > limit);
            if let Some((id, (name, _))) = late {
                self.bar.finish_and_clear();
                return Err(WorkerError::unavailable(
                    format!("result of `{name}` (job {id})"),
                    format!(
                        "none after {} s; {} jobs still in flight (rerun to keep waiting)",
                        limit.as_secs(),
                        self.in_flight.len()
                    ),
                ));
            }
        }
        tokio::time::sleep(self.cfg.poll).await;
        Ok(())
    }

    /// Closes the broker connection and returns the run's counts.
    pub async fn finish(self) -> Summary {
        self.bar.finish_and_clear();
        if let Some(l) = self.links {
            let _ = l.conn.close(200, "done".into()).await;
        }
        self.summary
    }
}

/// Uploads one input image under `{prefix}/inputs/{batch}/{hash}-{file name}`.
async fn upload(s3: &S3Store, batch: &str, name: &str, path: &Path) -> Result<String> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let safe: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let p = s3.cfg.prefix.trim_matches('/');
    let h = &ddit_schemas::hex(&Sha256::digest(name.as_bytes()))[..12];
    let key = if p.is_empty() {
        format!("inputs/{batch}/{h}-{safe}")
    } else {
        format!("{p}/inputs/{batch}/{h}-{safe}")
    };
    s3.put_file(&s3.cfg.bucket, &key, path, Some(content_type(path)))
        .await
}
