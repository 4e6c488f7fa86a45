//! The local commands: one job (`generate`, `caption`, `vqa`) or a JSONL file of jobs (`batch`),
//! run in-process with no service.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddit_schemas::{
    CaptionParams, GenerateParams, Job, JobResult, Solver, Speed, Status, TaskParams, VqaParams,
};
use ddit_worker::adapters::local::memory::{Collect, VecSource};
use ddit_worker::adapters::local::{finished_ids, FileSource, FolderSink, ResultFile};
use ddit_worker::runner::{run_threads, ImageSink, Runner};
use ddit_worker::tasks::input::LocalFetcher;

use super::engine::EngineArgs;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, env = "DDIT_PROMPT")]
    prompt: String,
    #[arg(long, env = "DDIT_NEGATIVE_PROMPT")]
    negative_prompt: Option<String>,
    /// Sampling steps (default 28; 16 with `--speed fast`).
    #[arg(long, env = "DDIT_STEPS")]
    steps: Option<u32>,
    /// Classifier-free guidance scale (default 7.0).
    #[arg(long, env = "DDIT_GUIDANCE")]
    guidance: Option<f32>,
    #[arg(long, env = "DDIT_WIDTH")]
    width: Option<u32>,
    #[arg(long, env = "DDIT_HEIGHT")]
    height: Option<u32>,
    #[arg(long, env = "DDIT_SEED")]
    seed: Option<u64>,
    /// Images to generate; image i uses seed + i and is written as FILE-i.png for i > 0.
    #[arg(long, env = "DDIT_NUM_IMAGES")]
    num_images: Option<u32>,
    /// `exact` (default) or `fast`: a preset of `--steps` and the three options below
    /// (docs/fast-modes.md).
    #[arg(long, value_parser = snake_enum::<Speed>, env = "DDIT_SPEED")]
    speed: Option<Speed>,
    /// `euler` (default, the reference's) or `dpmpp2m` (second order, one pass per step).
    #[arg(long, value_parser = snake_enum::<Solver>, env = "DDIT_SOLVER")]
    solver: Option<Solver>,
    /// `LOW,HIGH`: guidance only while sigma (1 to 0) lies in it (default: every step).
    #[arg(long, value_parser = interval, env = "DDIT_GUIDANCE_INTERVAL")]
    guidance_interval: Option<[f32; 2]>,
    /// Skip the joint blocks after the first while its residual changed by less than this
    /// fraction since the last computed step (default 0: off).
    #[arg(long, env = "DDIT_BLOCK_CACHE")]
    block_cache: Option<f32>,
    /// Output PNG file.
    #[arg(long, env = "DDIT_OUT")]
    out: PathBuf,
}

impl From<&GenerateArgs> for GenerateParams {
    fn from(a: &GenerateArgs) -> Self {
        GenerateParams {
            prompt: a.prompt.clone(),
            negative_prompt: a.negative_prompt.clone(),
            steps: a.steps,
            guidance: a.guidance,
            width: a.width,
            height: a.height,
            seed: a.seed,
            num_images: a.num_images,
            speed: a.speed,
            solver: a.solver,
            guidance_interval: a.guidance_interval,
            block_cache: a.block_cache,
        }
    }
}

/// A job schema enum from its JSON name (`fast`, `dpmpp2m`).
fn snake_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

/// `LOW,HIGH`.
fn interval(s: &str) -> Result<[f32; 2], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |p: &str| p.parse::<f32>().map_err(|e| format!("{p:?}: {e}"));
    match parts[..] {
        [lo, hi] => Ok([num(lo)?, num(hi)?]),
        _ => Err(format!("{s:?} is not LOW,HIGH")),
    }
}

#[derive(Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Image file (PNG, JPEG or WebP).
    #[arg(long, env = "DDIT_IMAGE")]
    image: String,
    /// Sampling steps (default 64).
    #[arg(long, env = "DDIT_STEPS")]
    steps: Option<u32>,
    /// Canvas length in tokens (default: the model's caption length).
    #[arg(long, env = "DDIT_LENGTH")]
    length: Option<u32>,
    /// Text the caption must start with.
    #[arg(long, env = "DDIT_PROMPT")]
    prompt: Option<String>,
    #[arg(long, env = "DDIT_SEED")]
    seed: Option<u64>,
}

impl From<&CaptionArgs> for CaptionParams {
    fn from(a: &CaptionArgs) -> Self {
        CaptionParams {
            image: a.image.clone(),
            steps: a.steps,
            length: a.length,
            prompt: a.prompt.clone(),
            seed: a.seed,
        }
    }
}

