//! The submit loop's state: the window of jobs published and not yet answered, filled from the
//! stream of items and emptied by reading results from Redis.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use ddit_schemas::{JobResult, Status, TaskParams};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use super::items::{content_type, Item, Local};
use super::{journal, SubmitConfig, Summary};
use crate::adapters::amqp;
use crate::adapters::local::open_append;
use crate::adapters::s3::S3Store;
use crate::error::{Result, WorkerError};

/// The connections are opened only when something is left to do.
struct Links {
    redis: ConnectionManager,
    s3: S3Store,
    conn: lapin::Connection,
    ch: lapin::Channel,
}

pub(super) struct Submitter<'a> {
    cfg: &'a SubmitConfig,
    batch: String,
    items: tokio::sync::mpsc::Receiver<Result<Item>>,
    /// No item is left to read.
    exhausted: bool,
    /// Job ids already in the results file.
    done: HashSet<String>,
    journaled: HashSet<String>,
    /// job id -> (item name, when it was published or found in flight)
    in_flight: HashMap<String, (String, Instant)>,
    summary: Summary,
    bar: ProgressBar,
    out: File,
    journal: File,
    links: Option<Links>,
}

/// Items are streamed, so their number is not known ahead: the bar counts results.
fn progress_bar(cfg: &SubmitConfig) -> ProgressBar {
    if !(cfg.show_progress && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{pos} results {elapsed_precise} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    b
}

impl<'a> Submitter<'a> {
    /// Opens the results file and the journal; connections open with the first item left to do.
    pub async fn connect(
        cfg: &'a SubmitConfig,
        batch: String,
        items: tokio::sync::mpsc::Receiver<Result<Item>>,
        done: HashSet<String>,
    ) -> Result<Submitter<'a>> {
        let jpath = journal::journal_path(&cfg.out);
        let journaled = journal::read_journal(&jpath)?;
        Ok(Submitter {
            bar: progress_bar(cfg),
            out: open_append(&super::results_path(&cfg.out))?,
            journal: open_append(&jpath)?,
            cfg,
            batch,
            items,
            exhausted: false,
            done,
            journaled,
            in_flight: HashMap::new(),
            summary: Summary::default(),
            links: None,
        })
    }

    async fn open_links(cfg: &SubmitConfig) -> Result<Links> {
        // `--tls-ca-file` is one trust for both connections.
        let client = crate::adapters::redis::client(&cfg.redis_url, cfg.amqp.ca_pem.as_deref())?;
        let redis = ConnectionManager::new(client)
            .await
            .map_err(|e| WorkerError::unavailable("redis", e))?;
        let s3 = S3Store::connect(cfg.s3.clone()).await?;
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

    /// Nothing left to read and nothing in flight.
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.exhausted
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

    /// Reads items and publishes them until `ahead` jobs are in flight. An item already in the
    /// results file is skipped; one whose result is in Redis is written without publishing; one
    /// in the journal is waited for.
    pub async fn fill(&mut self) -> Result<()> {
        let ahead = self.cfg.ahead.max(1);
        while self.in_flight.len() < ahead && !self.exhausted {
            let Some(it) = self.items.recv().await.transpose()? else {
                self.exhausted = true;
                break;
            };
            self.summary.items += 1;
            let id = it.job.job_id.clone();
            if self.done.contains(&id) {
                self.summary.done_before += 1;
                continue;
            }
            if self.links.is_none() {
                self.links = Some(Self::open_links(self.cfg).await?);
            }
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
        if let Some(local) = &it.local_image {
            let uri = upload(&links.s3, &self.batch, &it.name, local).await?;
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

/// Uploads one input image under `{prefix}/inputs/{batch}/{hash of its name}-{file name}`.
async fn upload(s3: &S3Store, batch: &str, name: &str, local: &Local) -> Result<String> {
    let file_name = match local {
        Local::File(path) => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        Local::Bytes { ext, .. } => format!("image.{ext}"),
    };
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
    let ext = safe.rsplit_once('.').map_or("", |(_, e)| e).to_string();
    match local {
        Local::File(path) => {
            s3.put_file(&s3.cfg.bucket, &key, path, Some(content_type(&ext)))
                .await
        }
        Local::Bytes { bytes, .. } => s3.put(&key, bytes, content_type(&ext), &[]).await,
    }
}
