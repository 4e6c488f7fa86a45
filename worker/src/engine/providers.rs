//! Execution providers: parsed from configuration, registered strictly.
//!
//! A requested GPU provider registers with `error_on_failure()`: a worker asked for CUDA that
//! would silently run on CPU is a bug, so it fails to start instead.

use std::path::PathBuf;
use std::str::FromStr;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

use ddit_schemas::Role;

use super::profiles::TrtProfile;
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
    /// `--trt-fp16`: TensorRT may pick fp16 kernels, for every segment but T5's
    /// ([`TensorRtOptions::fp16_for`]).
    pub fp16: bool,
    /// Root of the engine and timing caches; a subfolder per model hash is used.
    pub cache_dir: Option<PathBuf>,
    /// Rows per forward pass the optimization profiles cover (the runner's `--max-batch`).
    pub max_batch: usize,
    /// Pixels of the longest image side the profiles cover (`--max-side`; jobs beyond it are
    /// refused at admission).
    pub max_side: u32,
}

impl TensorRtOptions {
    /// Whether TensorRT gets fp16 for a segment of `role`: with `--trt-fp16`, every segment but
    /// T5's pieces, which overflow in fp16 (the exporter keeps them fp32 in half packages too).
    pub fn fp16_for(&self, role: Role) -> bool {
        self.fp16 && role != Role::TextEncoder
    }
}

/// How a device memory arena grows when it runs out (ONNX Runtime's `arena_extend_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ArenaExtend {
    /// Each extension doubles (ONNX Runtime's default): fewer allocations, more slack.
    #[default]
    NextPowerOfTwo,
    /// Each extension is what was asked for: no slack, so a memory limit is used tightly.
    SameAsRequested,
}

impl ArenaExtend {
    /// `next-power-of-two` or `same-as-requested` (`--arena-extend-strategy`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "next-power-of-two" => Ok(Self::NextPowerOfTwo),
            "same-as-requested" => Ok(Self::SameAsRequested),
            _ => Err(config(
                "arena-extend-strategy",
                format!("`{s}`: expected next-power-of-two or same-as-requested"),
            )),
        }
    }

    /// The value ONNX Runtime's arena configuration takes.
    pub fn ort_value(self) -> usize {
        match self {
            Self::NextPowerOfTwo => 0,
            Self::SameAsRequested => 1,
        }
    }
}

/// How cuDNN picks a convolution algorithm (ONNX Runtime's `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConvSearch {
    /// Benchmark every algorithm on first use of a shape (ONNX Runtime's default).
    #[default]
    Exhaustive,
    /// cuDNN's heuristics, no benchmarking.
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

impl ConvSearch {
    /// `exhaustive`, `heuristic` or `default` (`--cudnn-conv-algo-search`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exhaustive" => Ok(Self::Exhaustive),
            "heuristic" => Ok(Self::Heuristic),
            "default" => Ok(Self::Default),
            _ => Err(config(
                "cudnn-conv-algo-search",
                format!("`{s}`: expected exhaustive, heuristic or default"),
            )),
        }
    }
}

/// CUDA provider options (for `cuda`, and for the shared device arena).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CudaOptions {
    /// Bytes the device arena may hold (`--gpu-mem-limit`); `None`: no limit.
    pub mem_limit: Option<usize>,
    pub arena_extend: ArenaExtend,
    pub conv_search: ConvSearch,
}

/// A byte count such as `20GiB`, `512MiB`, `8GB` or `1073741824` (`flag` names it in errors).
pub fn parse_bytes(flag: &str, s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(config(
                flag,
                format!("`{s}`: unknown unit (B, KiB, MiB, GiB, KB, MB, GB)"),
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| config(flag, format!("`{s}` is not a byte count such as 20GiB")))?;
    n.checked_mul(scale)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| *b > 0)
        .ok_or_else(|| config(flag, format!("`{s}` must be positive and fit in memory")))
}

fn config(name: &str, message: String) -> WorkerError {
    WorkerError::Config {
        name: name.into(),
        message,
    }
}

