//! The items of one `submit` run, read as a stream (memory stays bounded however many there are):
//! a folder of images, a JSONL manifest, or (the `datasets` feature, [`super::shards`]) WebDataset
//! `.tar` shards and Parquet files. Each item has its stable job id; every problem names the
//! file, line and field.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use ddit_schemas::{CaptionParams, GenerateParams, Job, Solver, Speed, TaskParams, VqaParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{DefaultTask, SubmitConfig};
use crate::error::{Result, WorkerError};

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
    /// Generate: the speed options of the job schema.
    #[serde(default)]
    pub speed: Option<Speed>,
    #[serde(default)]
    pub solver: Option<Solver>,
    #[serde(default)]
    pub guidance_interval: Option<[f32; 2]>,
    #[serde(default)]
    pub block_cache: Option<f32>,
}

/// One unit of work: its output name, its job (image not yet uploaded) and a local image.
#[derive(Debug, Clone)]
pub struct Item {
    pub name: String,
    pub job: Job,
    pub local_image: Option<Local>,
}

/// An input image that is uploaded before its job is published.
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    File(PathBuf),
    /// Bytes read from a shard, with the file extension they came under (`png`, `jpg`, …).
    Bytes {
        bytes: Vec<u8>,
        ext: String,
    },
}

pub(super) const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

pub(super) fn bad_input(where_: impl Into<String>, message: impl Into<String>) -> WorkerError {
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

pub(super) fn params_for(
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
            speed: line.speed,
            solver: line.solver,
            guidance_interval: line.guidance_interval,
            block_cache: line.block_cache,
        }),
        other => {
            return Err(bad_input(
                format!("{where_}: task"),
                format!("`{other}` is not caption, vqa or generate"),
            ))
        }
    })
}

/// Makes items from (name, params, local image): checks that names are unique (by a 64-bit hash
/// of each, so that a million names stay small) and derives their job ids.
pub(super) struct Push<'a> {
    batch: &'a str,
    seen: HashSet<u64>,
    emit: &'a mut dyn FnMut(Item) -> Result<()>,
    pub count: usize,
}

impl Push<'_> {
    pub fn push(&mut self, name: String, params: TaskParams, local: Option<Local>) -> Result<()> {
        let h = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&h[..8]);
        if !self.seen.insert(u64::from_le_bytes(first)) {
            return Err(bad_input(
                "input",
                format!("item `{name}` appears twice (ids must be unique)"),
            ));
        }
        self.count += 1;
        (self.emit)(Item {
            job: Job {
                job_id: job_id_for(self.batch, &name),
                task: params,
                deadline: None,
                submitted_at: None,
            },
            name,
            local_image: local,
        })
    }
}

/// Reads every item of the input in order, handing each to `emit` as it is read; returns how
/// many there were. A folder, a `.jsonl` manifest, or `.tar` / `.parquet` files (paths, globs,
/// brace ranges; the `datasets` feature).
pub fn read_items(
    cfg: &SubmitConfig,
    batch: &str,
    mut emit: impl FnMut(Item) -> Result<()>,
) -> Result<usize> {
    let input = &cfg.input;
    let mut push = Push {
        batch,
        seen: HashSet::new(),
        emit: &mut emit,
        count: 0,
    };
    let text = input.to_string_lossy();
    if input.is_dir() {
        folder_items(cfg, &mut push)?;
    } else if text.ends_with(".tar") || text.ends_with(".parquet") {
        #[cfg(feature = "datasets")]
        super::shards::shard_items(cfg, &mut push)?;
        #[cfg(not(feature = "datasets"))]
        return Err(bad_input(
            "input",
            "shards need ddit-worker built with the `datasets` feature",
        ));
    } else {
        std::fs::metadata(input)
            .map_err(|e| bad_input("input", format!("{}: {e}", input.display())))?;
        manifest_items(cfg, &mut push)?;
    }
    if push.count == 0 {
        return Err(bad_input(
            "input",
            format!("{} holds no items", input.display()),
        ));
    }
    Ok(push.count)
}

/// [`read_items`] on a thread of its own, handing items over a bounded channel: the submit loop
/// takes them as its window has room, so only a few are ever in memory.
pub fn spawn_items(cfg: SubmitConfig, batch: String) -> tokio::sync::mpsc::Receiver<Result<Item>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    std::thread::spawn(move || {
        let sent = read_items(&cfg, &batch, |it| {
            tx.blocking_send(Ok(it))
                .map_err(|_| WorkerError::Internal("submit stopped reading items".into()))
        });
        if let Err(e) = sent {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Every image file of the input folder, sorted by name.
fn folder_items(cfg: &SubmitConfig, push: &mut Push<'_>) -> Result<()> {
    let input = &cfg.input;
    {
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
            push.push(name, params, Some(Local::File(f)))?;
        }
    }
    Ok(())
}

/// The lines of a JSONL manifest; local image paths are relative to its folder.
fn manifest_items(cfg: &SubmitConfig, push: &mut Push<'_>) -> Result<()> {
    let input = &cfg.input;
    {
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
                    (Some(String::new()), Some(Local::File(p)))
                }
            };
            let name =
                l.id.clone()
                    .or_else(|| l.image.clone().filter(|i| !i.starts_with("data:")))
                    .unwrap_or_else(|| format!("line-{}", n + 1));
            let params = params_for(&task, image, &l, cfg.question.as_deref(), &where_)?;
            push.push(name, params, local)?;
        }
    }
    Ok(())
}

pub(super) fn content_type(ext: &str) -> &'static str {
    match ext.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        _ => "image/png",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::adapters::amqp::AmqpConfig;
    use crate::adapters::s3::S3Config;

    pub(crate) fn cfg(input: &Path, task: DefaultTask) -> SubmitConfig {
        SubmitConfig {
            input: input.to_path_buf(),
            image_column: None,
            key_column: None,
            allow_paths_outside_shard: false,
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
                ca_pem: None,
            },
            s3: S3Config {
                endpoint: None,
                region: "us-east-1".into(),
                bucket: "b".into(),
                prefix: "p".into(),
                path_style: true,
                input_buckets: vec![],
                max_input_bytes: 1 << 20,
                ca_pem: None,
            },
            redis_url: String::new(),
            redis_prefix: "ddit".into(),
            poll: Duration::from_millis(10),
            result_timeout: None,
            show_progress: false,
        }
    }

    fn load_items(cfg: &SubmitConfig, batch: &str) -> Result<Vec<Item>> {
        let mut v = Vec::new();
        read_items(cfg, batch, |it| {
            v.push(it);
            Ok(())
        })?;
        Ok(v)
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
                "{\"id\": \"p1\", \"task\": \"generate\", \"prompt\": \"a red circle\", \"seed\": 3, ",
                "\"speed\": \"fast\", \"solver\": \"dpmpp2m\", \"guidance_interval\": [0.25, 1], \"block_cache\": 0.5}\n",
                "{\"image\": \"s3://bucket/x.png\"}\n"
            ),
        )
        .expect("write");
        let items = load_items(&cfg(&m, DefaultTask::Caption), "t").expect("manifest");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].name, "a.jpg");
        assert!(items[0].local_image.is_some());
        let TaskParams::Generate(g) = &items[1].job.task else {
            panic!("{:?}", items[1].job.task)
        };
        assert_eq!(g.seed, Some(3));
        assert_eq!(
            (g.speed, g.solver),
            (Some(Speed::Fast), Some(Solver::Dpmpp2m))
        );
        assert_eq!(
            (g.guidance_interval, g.block_cache),
            (Some([0.25, 1.0]), Some(0.5))
        );
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
