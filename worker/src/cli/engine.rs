//! The model and engine flags every model command shares, and the one place they become an
//! [`EngineConfig`], a [`RunnerConfig`] and a loaded engine.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ddit_schemas::Manifest;
use ddit_worker::engine::{
    parse_bytes, parse_providers, ArenaExtend, ConvSearch, CudaOptions, Engine, EngineConfig,
    Package, Provider, TensorRtOptions,
};
use ddit_worker::image_io::ImageLimits;
use ddit_worker::runner::{LatentMode, RunnerConfig};
use ddit_worker::text::TextCodec;

#[derive(Clone, Copy, ValueEnum)]
pub enum CaptionLatent {
    Sample,
    Mean,
}

/// Model and engine settings shared by every command.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Model package folder (written by `ddit-export convert`).
    #[arg(long, env = "DDIT_MODEL")]
    pub model: PathBuf,
    /// Execution providers in order of preference: cpu, cuda[:DEVICE], tensorrt[:DEVICE].
    /// A requested GPU provider that cannot register is an error, never a silent CPU run.
    #[arg(long, default_value = "cpu", env = "DDIT_PROVIDERS")]
    providers: String,
    /// CPU threads for inference in all: `--inference-threads` runners of `--intra-threads` each.
    #[arg(long, default_value_t = default_threads(), env = "DDIT_THREADS")]
    threads: usize,
    /// Runners, each on its own thread with its own ONNX Runtime sessions, taking jobs from the
    /// same source (`batch`, `eval`, `serve`). Default: on the CPU, for a model narrower than
    /// 512, one per `--intra-threads` share of `--threads` (at most one per job, and as many
    /// copies of the package as fit in half the available memory); otherwise 1.
    #[arg(long, env = "DDIT_INFERENCE_THREADS")]
    inference_threads: Option<usize>,
    /// Threads of ONNX Runtime's one intra-op pool, shared by every session of the process
    /// (default: `--threads` / `--inference-threads`).
    #[arg(long, env = "DDIT_INTRA_THREADS")]
    intra_threads: Option<usize>,
    /// Whether idle pool threads spin (busy-wait briefly) between parallel sections: faster
    /// under steady load; `false` saves CPU on a mostly idle host.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "DDIT_ORT_SPIN")]
    ort_spin: bool,
    /// Run each denoising step through I/O bindings: the step's tensors stay on the provider's
    /// device between segments, and only the velocity comes back (default: true with a GPU
    /// provider, false on the CPU, where it gives the same numbers and saves nothing).
    #[arg(long, action = clap::ArgAction::Set, env = "DDIT_IO_BINDING")]
    io_binding: Option<bool>,
    /// TensorRT: build fp16 engines for every segment but T5's (the text encoder, which
    /// overflows in fp16: its engines stay fp32).
    #[arg(long, env = "DDIT_TRT_FP16")]
    trt_fp16: bool,
    /// TensorRT: engine and timing cache root (a subfolder per model hash).
    #[arg(long, env = "DDIT_TRT_CACHE_DIR")]
    trt_cache_dir: Option<PathBuf>,
    /// CUDA: most bytes the device arena may hold, e.g. `20GiB` (default: no limit).
    #[arg(long, env = "DDIT_GPU_MEM_LIMIT")]
    gpu_mem_limit: Option<String>,
    /// CUDA: how the device arena grows: next-power-of-two or same-as-requested.
    #[arg(
        long,
        default_value = "next-power-of-two",
        env = "DDIT_ARENA_EXTEND_STRATEGY"
    )]
    arena_extend_strategy: String,
    /// CUDA: how cuDNN picks convolution algorithms: exhaustive, heuristic or default.
    #[arg(
        long,
        default_value = "exhaustive",
        env = "DDIT_CUDNN_CONV_ALGO_SEARCH"
    )]
    cudnn_conv_algo_search: String,
    /// One device arena shared by every session of the process instead of one per segment
    /// (default: true with a GPU provider, false on the CPU).
    #[arg(long, action = clap::ArgAction::Set, env = "DDIT_SHARED_ALLOCATOR")]
    shared_allocator: Option<bool>,
    /// Fail at start-up when any node of a segment would fall back to the CPU, naming them
    /// (default: true with a GPU provider, false on the CPU).
    #[arg(long, action = clap::ArgAction::Set, env = "DDIT_STRICT_PLACEMENT")]
    strict_placement: Option<bool>,
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
    pub max_image_bytes: usize,
    /// Largest input image accepted, in pixels (width x height).
    #[arg(long, default_value_t = 40_000_000, env = "DDIT_MAX_IMAGE_PIXELS")]
    max_image_pixels: u64,
    /// Seconds a job may take from its delivery (`serve`; the other commands: from its start),
    /// time waiting in the prefetch buffer included; it then ends `expired` (checked when it
    /// starts and between steps; 0: no limit). Keep it under RabbitMQ's `consumer_timeout`
    /// (30 min by default), which counts from the delivery too, with room for the last step
    /// and the uploads: the default leaves 5 minutes.
    #[arg(long, default_value_t = 1500, env = "DDIT_JOB_TIMEOUT")]
    job_timeout: u64,
    #[command(flatten)]
    pub limits: super::limits::LimitArgs,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ddit_worker=debug`.
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    pub log: String,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Models at least this wide run one runner with every thread in its operators; narrower ones,
/// whose operators are too small to split across cores, one runner per core on the CPU
/// (docs/performance.md, "Runners per core for narrow models": faster on the 128-wide demo
/// model; the 768-wide one is as fast or faster with one runner).
const NARROW: u64 = 512;

/// How a process spends its threads: `inference` runners sharing one ONNX Runtime pool of
/// `intra` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    pub inference: usize,
    pub intra: usize,
}

/// What the default split depends on.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Every execution provider is the CPU.
    pub cpu_only: bool,
    pub hidden: u64,
    /// Bytes of the package's files: one runner's copy of the weights, roughly.
    pub package_bytes: u64,
    /// Available memory in bytes, when known.
    pub memory: Option<u64>,
    /// Jobs to run, when known (a queue: `None`).
    pub jobs: Option<usize>,
}

impl Threads {
    /// `threads` in all, with whatever the flags fixed; the rest from the workload.
    pub fn split(
        threads: usize,
        inference: Option<usize>,
        intra: Option<usize>,
        w: &Workload,
    ) -> Threads {
        let threads = threads.max(1);
        let inference = inference.unwrap_or_else(|| {
            if !w.cpu_only || w.hidden >= NARROW {
                return 1;
            }
            let mut n = threads / intra.unwrap_or(1).max(1);
            if let Some(m) = w.memory {
                n = n.min(usize::try_from(m / 2 / w.package_bytes.max(1)).unwrap_or(usize::MAX));
            }
            n.min(w.jobs.unwrap_or(usize::MAX))
        });
        let inference = inference.max(1);
        let intra = intra.unwrap_or(threads / inference).max(1);
        Threads { inference, intra }
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl EngineArgs {
    /// The package's manifest, read but not verified (the service verifies every file once).
    #[cfg(feature = "service")]
    pub fn read_manifest(&self) -> anyhow::Result<Manifest> {
        let path = self.model.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Manifest::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The thread split for `manifest`'s model and `jobs` jobs (`None`: a queue).
    pub fn threads(&self, manifest: &Manifest, jobs: Option<usize>) -> anyhow::Result<Threads> {
        let providers = parse_providers(&self.providers)?;
        let w = Workload {
            cpu_only: providers.iter().all(|p| matches!(p, Provider::Cpu)),
            hidden: manifest.values.hidden_size,
            package_bytes: manifest.files().map(|f| f.bytes).sum(),
            memory: available_memory(),
            jobs,
        };
        let t = Threads::split(self.threads, self.inference_threads, self.intra_threads, &w);
        tracing::info!(
            inference_threads = t.inference,
            intra_threads = t.intra,
            "threads"
        );
        Ok(t)
    }

    /// The engine's settings for a runner of `max_batch` rows per forward pass, on a pool of
    /// `intra` threads.
    pub fn config(&self, max_batch: usize, intra: usize) -> anyhow::Result<EngineConfig> {
        let providers = parse_providers(&self.providers)?;
        let gpu = providers.iter().any(|p| *p != Provider::Cpu);
        Ok(EngineConfig {
            providers,
            intra_threads: intra,
            spin: self.ort_spin,
            io_binding: self.io_binding.unwrap_or(gpu),
            tensorrt: TensorRtOptions {
                fp16: self.trt_fp16,
                cache_dir: self.trt_cache_dir.clone(),
                max_batch: max_batch.max(1),
                max_side: self.limits.limits().max_side,
            },
            cuda: CudaOptions {
                mem_limit: self
                    .gpu_mem_limit
                    .as_deref()
                    .map(|s| parse_bytes("gpu-mem-limit", s))
                    .transpose()?,
                arena_extend: ArenaExtend::parse(&self.arena_extend_strategy)?,
                conv_search: ConvSearch::parse(&self.cudnn_conv_algo_search)?,
            },
            shared_allocator: self.shared_allocator,
            strict_placement: self.strict_placement,
            ort_library: self.ort_library.clone(),
        })
    }

    /// The runner's settings with `max_batch` rows per forward pass.
    pub fn runner(&self, max_batch: usize) -> RunnerConfig {
        // TensorRT's VAE decoder profile holds one image (engine/profiles.rs).
        let trt = parse_providers(&self.providers)
            .is_ok_and(|ps| ps.iter().any(|p| matches!(p, Provider::TensorRt { .. })));
        RunnerConfig {
            max_batch: max_batch.max(1),
            decode_batch: if trt { 1 } else { max_batch.max(1) },
            decode_pixels: ddit_worker::runner::DECODE_PIXELS,
            caption_latent: match self.caption_latent {
                CaptionLatent::Sample => LatentMode::Sample,
                CaptionLatent::Mean => LatentMode::Mean,
            },
            image_limits: ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
                ..ImageLimits::default()
            },
            limits: self.limits.limits(),
            job_timeout: (self.job_timeout > 0)
                .then(|| std::time::Duration::from_secs(self.job_timeout)),
            progress_every: std::time::Duration::ZERO,
            batch_window: std::time::Duration::ZERO,
        }
    }

    /// Logging, then the verified package, one engine per runner for `jobs` jobs (`None`: as
    /// many as the split allows; loaded side by side) and the text codec.
    pub fn load(
        &self,
        max_batch: usize,
        jobs: Option<usize>,
    ) -> anyhow::Result<(Vec<Engine>, TextCodec)> {
        super::init_logging(&self.log);
        let what = || format!("loading model package {}", self.model.display());
        let pkg = Package::open(&self.model).with_context(what)?;
        let t = self.threads(&pkg.manifest, jobs)?;
        let cfg = self.config(max_batch, t.intra)?;
        let engines = std::thread::scope(|s| {
            let loads: Vec<_> = (0..t.inference)
                .map(|_| s.spawn(|| Engine::load(&pkg, &cfg)))
                .collect();
            loads
                .into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r.with_context(what),
                    Err(_) => Err(anyhow::anyhow!("{}: the loading thread panicked", what())),
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let first = engines.first().context("no engine loaded")?;
        let codec = TextCodec::for_package(&first.tokenizer_path, &pkg.manifest.values)?;
        Ok((engines, codec))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::{EngineArgs, Threads, Workload};

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn args(flags: &[&str]) -> EngineArgs {
        let argv = ["ddit-worker", "--model", "pkg"].iter().chain(flags);
        Cmd::try_parse_from(argv).unwrap().engine
    }

    fn io_binding(flags: &[&str]) -> bool {
        args(flags).config(8, 1).unwrap().io_binding
    }

    #[test]
    fn io_binding_is_on_with_a_gpu_provider_unless_turned_off() {
        assert!(!io_binding(&[]));
        assert!(!io_binding(&["--providers", "cpu"]));
        assert!(io_binding(&["--providers", "cuda,cpu"]));
        assert!(io_binding(&["--providers", "tensorrt:1,cuda:1,cpu"]));
        assert!(!io_binding(&[
            "--providers",
            "cuda",
            "--io-binding",
            "false"
        ]));
        assert!(io_binding(&["--providers", "cpu", "--io-binding", "true"]));
    }

    #[test]
    fn tensorrt_decodes_one_image_a_pass() {
        let decode = |flags: &[&str]| args(flags).runner(8).decode_batch;
        assert_eq!(decode(&[]), 8);
        assert_eq!(decode(&["--providers", "cuda,cpu"]), 8);
        assert_eq!(decode(&["--providers", "tensorrt,cuda,cpu"]), 1);
    }

    const GIB: u64 = 1 << 30;

    fn narrow() -> Workload {
        Workload {
            cpu_only: true,
            hidden: 128,
            package_bytes: 30 << 20,
            memory: Some(20 * GIB),
            jobs: None,
        }
    }

    fn split(
        threads: usize,
        inference: Option<usize>,
        intra: Option<usize>,
        w: Workload,
    ) -> (usize, usize) {
        let t = Threads::split(threads, inference, intra, &w);
        (t.inference, t.intra)
    }

    #[test]
    fn a_narrow_model_on_the_cpu_gets_a_runner_per_core() {
        assert_eq!(split(4, None, None, narrow()), (4, 1));
        // An explicit pool size divides the threads.
        assert_eq!(split(4, None, Some(2), narrow()), (2, 2));
        assert_eq!(split(1, None, Some(2), narrow()), (1, 2));
        // No more runners than jobs, and the rest of the threads go to their pool.
        let few = Workload {
            jobs: Some(1),
            ..narrow()
        };
        assert_eq!(split(4, None, None, few), (1, 4));
        // No more copies of the weights than fit in half the memory.
        let big = Workload {
            package_bytes: 3 * GIB,
            ..narrow()
        };
        assert_eq!(split(8, None, None, big), (3, 2));
    }

    #[test]
    fn wide_models_and_gpus_get_one_runner_with_every_thread() {
        let wide = Workload {
            hidden: 768,
            ..narrow()
        };
        assert_eq!(split(4, None, None, wide), (1, 4));
        let gpu = Workload {
            cpu_only: false,
            ..narrow()
        };
        assert_eq!(split(4, None, None, gpu), (1, 4));
        // Flags win.
        assert_eq!(split(4, Some(2), None, wide), (2, 2));
        assert_eq!(split(4, Some(3), Some(3), narrow()), (3, 3));
        assert_eq!(split(0, Some(0), Some(0), narrow()), (1, 1));
    }
}