/// Everything the engine needs to create sessions.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub providers: Vec<Provider>,
    /// Threads of the process's one ONNX Runtime pool (shared by every session).
    pub intra_threads: usize,
    /// Whether idle pool threads spin (busy-wait) for the next parallel section.
    pub spin: bool,
    /// Denoising steps through I/O bindings ([`crate::engine::Engine::velocity_bound`]).
    pub io_binding: bool,
    pub tensorrt: TensorRtOptions,
    pub cuda: CudaOptions,
    /// One device arena for every session of the process (`--shared-allocator`); `None`: on
    /// when a GPU provider is requested.
    pub shared_allocator: Option<bool>,
    /// Start-up fails when a node would fall back to the CPU (`--strict-placement`); `None`:
    /// on when a GPU provider is requested.
    pub strict_placement: Option<bool>,
    /// Path of `libonnxruntime.so`; default: `ORT_DYLIB_PATH`, then the standard places (README).
    pub ort_library: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            providers: vec![Provider::Cpu],
            intra_threads: 1,
            spin: true,
            io_binding: false,
            tensorrt: TensorRtOptions::default(),
            cuda: CudaOptions::default(),
            shared_allocator: None,
            strict_placement: None,
            ort_library: None,
        }
    }
}

impl EngineConfig {
    /// The provider that runs the graphs: the first requested one (the others are fallbacks).
    pub fn primary(&self) -> &'static str {
        self.providers.first().map(Provider::name).unwrap_or("cpu")
    }

    /// Every requested provider is the CPU.
    pub fn cpu_only(&self) -> bool {
        self.providers.iter().all(|p| *p == Provider::Cpu)
    }

    /// Whether start-up refuses a node placed on the CPU (default: with a GPU provider).
    pub fn strict(&self) -> bool {
        self.strict_placement.unwrap_or(!self.cpu_only())
    }

    /// Whether every session shares one device arena (default: with a GPU provider).
    pub fn shared(&self) -> bool {
        self.shared_allocator.unwrap_or(!self.cpu_only())
    }

    /// The CUDA provider with `--gpu-mem-limit`, `--arena-extend-strategy` and
    /// `--cudnn-conv-algo-search`.
    pub fn cuda(&self, device: i32) -> ep::CUDA {
        let o = &self.cuda;
        let mut cuda = ep::CUDA::default()
            .with_device_id(device)
            .with_arena_extend_strategy(match o.arena_extend {
                ArenaExtend::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
                ArenaExtend::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
            })
            .with_conv_algorithm_search(match o.conv_search {
                ConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
                ConvSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
            });
        if let Some(limit) = o.mem_limit {
            cuda = cuda.with_memory_limit(limit);
        }
        cuda
    }

    /// The memory the primary provider keeps its tensors in (what I/O bindings bind outputs to).
    pub fn device_memory(&self) -> Result<MemoryInfo<'static>> {
        let (device, id) = match self.providers.first() {
            Some(Provider::Cuda { device } | Provider::TensorRt { device }) => {
                (AllocationDevice::CUDA, *device)
            }
            _ => (AllocationDevice::CPU, 0),
        };
        MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
            .map_err(|e| WorkerError::runtime("device memory info", e))
    }

    /// The TensorRT cache folder for one model on one GPU:
    /// `{cache_dir}/{model_hash}/{gpu_arch}-trt{version}` (e.g. `…/3f2a…/sm90-trt10.13.3`). A cache
    /// on a shared volume is then never read by a different model, GPU generation or TensorRT
    /// release, whose engines would be rejected or, worse, rebuilt over the others' files.
    pub fn trt_cache_for(&self, model_hash: &str, device: i32) -> Option<PathBuf> {
        self.tensorrt.cache_dir.as_ref().map(|d| {
            d.join(model_hash)
                .join(format!("{}-trt{}", gpu_arch(device), tensorrt_version()))
        })
    }

    /// The ort dispatch list, each GPU provider set to fail loudly; TensorRT with the segment's
    /// optimization profile ([`super::profiles`]), and fp16 unless `role` is T5's.
    pub fn dispatch(
        &self,
        model_hash: &str,
        role: Role,
        profile: Option<&TrtProfile>,
    ) -> Vec<ExecutionProviderDispatch> {
        self.providers
            .iter()
            .map(|p| match p {
                // ort's CPU provider disables ONNX Runtime's memory arena unless asked: every
                // activation would then be a fresh allocation (page faults each run).
                Provider::Cpu => ep::CPU::default()
                    .with_arena_allocator(true)
                    .build()
                    .error_on_failure(),
                Provider::Cuda { device } => self.cuda(*device).build().error_on_failure(),
                Provider::TensorRt { device } => {
                    let mut trt = ep::TensorRT::default()
                        .with_device_id(*device)
                        .with_fp16(self.tensorrt.fp16_for(role));
                    if let Some(dir) = self.trt_cache_for(model_hash, *device) {
                        if let Err(e) = std::fs::create_dir_all(&dir) {
                            tracing::warn!("tensorrt cache {}: {e}", dir.display());
                        }
                        let d = dir.display().to_string();
                        trt = trt
                            .with_engine_cache(true)
                            .with_engine_cache_path(&d)
                            .with_timing_cache(true)
                            .with_timing_cache_path(&d);
                    }
                    if let Some(p) = profile {
                        trt = trt
                            .with_profile_min_shapes(&p.min)
                            .with_profile_opt_shapes(&p.opt)
                            .with_profile_max_shapes(&p.max);
                    }
                    trt.build().error_on_failure()
                }
            })
            .collect()
    }
}