#[derive(Args)]
pub struct VqaArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, env = "DDIT_IMAGE")]
    image: String,
    #[arg(long, env = "DDIT_QUESTION")]
    question: String,
    /// Sampling steps (default 32).
    #[arg(long, env = "DDIT_STEPS")]
    steps: Option<u32>,
    #[arg(long, env = "DDIT_SEED")]
    seed: Option<u64>,
}

impl From<&VqaArgs> for VqaParams {
    fn from(a: &VqaArgs) -> Self {
        VqaParams {
            image: a.image.clone(),
            question: a.question.clone(),
            steps: a.steps,
            seed: a.seed,
        }
    }
}

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Jobs, one JSON object per line (schemas/job.schema.json).
    #[arg(long, env = "DDIT_JOBS")]
    jobs: PathBuf,
    /// Output folder.
    #[arg(long, env = "DDIT_OUT")]
    out: PathBuf,
    /// Most rows (images or canvases) in one forward pass.
    #[arg(long, default_value_t = 8, env = "DDIT_MAX_BATCH")]
    max_batch: usize,
    /// Hide the progress bar even on a terminal.
    #[arg(long, env = "DDIT_NO_PROGRESS")]
    no_progress: bool,
}

/// Writes image i to `out` (i = 0) or `out-i.png`.
struct FileSink {
    out: PathBuf,
}

impl ImageSink for FileSink {
    fn put(
        &mut self,
        _job_id: &str,
        index: u32,
        png: &[u8],
        _seed: u64,
    ) -> ddit_worker::Result<String> {
        let path = if index == 0 {
            self.out.clone()
        } else {
            let stem = self
                .out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.out.with_file_name(format!("{stem}-{index}.png"))
        };
        std::fs::write(&path, png)
            .map_err(|e| ddit_worker::WorkerError::io(format!("writing {}", path.display()), e))?;
        Ok(path.display().to_string())
    }
}

/// Runs one job in-process and returns its result (an error unless it succeeded).
fn run_one(e: &EngineArgs, task: TaskParams, out: Option<PathBuf>) -> anyhow::Result<JobResult> {
    let (mut engines, codec) = e.load(8, Some(1))?;
    let engine = engines.first_mut().context("no engine loaded")?;
    let job = Job {
        job_id: "local".into(),
        task,
        deadline: None,
        submitted_at: None,
    };
    let mut sink = FileSink {
        out: out.unwrap_or_else(|| PathBuf::from("out.png")),
    };
    let mut hooks = Collect::default();
    Runner::new(engine, &codec, &LocalFetcher, e.runner(8)).run(
        &mut VecSource::new([job]),
        &mut sink,
        &mut hooks,
    );
    let r = hooks.results.pop().context("no result")?;
    if r.status != Status::Succeeded {
        let msg = r
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| format!("{:?}", r.status));
        bail!("{msg}");
    }
    Ok(r)
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let task = TaskParams::Generate(GenerateParams::from(&a));
    let r = run_one(&a.engine, task, Some(a.out))?;
    for o in r.outputs {
        println!(
            "{} {}x{} seed {} sha256 {}",
            o.uri, o.width, o.height, o.seed, o.sha256
        );
    }
    Ok(())
}

pub fn caption(a: CaptionArgs) -> anyhow::Result<()> {
    let r = run_one(
        &a.engine,
        TaskParams::Caption(CaptionParams::from(&a)),
        None,
    )?;
    println!("{}", r.text.unwrap_or_default());
    Ok(())
}

pub fn vqa(a: VqaArgs) -> anyhow::Result<()> {
    let r = run_one(&a.engine, TaskParams::Vqa(VqaParams::from(&a)), None)?;
    println!("{}", r.text.unwrap_or_default());
    Ok(())
}

pub fn batch(a: BatchArgs) -> anyhow::Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let results = out.join("results.jsonl");
    let done = finished_ids(&results)?;
    let mut source = FileSource::open(&a.jobs, &done)?;
    let (mut engines, codec) = a.engine.load(a.max_batch, Some(source.total))?;
    let mut file = ResultFile::open(&results, source.total, !a.no_progress)?;
    let mut sinks = vec![FolderSink { dir: out.clone() }; engines.len()];
    let start = std::time::Instant::now();
    run_threads(
        &mut engines,
        &codec,
        &LocalFetcher,
        &a.engine.runner(a.max_batch),
        &mut source,
        &mut sinks,
        &mut file,
    );
    file.finish();
    let c = file.counts;
    eprintln!(
        "{} jobs in {:.3}s: {} succeeded, {} failed, {} expired, {} skipped (already done or duplicate); results in {}",
        source.total,
        start.elapsed().as_secs_f64(),
        c.succeeded,
        c.failed,
        c.expired,
        source.skipped,
        results.display()
    );
    Ok(())
}
