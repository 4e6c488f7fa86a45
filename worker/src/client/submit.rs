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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ddit_schemas::{CaptionParams, GenerateParams, Job, JobResult, TaskParams, VqaParams};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use redis::AsyncCommands;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, WorkerError};
use crate::adapters::amqp::{self, AmqpConfig};
use crate::adapters::s3::{S3Config, S3Store};

/// The task of items that do not name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultTask {
    Caption,
    Vqa,
    Generate,
}

impl DefaultTask {
    fn as_str(self) -> &'static str {
        match self {
            DefaultTask::Caption => "caption",
            DefaultTask::Vqa => "vqa",
            DefaultTask::Generate => "generate",
        }
    }
}

#[derive(Debug, Clone)]
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

/// One line of a JSONL manifest. Paths are relative to the manifest's folder; `s3://` and
/// `data:` images are passed through.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLine {
    /// The item's name in the output (default: the image path, or `line-N`).
    #[serde(default)]
    pub id: Option<String>,
    /// `caption`, `vqa` or `generate` (default: `--task`).
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub question: Option<String>,
    /// Generate: the prompt. Caption: an optional prompt prefix.
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub length: Option<u32>,
    #[serde(default)]
    pub guidance: Option<f32>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub num_images: Option<u32>,
}