/// The GPU's architecture as `sm{major}{minor}`: `DDIT_GPU_ARCH` when set (e.g. from a node
/// label), else `nvidia-smi`'s compute capability for `device`, else `sm-unknown`.
pub fn gpu_arch(device: i32) -> String {
    if let Some(a) = std::env::var("DDIT_GPU_ARCH")
        .ok()
        .filter(|a| !a.trim().is_empty())
    {
        return sanitize(&a);
    }
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=compute_cap",
            "--format=csv,noheader",
            "-i",
            &device.to_string(),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| compute_cap_to_arch(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|| "sm-unknown".into())
}

/// `"9.0\n"` -> `sm90`.
pub fn compute_cap_to_arch(text: &str) -> Option<String> {
    let (major, minor) = text.lines().next()?.trim().split_once('.')?;
    let (major, minor) = (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?);
    Some(format!("sm{major}{minor}"))
}

/// The TensorRT version: `DDIT_TRT_VERSION`, else `TRT_VERSION` (set by NVIDIA's TensorRT
/// images), else the newest `libnvinfer.so.X.Y.Z` on `LD_LIBRARY_PATH` and the usual library
/// folders, else `unknown`.
pub fn tensorrt_version() -> String {
    for var in ["DDIT_TRT_VERSION", "TRT_VERSION"] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return sanitize(&v);
        }
    }
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/local/tensorrt/lib",
            "/usr/lib64",
        ]
        .map(PathBuf::from),
    );
    let names = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    newest_nvinfer(names).unwrap_or_else(|| "unknown".into())
}

/// The highest `X.Y.Z` among `libnvinfer.so.X.Y.Z` names.
pub fn newest_nvinfer(names: impl IntoIterator<Item = String>) -> Option<String> {
    names
        .into_iter()
        .filter_map(|n| {
            let v = n.strip_prefix("libnvinfer.so.")?.to_string();
            let parts: Vec<u32> = v
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            (parts.len() >= 2).then_some((parts, v))
        })
        .max()
        .map(|(_, v)| v)
}

