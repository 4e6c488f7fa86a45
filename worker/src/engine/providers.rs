//! Execution providers: parsed from configuration, registered strictly.
//!
//! A requested GPU provider registers with `error_on_failure()`: a worker asked for CUDA that
//! would silently run on CPU is a bug, so it fails to start instead.

use std::path::PathBuf;
use std::str::FromStr;

use ort::ep::{self, ExecutionProviderDispatch};

use crate::error::{Result, WorkerError};

/// One entry of `--providers`: `cpu`, `cuda[:DEVICE]`, `tensorrt[:DEVICE]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Provider {
    Cpu,
    Cuda { device: i32 },
    TensorRt { device: i32 },
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda { .. } => "cuda",
            Provider::TensorRt { .. } => "tensorrt",
        }
    }
}

impl FromStr for Provider {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self> {
        let (name, dev) = match s.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let device =
            match dev {
                None => 0,
                Some(d) => d.parse::<i32>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                    WorkerError::Config {
                        name: "providers".into(),
                        message: format!("device id in `{s}` must be a non-negative integer"),
                    }
                })?,
            };
        match name.trim().to_ascii_lowercase().as_str() {
            "cpu" if dev.is_none() => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda { device }),
            "tensorrt" | "trt" => Ok(Provider::TensorRt { device }),
            _ => Err(WorkerError::Config {
                name: "providers".into(),
                message: format!("unknown provider `{s}` (expected cpu, cuda[:N] or tensorrt[:N])"),
            }),
        }
    }
}

/// Parses a comma-separated provider list; CPU is always the final fallback for unsupported ops.
pub fn parse_providers(s: &str) -> Result<Vec<Provider>> {
    let list: Vec<Provider> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse())
        .collect::<Result<_>>()?;
    if list.is_empty() {
        return Err(WorkerError::Config {
            name: "providers".into(),
            message: "empty provider list".into(),
        });
    }
    Ok(list)
}

/// TensorRT options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorRtOptions {
    pub fp16: bool,
    /// Root of the engine and timing caches; a subfolder per model hash is used.
    pub cache_dir: Option<PathBuf>,
}

/// Everything the engine needs to create sessions.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub providers: Vec<Provider>,
    pub intra_threads: usize,
    pub tensorrt: TensorRtOptions,
    /// Path of `libonnxruntime.so`; default: `ORT_DYLIB_PATH`, then the standard places (README).
    pub ort_library: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            providers: vec![Provider::Cpu],
            intra_threads: 1,
            tensorrt: TensorRtOptions::default(),
            ort_library: None,
        }
    }
}

impl EngineConfig {
    /// The provider that runs the graphs: the first requested one (the others are fallbacks).
    pub fn primary(&self) -> &'static str {
        self.providers.first().map(Provider::name).unwrap_or("cpu")
    }

    /// The TensorRT cache folder for one model: `{cache_dir}/{model_hash}`. TensorRT itself keys
    /// engines by GPU architecture and TensorRT version inside it.
    pub fn trt_cache_for(&self, model_hash: &str) -> Option<PathBuf> {
        self.tensorrt.cache_dir.as_ref().map(|d| d.join(model_hash))
    }

    /// The ort dispatch list, each GPU provider set to fail loudly.
    pub fn dispatch(&self, model_hash: &str) -> Vec<ExecutionProviderDispatch> {
        self.providers
            .iter()
            .map(|p| match p {
                Provider::Cpu => ep::CPU::default().build().error_on_failure(),
                Provider::Cuda { device } => ep::CUDA::default()
                    .with_device_id(*device)
                    .build()
                    .error_on_failure(),
                Provider::TensorRt { device } => {
                    let mut trt = ep::TensorRT::default()
                        .with_device_id(*device)
                        .with_fp16(self.tensorrt.fp16);
                    if let Some(dir) = self.trt_cache_for(model_hash) {
                        let d = dir.display().to_string();
                        trt = trt
                            .with_engine_cache(true)
                            .with_engine_cache_path(&d)
                            .with_timing_cache(true)
                            .with_timing_cache_path(&d);
                    }
                    trt.build().error_on_failure()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_provider_lists() {
        assert_eq!(parse_providers("cpu").ok(), Some(vec![Provider::Cpu]));
        assert_eq!(
            parse_providers("tensorrt:1, cuda:1,cpu").ok(),
            Some(vec![
                Provider::TensorRt { device: 1 },
                Provider::Cuda { device: 1 },
                Provider::Cpu
            ])
        );
        assert_eq!(
            parse_providers("cuda").ok(),
            Some(vec![Provider::Cuda { device: 0 }])
        );
        for bad in ["", "gpu", "cuda:-1", "cuda:x", "cpu:1"] {
            assert!(parse_providers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trt_cache_is_keyed_by_model_hash() {
        let mut c = EngineConfig::default();
        assert_eq!(c.trt_cache_for("abc"), None);
        c.tensorrt.cache_dir = Some("/cache".into());
        assert_eq!(c.trt_cache_for("abc"), Some(PathBuf::from("/cache/abc")));
        c.providers = vec![
            Provider::TensorRt { device: 0 },
            Provider::Cuda { device: 0 },
            Provider::Cpu,
        ];
        assert_eq!(c.primary(), "tensorrt");
        assert_eq!(c.dispatch("abc").len(), 3);
    }
}