/// One unit of work: its output name, its job (image not yet uploaded) and a local image.
#[derive(Debug, Clone)]
pub struct Item {
    pub name: String,
    pub job: Job,
    pub local_image: Option<PathBuf>,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

fn bad_input(where_: impl Into<String>, message: impl Into<String>) -> WorkerError {
    WorkerError::Config {
        name: where_.into(),
        message: message.into(),
    }
}

/// The default batch name: a hash of the absolute input path and the default task.
pub fn default_batch(input: &Path, task: DefaultTask) -> String {
    let abs = std::fs::canonicalize(input).unwrap_or_else(|_| input.to_path_buf());
    let mut h = Sha256::new();
    h.update(abs.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(task.as_str().as_bytes());
    format!("sub-{}", &ddit_schemas::hex(&h.finalize())[..12])
}

/// `{batch}-{first 16 hex of sha256(item name)}`: stable across reruns, valid as a job id.
pub fn job_id_for(batch: &str, name: &str) -> String {
    let h = Sha256::digest(name.as_bytes());
    format!("{batch}-{}", &ddit_schemas::hex(&h)[..16])
}

fn params_for(
    task: &str,
    image: Option<String>,
    line: &ManifestLine,
    question: Option<&str>,
    where_: &str,
) -> Result<TaskParams> {
    let need_image = |img: Option<String>| {
        img.ok_or_else(|| {
            bad_input(
                format!("{where_}: image"),
                format!("a {task} item needs an image"),
            )
        })
    };
    Ok(match task {
        "caption" => TaskParams::Caption(CaptionParams {
            image: need_image(image)?,
            steps: line.steps,
            length: line.length,
            prompt: line.prompt.clone(),
            seed: line.seed,
        }),
        "vqa" => TaskParams::Vqa(VqaParams {
            image: need_image(image)?,
            question: line
                .question
                .clone()
                .or_else(|| question.map(str::to_string))
                .ok_or_else(|| {
                    bad_input(
                        format!("{where_}: question"),
                        "a vqa item needs a question (in the line or --question)",
                    )
                })?,
            steps: line.steps,
            seed: line.seed,
        }),
        "generate" => TaskParams::Generate(GenerateParams {
            prompt: line.prompt.clone().ok_or_else(|| {
                bad_input(
                    format!("{where_}: prompt"),
                    "a generate item needs a prompt",
                )
            })?,
            negative_prompt: line.negative_prompt.clone(),
            steps: line.steps,
            guidance: line.guidance,
            width: line.width,
            height: line.height,
            seed: line.seed,
            num_images: line.num_images,
        }),
        other => {
            return Err(bad_input(
                format!("{where_}: task"),
                format!("`{other}` is not caption, vqa or generate"),
            ))
        }
    })
}

/// Reads the items of a folder (every image file, sorted by name) or a JSONL manifest.
/// Every problem names the file, line and field.
pub fn load_items(cfg: &SubmitConfig, batch: &str) -> Result<Vec<Item>> {
    let input = &cfg.input;
    let meta = std::fs::metadata(input)
        .map_err(|e| bad_input("input", format!("{}: {e}", input.display())))?;
    let mut items = Vec::new();
    let mut names = HashSet::new();
    let mut push = |name: String, params: TaskParams, local: Option<PathBuf>| -> Result<()> {
        if !names.insert(name.clone()) {
            return Err(bad_input(
                "input",
                format!("item `{name}` appears twice (ids must be unique)"),
            ));
        }
        items.push(Item {
            job: Job {
                job_id: job_id_for(batch, &name),
                task: params,
                deadline: None,
                submitted_at: None,
            },
            name,
            local_image: local,
        });
        Ok(())
    };
    if meta.is_dir() {
        if cfg.task == DefaultTask::Generate {
            return Err(bad_input(
                "task",
                "a folder holds images: use --task caption or vqa (prompts come in a JSONL manifest)",
            ));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|e| bad_input("input", format!("{}: {e}", input.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                        IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad_input(
                "input",
                format!("{} holds no .png, .jpg or .webp files", input.display()),
            ));
        }
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let line = ManifestLine::default();
            let params = params_for(
                cfg.task.as_str(),
                Some(String::new()),
                &line,
                cfg.question.as_deref(),
                &name,
            )?;
            push(name, params, Some(f))?;
        }
    } else {
        let base = input.parent().unwrap_or(Path::new(".")).to_path_buf();
        let f = File::open(input)
            .map_err(|e| bad_input("input", format!("{}: {e}", input.display())))?;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line =
                line.map_err(|e| WorkerError::io(format!("reading {}", input.display()), e))?;
            if line.trim().is_empty() {
                continue;
            }
            let where_ = format!("{} line {}", input.display(), n + 1);
            let l: ManifestLine = serde_json::from_str(&line)
                .map_err(|e| bad_input(where_.clone(), e.to_string()))?;
            let task = l
                .task
                .clone()
                .unwrap_or_else(|| cfg.task.as_str().to_string());
            let (image, local) = match &l.image {
                None => (None, None),
                Some(i) if i.starts_with("s3://") || i.starts_with("data:") => {
                    (Some(i.clone()), None)
                }
                Some(i) => {
                    let p = base.join(i);
                    if !p.is_file() {
                        return Err(bad_input(
                            format!("{where_}: image"),
                            format!("{} is not a file", p.display()),
                        ));
                    }
                    (Some(String::new()), Some(p))
                }
            };
            let name =
                l.id.clone()
                    .or_else(|| l.image.clone().filter(|i| !i.starts_with("data:")))
                    .unwrap_or_else(|| format!("line-{}", n + 1));
            let params = params_for(&task, image, &l, cfg.question.as_deref(), &where_)?;
            push(name, params, local)?;
        }
        if items.is_empty() {
            return Err(bad_input(
                "input",
                format!("{} holds no items", input.display()),
            ));
        }
    }
    Ok(items)
}

/// Ids (and items) already in the output file; a torn last line is ignored.
fn finished(out: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    if !out.exists() {
        return Ok(ids);
    }
    let f =
        File::open(out).map_err(|e| WorkerError::io(format!("reading {}", out.display()), e))?;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| WorkerError::io(format!("reading {}", out.display()), e))?;
        if let Some(id) = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_string))
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

fn journal_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.submitted", out.display()))
}

