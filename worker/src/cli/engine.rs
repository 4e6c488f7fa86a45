//! The model and engine flags every model command shares, and the one place they become an
//! [`EngineConfig`], a [`RunnerConfig`] and a loaded engine.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ddit_worker::engine::{parse_providers, Engine, EngineConfig, Package, TensorRtOptions};
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
    /// Threads of ONNX Runtime's one intra-op pool, shared by every session of the process.
    #[arg(long, default_value_t = default_threads(), env = "DDIT_INTRA_THREADS")]
    intra_threads: usize,
    /// Whether idle pool threads spin (busy-wait briefly) between parallel sections: faster
    /// under steady load; `false` saves CPU on a mostly idle host.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "DDIT_ORT_SPIN")]
    ort_spin: bool,
    /// Run each denoising step through I/O bindings: the step's tensors stay on the provider's
    /// device between segments, and only the velocity comes back (for GPU providers).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "DDIT_IO_BINDING")]
    io_binding: bool,
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
    pub max_image_bytes: usize,
    /// Largest input image accepted, in pixels (width x height).
    #[arg(long, default_value_t = 40_000_000, env = "DDIT_MAX_IMAGE_PIXELS")]
    max_image_pixels: u64,
    /// Seconds a job may run once started; it then ends `expired` (checked between steps;
    /// 0: no limit). Keep it under RabbitMQ's `consumer_timeout` (30 min by default).
    #[arg(long, default_value_t = 1500, env = "DDIT_JOB_TIMEOUT")]
    job_timeout: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ddit_worker=debug`.
    #[arg(long, default_value = "warn", env = "DDIT_LOG")]
    pub log: String,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl EngineArgs {
    /// The engine's settings for a runner of `max_batch` rows per forward pass.
    pub fn config(&self, max_batch: usize) -> anyhow::Result<EngineConfig> {
        Ok(EngineConfig {
            providers: parse_providers(&self.providers)?,
            intra_threads: self.intra_threads,
            spin: self.ort_spin,
            io_binding: self.io_binding,
            tensorrt: TensorRtOptions {
                fp16: self.trt_fp16,
                cache_dir: self.trt_cache_dir.clone(),
                max_batch: max_batch.max(1),
            },
            ort_library: self.ort_library.clone(),
        })
    }

    /// The runner's settings with `max_batch` rows per forward pass.
    pub fn runner(&self, max_batch: usize) -> RunnerConfig {
        RunnerConfig {
            max_batch: max_batch.max(1),
            caption_latent: match self.caption_latent {
                CaptionLatent::Sample => LatentMode::Sample,
                CaptionLatent::Mean => LatentMode::Mean,
            },
            image_limits: ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
                ..ImageLimits::default()
            },
            job_timeout: (self.job_timeout > 0)
                .then(|| std::time::Duration::from_secs(self.job_timeout)),
            progress_every: std::time::Duration::ZERO,
        }
    }

    /// Logging, then the verified package, its engine and its text codec.
    pub fn load(&self, max_batch: usize) -> anyhow::Result<(Engine, TextCodec)> {
        super::init_logging(&self.log);
        let cfg = self.config(max_batch)?;
        let what = || format!("loading model package {}", self.model.display());
        let pkg = Package::open(&self.model).with_context(what)?;
        let engine = Engine::load(&pkg, &cfg).with_context(what)?;
        let codec = TextCodec::for_package(&engine.tokenizer_path, &engine.manifest.values)?;
        Ok((engine, codec))
    }
}
