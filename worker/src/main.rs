//! `ddit-worker`: local commands (generate, caption, vqa, batch). Every flag also reads
//! `DDIT_<FLAG>` from the environment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ddit_schemas::{CaptionParams, GenerateParams, Job, JobResult, Status, TaskParams, VqaParams};
use ddit_worker::engine::{parse_providers, Engine, EngineConfig, TensorRtOptions};
use ddit_worker::image_io::ImageLimits;
use ddit_worker::local::{finished_ids, FileSource, FolderSink, ResultFile};
use ddit_worker::runner::{
    Hooks, ImageSink, Incoming, JobSource, LatentMode, Runner, RunnerConfig,
};
use ddit_worker::service::s3::S3Config;
use ddit_worker::tasks::input::LocalFetcher;
use ddit_worker::text::TextCodec;

#[derive(Parser)]
#[command(
    name = "ddit-worker",
    version,
    about = "Serve D-DiT: text to image, captioning and VQA"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum CaptionLatent {
    Sample,
    Mean,
}

/// Model and engine settings shared by every command.
#[derive(Args, Clone)]
struct EngineArgs {
    /// Model package folder (written by `ddit-export convert`).
    #[arg(long, env = "DDIT_MODEL")]
    model: PathBuf,
    /// Execution providers in order of preference: cpu, cuda[:DEVICE], tensorrt[:DEVICE].
    /// A requested GPU provider that cannot register is an error, never a silent CPU run.
    #[arg(long, default_value = "cpu", env = "DDIT_PROVIDERS")]
    providers: String,
    /// Intra-op threads per inference session.
    #[arg(long, default_value_t = default_threads(), env = "DDIT_INTRA_THREADS")]
    intra_threads: usize,
    /// TensorRT: build fp16 engines.
    #[arg(long, env = "DDIT_TRT_FP16")]
    trt_fp16: bool,
    /// TensorRT: engine and timing cache root (a subfolder per model hash).
    #[arg(long, env = "DDIT_TRT_CACHE_DIR")]
    trt_cache_dir: Option<PathBuf>,
    /// Path of libonnxruntime.so (else ORT_DYLIB_PATH, else the standard places).
    #[arg(long, env = "DDIT_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Captioning latent: sample the VAE posterior (D-DiT) or take its mean.
    #[arg(
        long,
        value_enum,
        default_value = "sample",
        env = "DDIT_CAPTION_LATENT"
    )]
    caption_latent: CaptionLatent,
    /// Largest input image file accepted, in bytes.
    #[arg(long, default_value_t = 32 << 20, env = "DDIT_MAX_IMAGE_BYTES")]
    max_image_bytes: usize,
    /// Largest input image accepted, in pixels (width x height).
    #[arg(long, default_value_t = 40_000_000, env = "DDIT_MAX_IMAGE_PIXELS")]
    max_image_pixels: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ddit_worker=debug`.
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    log: String,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[derive(Subcommand)]
enum Cmd {
    /// Text to image: writes a PNG.
    Generate {
        #[command(flatten)]
        engine: EngineArgs,
        #[arg(long, env = "DDIT_PROMPT")]
        prompt: String,
        #[arg(long, env = "DDIT_NEGATIVE_PROMPT")]
        negative_prompt: Option<String>,
        /// Sampling steps (default 28).
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
        /// Output PNG file.
        #[arg(long, env = "DDIT_OUT")]
        out: PathBuf,
    },
    /// Image to text: prints the caption.
    Caption {
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
    },
    /// Visual question answering: prints the answer.
    Vqa {
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
    },
    /// Scores a model on an evaluation set.
    Eval {
        #[command(subcommand)]
        what: EvalCmd,
    },
    /// The queue worker: jobs from AMQP, images to S3, results and progress to Redis.
    Serve {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
    /// Bulk client: uploads a folder or JSONL manifest of inputs, publishes their jobs (publisher
    /// confirms, at most --ahead unanswered), collects results from Redis into one JSONL. Resumable.
    Submit(Box<SubmitArgs>),
    /// Downloads a model package from S3 and verifies every file against its manifest (init containers).
    FetchModel {
        /// s3://bucket/prefix holding manifest.json and the files it lists.
        #[arg(long = "from", env = "DDIT_MODEL_URL")]
        from: String,
        /// Destination folder (replaced only once the new package verifies).
        #[arg(long, env = "DDIT_MODEL")]
        out: PathBuf,
        #[command(flatten)]
        s3: S3ConnArgs,
    },
    /// Verifies a model package folder and uploads it to S3 (manifest last).
    PushModel {
        /// The package folder (made by ddit-export).
        #[arg(long, env = "DDIT_MODEL")]
        model: PathBuf,
        /// s3://bucket/prefix to upload to.
        #[arg(long, env = "DDIT_MODEL_URL")]
        to: String,
        #[command(flatten)]
        s3: S3ConnArgs,
    },
    /// HTTP GET; exits 0 on a 2xx answer (container health checks).
    Probe {
        #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
        url: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Runs a JSONL file of jobs; writes OUT/results.jsonl and OUT/{job_id}/{n}.png. Resumable.
    Batch {
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
    },
}

#[derive(Subcommand)]
enum EvalCmd {
    /// ShapesEval: caption exact match and attributes, VQA accuracy, generation (scene checker).
    Shapes {
        #[command(flatten)]
        engine: EngineArgs,
        /// The set folder (scenes.jsonl and PNGs), e.g. models/shapes-eval.
        #[arg(long, env = "DDIT_SET")]
        set: PathBuf,
        /// Only the first N scenes.
        #[arg(long, env = "DDIT_LIMIT")]
        limit: Option<usize>,
        /// Where the contact sheet of generated images and predictions.jsonl (every scene's
        /// caption, answers and generation verdict next to the references) go.
        #[arg(long, default_value = ".ddit/eval", env = "DDIT_OUT")]
        out: PathBuf,
        #[arg(long, default_value_t = 16, env = "DDIT_MAX_BATCH")]
        max_batch: usize,
        /// Base seed (scene i uses seed + i).
        #[arg(long, default_value_t = 0, env = "DDIT_SEED")]
        seed: u64,
    },
    /// Scores images generated elsewhere (`{images}/gen_{id:04}.png`, e.g. by the PyTorch
    /// reference sampler) with the same scene checker as `eval shapes`.
    ShapesImages {
        #[arg(long, env = "DDIT_SET")]
        set: PathBuf,
        #[arg(long, env = "DDIT_IMAGES")]
        images: PathBuf,
        #[arg(long, env = "DDIT_LIMIT")]
        limit: Option<usize>,
    },
}

/// The broker and queue (shared by `serve` and `submit`; both declare the queue identically).
#[derive(Args, Clone)]
struct AmqpArgs {
    /// AMQP URL (the password is never logged).
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "DDIT_AMQP_URL",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Work queue (a durable quorum queue, declared if absent).
    #[arg(long, default_value = "ddit.jobs", env = "DDIT_QUEUE")]
    queue: String,
    /// Deliveries after which a message is dead-lettered (quorum `x-delivery-limit`).
    #[arg(long, default_value_t = 5, env = "DDIT_DELIVERY_LIMIT")]
    delivery_limit: u32,
    /// Dead-letter exchange (fanout); its queue is `{exchange}.queue` unless set.
    #[arg(long, default_value = "ddit.dlx", env = "DDIT_DEAD_LETTER_EXCHANGE")]
    dead_letter_exchange: String,
    #[arg(long, env = "DDIT_DEAD_LETTER_QUEUE")]
    dead_letter_queue: Option<String>,
}

impl AmqpArgs {
    fn config(self, prefetch: u16) -> ddit_worker::service::amqp::AmqpConfig {
        ddit_worker::service::amqp::AmqpConfig {
            url: self.amqp_url,
            queue: self.queue,
            prefetch: prefetch.max(1),
            delivery_limit: self.delivery_limit.max(1),
            dead_letter_queue: self
                .dead_letter_queue
                .unwrap_or_else(|| format!("{}.queue", self.dead_letter_exchange)),
            dead_letter_exchange: self.dead_letter_exchange,
        }
    }
}

/// Where S3 is. Credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); they are never logged.
#[derive(Args, Clone)]
struct S3ConnArgs {
    /// S3 endpoint, e.g. http://127.0.0.1:3900 (unset: AWS).
    #[arg(long, env = "DDIT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1", env = "DDIT_S3_REGION")]
    s3_region: String,
    /// Path-style addressing (local S3 servers).
    #[arg(long, env = "DDIT_S3_PATH_STYLE")]
    s3_path_style: bool,
}

impl S3ConnArgs {
    fn config(self, bucket: String, prefix: String, max_input_bytes: usize) -> S3Config {
        S3Config {
            endpoint: self.s3_endpoint,
            region: self.s3_region,
            bucket,
            prefix,
            path_style: self.s3_path_style,
            input_buckets: vec![],
            max_input_bytes,
        }
    }
}

/// The bucket and key prefix of a fleet.
#[derive(Args, Clone)]
struct S3Args {
    #[command(flatten)]
    conn: S3ConnArgs,
    /// Bucket for generated images (and, for `submit`, uploaded inputs).
    #[arg(long, env = "DDIT_S3_BUCKET")]
    s3_bucket: String,
    /// Key prefix: images go to `{prefix}/{job_id}/{n}.png`, submitted inputs to
    /// `{prefix}/inputs/{batch}/`.
    #[arg(long, default_value = "ddit", env = "DDIT_S3_PREFIX")]
    s3_prefix: String,
}

/// Where results live.
#[derive(Args, Clone)]
struct RedisArgs {
    /// Redis URL.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        env = "DDIT_REDIS_URL",
        hide_env_values = true
    )]
    redis_url: String,
    /// Redis key prefix.
    #[arg(long, default_value = "ddit", env = "DDIT_REDIS_PREFIX")]
    redis_prefix: String,
}

/// Settings of `serve`.
#[derive(Args, Clone)]
struct ServeArgs {
    #[command(flatten)]
    amqp: AmqpArgs,
    /// Unacknowledged deliveries per worker.
    #[arg(long, default_value_t = 8, env = "DDIT_PREFETCH")]
    prefetch: u16,
    #[command(flatten)]
    s3: S3Args,
    /// Extra buckets input images may be read from (comma-separated; the output bucket always may).
    #[arg(long, value_delimiter = ',', env = "DDIT_S3_INPUT_BUCKETS")]
    s3_input_buckets: Vec<String>,
    #[command(flatten)]
    redis: RedisArgs,
    /// Seconds a result is kept in Redis.
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "DDIT_RESULT_TTL")]
    result_ttl: u64,
    /// Inference threads (each with its own sessions).
    #[arg(long, default_value_t = 1, env = "DDIT_INFERENCE_THREADS")]
    inference_threads: usize,
    /// Most rows in one forward pass.
    #[arg(long, default_value_t = 8, env = "DDIT_MAX_BATCH")]
    max_batch: usize,
    /// Seconds allowed to finish in-flight jobs after SIGTERM/SIGINT; the rest are requeued.
    #[arg(long, default_value_t = 30, env = "DDIT_SHUTDOWN_DEADLINE")]
    shutdown_deadline: u64,
    /// HTTP address for /healthz, /readyz, /metrics.
    #[arg(long, default_value = "0.0.0.0:9090", env = "DDIT_LISTEN")]
    listen: std::net::SocketAddr,
    /// Least milliseconds between two progress events of one job.
    #[arg(long, default_value_t = 500, env = "DDIT_PROGRESS_INTERVAL_MS")]
    progress_interval_ms: u64,
    /// OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces (unset: no export).
    #[arg(long, env = "DDIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Name of this worker (AMQP connection name, consumer tag).
    #[arg(long, default_value = "ddit-worker", env = "DDIT_WORKER_NAME")]
    worker_name: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum SubmitTask {
    Caption,
    Vqa,
    Generate,
}

/// Settings of `submit`.
#[derive(Args, Clone)]
struct SubmitArgs {
    /// A folder of images (.png, .jpg, .webp) or a JSONL manifest (one item per line: `image`,
    /// `question`, `prompt`, `task`, `id`, and optional `steps`, `seed`, ...).
    #[arg(long, env = "DDIT_INPUT")]
    input: PathBuf,
    /// Task of items that name none.
    #[arg(long, value_enum, default_value = "caption", env = "DDIT_TASK")]
    task: SubmitTask,
    /// Question of VQA items that carry none.
    #[arg(long, env = "DDIT_QUESTION")]
    question: Option<String>,
    /// Output JSONL (one line per item: `item` plus the result). Its journal is `{out}.submitted`.
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
    s3: S3Args,
    #[command(flatten)]
    redis: RedisArgs,
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    log: String,
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn load(e: &EngineArgs) -> anyhow::Result<(Engine, TextCodec, RunnerConfig)> {
    init_logging(&e.log);
    let cfg = EngineConfig {
        providers: parse_providers(&e.providers)?,
        intra_threads: e.intra_threads,
        tensorrt: TensorRtOptions {
            fp16: e.trt_fp16,
            cache_dir: e.trt_cache_dir.clone(),
        },
        ort_library: e.ort_library.clone(),
    };
    let engine = Engine::load(&e.model, &cfg)
        .with_context(|| format!("loading model package {}", e.model.display()))?;
    let codec = TextCodec::for_package(&engine.tokenizer_path, &engine.manifest.values)?;
    let rc = runner_config(e, 8);
    Ok((engine, codec, rc))
}

fn runner_config(e: &EngineArgs, max_batch: usize) -> RunnerConfig {
    RunnerConfig {
        max_batch: max_batch.max(1),
        caption_latent: match e.caption_latent {
            CaptionLatent::Sample => LatentMode::Sample,
            CaptionLatent::Mean => LatentMode::Mean,
        },
        image_limits: ImageLimits {
            max_bytes: e.max_image_bytes,
            max_pixels: e.max_image_pixels,
            ..ImageLimits::default()
        },
    }
}

/// Runs one job in-process and returns its result.
struct One {
    job: Option<Job>,
    result: Option<JobResult>,
}
impl JobSource for One {
    fn next_job(&mut self, _wait: bool) -> Option<Incoming> {
        self.job.take().map(|j| Incoming::Job(Box::new(j)))
    }
}
impl Hooks for One {
    fn result(&mut self, r: JobResult) {
        self.result = Some(r);
    }
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

fn run_one(e: &EngineArgs, task: TaskParams, out: Option<PathBuf>) -> anyhow::Result<JobResult> {
    let (mut engine, codec, rc) = load(e)?;
    let job = Job {
        job_id: "local".into(),
        task,
        deadline: None,
        submitted_at: None,
    };
    let mut one = One {
        job: Some(job),
        result: None,
    };
    let mut sink = FileSink {
        out: out.unwrap_or_else(|| PathBuf::from("out.png")),
    };
    let mut src = One {
        job: one.job.take(),
        result: None,
    };
    Runner::new(&mut engine, &codec, &LocalFetcher, rc).run(&mut src, &mut sink, &mut one);
    let r = one.result.context("no result")?;
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve { engine, serve } => serve_cmd(engine, *serve)?,
        Cmd::Submit(args) => submit_cmd(*args)?,
        Cmd::FetchModel { from, out, s3 } => {
            use ddit_worker::client::model_store::{fetch, Fetched};
            let (url, dest) = (from.clone(), out.clone());
            match with_model_store(&from, s3, |st| async move { fetch(&st, &url, &dest).await })? {
                Fetched::Downloaded { files, hash } => eprintln!(
                    "fetched {from} into {}: {files} files verified, model hash {hash}",
                    out.display()
                ),
                Fetched::AlreadyPresent { hash } => eprintln!(
                    "{} already holds model {hash}; nothing downloaded",
                    out.display()
                ),
            }
        }
        Cmd::PushModel { model, to, s3 } => {
            let (url, dir) = (to.clone(), model.clone());
            let hash = with_model_store(&to, s3, |st| async move {
                ddit_worker::client::model_store::push(&st, &dir, &url).await
            })?;
            eprintln!("pushed {} to {to}: model hash {hash}", model.display());
        }
        Cmd::Probe { url, timeout_ms } => {
            let (code, body) = ddit_worker::client::probe::get(
                &url,
                std::time::Duration::from_millis(timeout_ms.max(1)),
            )?;
            if !(200..300).contains(&code) {
                bail!("{url}: HTTP {code} {}", body.lines().next().unwrap_or(""));
            }
        }
        Cmd::Eval {
            what:
                EvalCmd::Shapes {
                    engine,
                    set,
                    limit,
                    out,
                    max_batch,
                    seed,
                },
        } => {
            let (mut eng, codec, mut rc) = load(&engine)?;
            rc.max_batch = max_batch.max(1);
            let start = std::time::Instant::now();
            let report = ddit_worker::eval::run(
                &mut eng,
                &codec,
                &set,
                ddit_worker::eval::EvalOptions {
                    limit,
                    runner: rc,
                    seed,
                },
            )?;
            let (sheet, legend) = ddit_worker::eval::write_sheet(&out, &report.images)?;
            let preds = ddit_worker::eval::write_predictions(&out, &report.predictions)?;
            eprintln!(
                "evaluated in {:.1}s; contact sheet {} (prompts in {}); predictions {}",
                start.elapsed().as_secs_f64(),
                sheet.display(),
                legend.display(),
                preds.display()
            );
            print!("{}", report.scores.table());
        }
        Cmd::Eval {
            what: EvalCmd::ShapesImages { set, images, limit },
        } => {
            let sc = ddit_worker::eval::score_generated(&set, &images, limit)?;
            println!(
                "generation on {} scenes: all {:.3} count {:.3} colour {:.3} shape {:.3} position {:.3}",
                sc.scenes, sc.generation, sc.gen_count, sc.gen_colour, sc.gen_shape, sc.gen_position
            );
            println!("generation={:.3}", sc.generation);
        }
        Cmd::Generate {
            engine,
            prompt,
            negative_prompt,
            steps,
            guidance,
            width,
            height,
            seed,
            num_images,
            out,
        } => {
            let p = GenerateParams {
                prompt,
                negative_prompt,
                steps,
                guidance,
                width,
                height,
                seed,
                num_images,
            };
            let r = run_one(&engine, TaskParams::Generate(p), Some(out))?;
            for o in r.outputs {
                println!(
                    "{} {}x{} seed {} sha256 {}",
                    o.uri, o.width, o.height, o.seed, o.sha256
                );
            }
        }
        Cmd::Caption {
            engine,
            image,
            steps,
            length,
            prompt,
            seed,
        } => {
            let r = run_one(
                &engine,
                TaskParams::Caption(CaptionParams {
                    image,
                    steps,
                    length,
                    prompt,
                    seed,
                }),
                None,
            )?;
            println!("{}", r.text.unwrap_or_default());
        }
        Cmd::Vqa {
            engine,
            image,
            question,
            steps,
            seed,
        } => {
            let r = run_one(
                &engine,
                TaskParams::Vqa(VqaParams {
                    image,
                    question,
                    steps,
                    seed,
                }),
                None,
            )?;
            println!("{}", r.text.unwrap_or_default());
        }
        Cmd::Batch {
            engine,
            jobs,
            out,
            max_batch,
            no_progress,
        } => {
            if max_batch == 0 {
                bail!("--max-batch must be at least 1");
            }
            let (mut eng, codec, mut rc) = load(&engine)?;
            rc.max_batch = max_batch;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let results = out.join("results.jsonl");
            let done = finished_ids(&results)?;
            let mut source = FileSource::open(&jobs, &done)?;
            let mut file = ResultFile::open(&results, source.total, !no_progress)?;
            let mut sink = FolderSink { dir: out.clone() };
            let start = std::time::Instant::now();
            Runner::new(&mut eng, &codec, &LocalFetcher, rc).run(&mut source, &mut sink, &mut file);
            file.finish();
            let c = file.counts;
            eprintln!(
                "{} jobs in {:.1}s: {} succeeded, {} failed, {} expired, {} skipped (already done or duplicate); results in {}",
                source.total,
                start.elapsed().as_secs_f64(),
                c.succeeded,
                c.failed,
                c.expired,
                source.skipped,
                results.display()
            );
        }
    }
    Ok(())
}

fn engine_config(e: &EngineArgs) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        providers: parse_providers(&e.providers)?,
        intra_threads: e.intra_threads,
        tensorrt: TensorRtOptions {
            fp16: e.trt_fp16,
            cache_dir: e.trt_cache_dir.clone(),
        },
        ort_library: e.ort_library.clone(),
    })
}

fn serve_cmd(e: EngineArgs, s: ServeArgs) -> anyhow::Result<()> {
    use ddit_worker::service::{self, redis::RedisConfig, ServeConfig};
    let mut telemetry =
        service::telemetry::init_telemetry(&e.log, s.otlp_endpoint.as_deref(), &s.worker_name)?;
    let cfg = ServeConfig {
        amqp: s.amqp.config(s.prefetch),
        s3: S3Config {
            input_buckets: s.s3_input_buckets,
            ..s.s3
                .conn
                .config(s.s3.s3_bucket, s.s3.s3_prefix, e.max_image_bytes)
        },
        redis: RedisConfig {
            url: s.redis.redis_url,
            prefix: s.redis.redis_prefix,
            result_ttl_secs: s.result_ttl,
        },
        model: e.model.clone(),
        engine: engine_config(&e)?,
        runner: runner_config(&e, s.max_batch),
        inference_threads: s.inference_threads.max(1),
        shutdown_deadline: std::time::Duration::from_secs(s.shutdown_deadline),
        listen: s.listen,
        progress_interval: std::time::Duration::from_millis(s.progress_interval_ms),
        name: s.worker_name,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let res = rt.block_on(service::serve(cfg, shutdown_signal()));
    telemetry.shutdown();
    // Inference threads may still be finishing a job that was requeued; the process ends here.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res.map_err(Into::into)
}

/// Runs `f` with an S3 client for the bucket of `url` (`s3://bucket/prefix`).
fn with_model_store<T, F, Fut>(url: &str, s3: S3ConnArgs, f: F) -> anyhow::Result<T>
where
    F: FnOnce(ddit_worker::service::s3::S3Store) -> Fut,
    Fut: std::future::Future<Output = ddit_worker::Result<T>>,
{
    init_logging("warn");
    let (bucket, _) = ddit_worker::client::model_store::parse_s3_url(url)?;
    let out = client_runtime()?.block_on(async {
        let store =
            ddit_worker::service::s3::S3Store::connect(s3.config(bucket, String::new(), 0)).await?;
        f(store).await
    })?;
    Ok(out)
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn submit_cmd(a: SubmitArgs) -> anyhow::Result<()> {
    use ddit_worker::client::submit::{self, DefaultTask, SubmitConfig};
    init_logging(&a.log);
    let cfg = SubmitConfig {
        input: a.input,
        task: match a.task {
            SubmitTask::Caption => DefaultTask::Caption,
            SubmitTask::Vqa => DefaultTask::Vqa,
            SubmitTask::Generate => DefaultTask::Generate,
        },
        question: a.question,
        out: a.out,
        ahead: a.ahead.max(1),
        batch: a.batch,
        amqp: a.amqp.config(1),
        s3: a.s3.conn.config(a.s3.s3_bucket, a.s3.s3_prefix, 0),
        redis_url: a.redis.redis_url,
        redis_prefix: a.redis.redis_prefix,
        poll: std::time::Duration::from_millis(a.poll_ms.max(10)),
        result_timeout: (a.result_timeout > 0)
            .then(|| std::time::Duration::from_secs(a.result_timeout)),
        show_progress: !a.no_progress,
    };
    let out = cfg.out.clone();
    let summary = client_runtime()?.block_on(submit::run(cfg))?;
    eprintln!(
        "submit: {} items, {} done before, {} recovered from redis, {} resumed, {} published; {} succeeded, {} failed -> {}",
        summary.items,
        summary.done_before,
        summary.recovered,
        summary.resumed,
        summary.published,
        summary.succeeded,
        summary.failed,
        out.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