fn read_journal(path: &Path) -> Result<HashSet<String>> {
    if !path.exists() {
        return Ok(HashSet::new());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
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

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|x| x.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "image/png",
    }
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
    let done = finished(&cfg.out)?;
    let jpath = journal_path(&cfg.out);
    let journaled = read_journal(&jpath)?;
    let mut summary = Summary {
        items: items.len(),
        ..Summary::default()
    };
    let mut queue: VecDeque<Item> = VecDeque::new();
    for it in items {
        if done.contains(&it.job.job_id) {
            summary.done_before += 1;
        } else {
            queue.push_back(it);
        }
    }
    let bar = if cfg.show_progress && std::io::stderr().is_terminal() {
        let b =
            ProgressBar::with_draw_target(Some(summary.items as u64), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(summary.done_before as u64);
        b
    } else {
        ProgressBar::hidden()
    };
    if queue.is_empty() {
        bar.finish_and_clear();
        return Ok(summary);
    }

    let redis_client = redis::Client::open(cfg.redis_url.as_str())
        .map_err(|e| bad_input("redis-url", e.to_string()))?;
    let mut redis = redis::aio::ConnectionManager::new(redis_client)
        .await
        .map_err(|e| WorkerError::unavailable("redis", e))?;
    let needs_s3 = queue.iter().any(|i| i.local_image.is_some());
    let s3 = if needs_s3 {
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

    let mut out = crate::adapters::local::open_append(&cfg.out)?;
    let mut journal = crate::adapters::local::open_append(&jpath)?;
    let result_key = |id: &str| format!("{}:result:{id}", cfg.redis_prefix);
    // job id -> (item name, when it was published or found in flight)
    let mut in_flight: HashMap<String, (String, Instant)> = HashMap::new();
    let ahead = cfg.ahead.max(1);

    let mut write_result = |name: &str, body: &str, summary: &mut Summary| -> Result<()> {
        let mut v: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| WorkerError::Internal(format!("result of {name} is not JSON: {e}")))?;
        let status = serde_json::from_value::<JobResult>(v.clone())
            .map(|r| r.status)
            .ok();
        if let Some(o) = v.as_object_mut() {
            o.insert("item".into(), serde_json::Value::String(name.to_string()));
        }
        let line = serde_json::to_string(&v).map_err(|e| WorkerError::Internal(e.to_string()))?;
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|e| WorkerError::io(format!("writing {}", cfg.out.display()), e))?;
        if status == Some(ddit_schemas::Status::Succeeded) {
            summary.succeeded += 1;
        } else {
            summary.failed += 1;
        }
        bar.inc(1);
        Ok(())
    };

    loop {
        // Fill the window.
        while in_flight.len() < ahead {
            let Some(mut it) = queue.pop_front() else {
                break;
            };
            let id = it.job.job_id.clone();
            let existing: Option<String> = redis
                .get(result_key(&id))
                .await
                .map_err(|e| WorkerError::unavailable("redis", e))?;
            if let Some(body) = existing {
                summary.recovered += 1;
                write_result(&it.name, &body, &mut summary)?;
                continue;
            }
            if journaled.contains(&id) {
                summary.resumed += 1;
                in_flight.insert(id, (it.name, Instant::now()));
                continue;
            }
            if let (Some(path), Some(s3)) = (&it.local_image, &s3) {
                let uri = upload(s3, &batch, &it.name, path).await?;
                match &mut it.job.task {
                    TaskParams::Caption(p) => p.image = uri,
                    TaskParams::Vqa(p) => p.image = uri,
                    TaskParams::Generate(_) => {}
                }
            }
            it.job.submitted_at = Some(crate::clock::now_rfc3339());
            let body =
                serde_json::to_vec(&it.job).map_err(|e| WorkerError::Internal(e.to_string()))?;
            crate::adapters::with_backoff("publish", 5, || {
                amqp::publish_job(&ch, &cfg.amqp.queue, &body, None)
            })
            .await?;
            writeln!(journal, "{id}")
                .and_then(|_| journal.flush())
                .map_err(|e| WorkerError::io(format!("writing {}", jpath.display()), e))?;
            summary.published += 1;
            in_flight.insert(id, (it.name, Instant::now()));
        }
        if in_flight.is_empty() {
            break;
        }
        bar.set_message(format!("{} in flight", in_flight.len()));
        // Collect.
        let ids: Vec<String> = in_flight.keys().cloned().collect();
        let keys: Vec<String> = ids.iter().map(|i| result_key(i)).collect();
        let vals: Vec<Option<String>> = redis
            .mget(&keys)
            .await
            .map_err(|e| WorkerError::unavailable("redis", e))?;
        let mut got_any = false;
        for (id, v) in ids.iter().zip(vals) {
            if let Some(body) = v {
                if let Some((name, _)) = in_flight.remove(id) {
                    write_result(&name, &body, &mut summary)?;
                    got_any = true;
                }
            }
        }
        if !got_any {
            if let Some(limit) = cfg.result_timeout {
                if let Some((id, (name, _))) =
                    in_flight.iter().find(|(_, (_, t))| t.elapsed() > limit)
                {
                    bar.finish_and_clear();
                    return Err(WorkerError::unavailable(
                        format!("result of `{name}` (job {id})"),
                        format!(
                            "none after {} s; {} jobs still in flight (rerun to keep waiting)",
                            limit.as_secs(),
                            in_flight.len()
                        ),
                    ));
                }
            }
            tokio::time::sleep(cfg.poll).await;
        }
    }
    bar.finish_and_clear();
    let _ = conn.close(200, "done".into()).await;
    Ok(summary)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(input: &Path, task: DefaultTask) -> SubmitConfig {
        SubmitConfig {
            input: input.to_path_buf(),
            task,
            question: None,
            out: input.join("out.jsonl"),
            ahead: 4,
            batch: None,
            amqp: AmqpConfig {
                url: String::new(),
                queue: "q".into(),
                prefetch: 1,
                delivery_limit: 5,
                dead_letter_exchange: "x".into(),
                dead_letter_queue: "x.queue".into(),
            },
            s3: S3Config {
                endpoint: None,
                region: "us-east-1".into(),
                bucket: "b".into(),
                prefix: "p".into(),
                path_style: true,
                input_buckets: vec![],
                max_input_bytes: 1 << 20,
            },
            redis_url: String::new(),
            redis_prefix: "ddit".into(),
            poll: Duration::from_millis(10),
            result_timeout: None,
            show_progress: false,
        }
    }

    #[test]
    fn job_ids_are_stable_and_valid() {
        let a = job_id_for("sub-0123456789ab", "cat.png");
        assert_eq!(a, job_id_for("sub-0123456789ab", "cat.png"));
        assert_ne!(a, job_id_for("sub-0123456789ab", "dog.png"));
        assert!(crate::tasks::validate_job_id(&a).is_ok());
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(
            default_batch(d.path(), DefaultTask::Caption),
            default_batch(d.path(), DefaultTask::Caption)
        );
        assert_ne!(
            default_batch(d.path(), DefaultTask::Caption),
            default_batch(d.path(), DefaultTask::Vqa)
        );
    }

    #[test]
    fn folders_and_manifests() {
        let d = tempfile::tempdir().expect("tmp");
        for n in ["b.png", "a.jpg", "notes.txt"] {
            std::fs::write(d.path().join(n), b"x").expect("write");
        }
        let items = load_items(&cfg(d.path(), DefaultTask::Caption), "t").expect("folder");
        let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a.jpg", "b.png"]);
        assert!(matches!(items[0].job.task, TaskParams::Caption(_)));
        // VQA from a folder needs a question.
        let e = load_items(&cfg(d.path(), DefaultTask::Vqa), "t").expect_err("no question");
        assert!(e.to_string().contains("question"), "{e}");

        let m = d.path().join("jobs.jsonl");
        std::fs::write(
            &m,
            concat!(
                "{\"image\": \"a.jpg\", \"task\": \"vqa\", \"question\": \"what shape?\"}\n",
                "\n",
                "{\"id\": \"p1\", \"task\": \"generate\", \"prompt\": \"a red circle\", \"seed\": 3}\n",
                "{\"image\": \"s3://bucket/x.png\"}\n"
            ),
        )
        .expect("write");
        let items = load_items(&cfg(&m, DefaultTask::Caption), "t").expect("manifest");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].name, "a.jpg");
        assert!(items[0].local_image.is_some());
        assert!(matches!(&items[1].job.task, TaskParams::Generate(g) if g.seed == Some(3)));
        assert!(
            matches!(&items[2].job.task, TaskParams::Caption(c) if c.image == "s3://bucket/x.png")
        );
        assert!(items[2].local_image.is_none());

        for (line, field) in [
            ("{\"image\": \"missing.png\"}", "line 1: image"),
            ("{\"task\": \"generate\"}", "line 1: prompt"),
            (
                "{\"task\": \"paint\", \"image\": \"a.jpg\"}",
                "line 1: task",
            ),
            ("{\"imagee\": \"a.jpg\"}", "line 1"),
        ] {
            std::fs::write(&m, line).expect("write");
            let e = load_items(&cfg(&m, DefaultTask::Caption), "t").expect_err(line);
            assert!(e.to_string().contains(field), "{line}: {e}");
        }
        std::fs::write(
            &m,
            "{\"id\":\"x\",\"image\":\"a.jpg\"}\n{\"id\":\"x\",\"image\":\"b.png\"}\n",
        )
        .expect("write");
        let e = load_items(&cfg(&m, DefaultTask::Caption), "t").expect_err("dup");
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