fn sanitize(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
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
    fn trt_cache_is_keyed_by_model_gpu_and_tensorrt() {
        let mut c = EngineConfig::default();
        assert_eq!(c.trt_cache_for("abc", 0), None);
        let root = tempfile::tempdir().expect("tmp");
        c.tensorrt.cache_dir = Some(root.path().to_path_buf());
        // The architecture and version come from the environment here (no GPU on CI).
        std::env::set_var("DDIT_GPU_ARCH", "sm90");
        std::env::set_var("DDIT_TRT_VERSION", "10.13.3");
        assert_eq!(
            c.trt_cache_for("abc", 0),
            Some(root.path().join("abc").join("sm90-trt10.13.3"))
        );
        std::env::set_var("DDIT_GPU_ARCH", "sm89");
        assert_eq!(
            c.trt_cache_for("abc", 1),
            Some(root.path().join("abc").join("sm89-trt10.13.3"))
        );
        c.providers = vec![
            Provider::TensorRt { device: 0 },
            Provider::Cuda { device: 0 },
            Provider::Cpu,
        ];
        assert_eq!(c.primary(), "tensorrt");
        assert_eq!(c.dispatch("abc", Role::JointBlocks, None).len(), 3);
        // Registering the TensorRT provider prepares its cache folder.
        assert!(root.path().join("abc").join("sm89-trt10.13.3").is_dir());
    }

    /// `--trt-fp16` reaches every segment but T5's: T5 overflows in fp16 (its feed-forward
    /// activations pass 65504), and the exporter keeps it fp32 in half packages for that reason.
    #[test]
    fn trt_fp16_leaves_the_text_encoder_in_fp32() {
        let mut t = TensorRtOptions::default();
        let roles = [
            Role::TextEncoder,
            Role::ContextEmbedder,
            Role::TimestepEmbed,
            Role::JointBlocks,
            Role::ImageHead,
            Role::VaeDecoder,
        ];
        assert!(roles.iter().all(|&r| !t.fp16_for(r)));
        t.fp16 = true;
        for r in roles {
            assert_eq!(t.fp16_for(r), r != Role::TextEncoder, "{r}");
        }
    }

    #[test]
    fn cuda_options_reach_the_provider() {
        let mut c = EngineConfig {
            providers: vec![Provider::Cuda { device: 1 }, Provider::Cpu],
            ..EngineConfig::default()
        };
        let defaults = format!("{:?}", c.cuda(1));
        assert!(defaults.contains(r#""device_id": "1""#), "{defaults}");
        assert!(!defaults.contains("gpu_mem_limit"), "{defaults}");
        c.cuda = CudaOptions {
            mem_limit: Some(parse_bytes("gpu-mem-limit", "20GiB").expect("size")),
            arena_extend: ArenaExtend::parse("same-as-requested").expect("strategy"),
            conv_search: ConvSearch::parse("heuristic").expect("search"),
        };
        let set = format!("{:?}", c.cuda(1));
        for (k, v) in [
            ("gpu_mem_limit", "21474836480"),
            ("arena_extend_strategy", "kSameAsRequested"),
            ("cudnn_conv_algo_search", "HEURISTIC"),
        ] {
            assert!(set.contains(&format!(r#""{k}": "{v}""#)), "{k}: {set}");
        }
        assert_eq!(c.dispatch("abc", Role::JointBlocks, None).len(), 2);
        // GPU requested: strict placement and the shared arena default on; CPU only: off.
        assert!(c.strict() && c.shared());
        c.strict_placement = Some(false);
        assert!(!c.strict());
        let cpu = EngineConfig::default();
        assert!(!cpu.strict() && !cpu.shared());
    }

    #[test]
    fn provider_option_values_are_validated_naming_the_flag() {
        assert_eq!(parse_bytes("f", "512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_bytes("f", " 8gb ").ok(), Some(8_000_000_000));
        assert_eq!(parse_bytes("f", "4096").ok(), Some(4096));
        for bad in [
            "",
            "0",
            "0GiB",
            "GiB",
            "-1",
            "1.5GiB",
            "12 parsecs",
            "99999999999999GiB",
        ] {
            match parse_bytes("gpu-mem-limit", bad) {
                Err(WorkerError::Config { name, .. }) => assert_eq!(name, "gpu-mem-limit"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        match ArenaExtend::parse("double") {
            Err(WorkerError::Config { name, .. }) => assert_eq!(name, "arena-extend-strategy"),
            other => panic!("{other:?}"),
        }
        match ConvSearch::parse("fastest") {
            Err(WorkerError::Config { name, .. }) => assert_eq!(name, "cudnn-conv-algo-search"),
            other => panic!("{other:?}"),
        }
        assert_eq!(ConvSearch::parse("Default").ok(), Some(ConvSearch::Default));
    }

    #[test]
    fn gpu_arch_and_tensorrt_version_parsing() {
        assert_eq!(compute_cap_to_arch("9.0\n").as_deref(), Some("sm90"));
        assert_eq!(compute_cap_to_arch("8.6").as_deref(), Some("sm86"));
        assert_eq!(compute_cap_to_arch("N/A"), None);
        let names = [
            "libnvinfer.so",
            "libnvinfer.so.10",
            "libnvinfer.so.10.9.0",
            "libnvinfer.so.10.13.3",
            "libnvinfer_plugin.so.10.13.3",
            "libnvinfer.so.10.13.x",
        ]
        .map(String::from);
        assert_eq!(newest_nvinfer(names).as_deref(), Some("10.13.3"));
        assert_eq!(sanitize(" 10.13/3 "), "10.13_3");
    }
}
