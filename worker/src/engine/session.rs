//! One ONNX Runtime session per segment, fed by name from the manifest.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ddit_schemas::{Manifest, SegmentSpec, TensorDtype};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, TensorRef};

use super::dtype::{element, element_of, host_value, read_f32, to_host};

use super::placement::{register_shared_allocator, Placement, RECORD_PLACEMENT};
use super::profiles::trt_profile;
use super::providers::{EngineConfig, Provider};
use crate::error::{Result, WorkerError};
use crate::tensor::Tensor;

/// The file name of the ONNX Runtime library ddit is built against.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Where the library is looked for when neither `--ort-library` nor `ORT_DYLIB_PATH` is set:
/// next to the executable, `.ddit/ort/` of the current folder or of the workspace the binary was
/// built in (`scripts/ort.sh` puts it there), then `/usr/local/lib` and `/usr/lib`.
pub fn default_library_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            c.push(dir.join(ORT_LIBRARY));
            // target/{debug,release}/ -> workspace root
            if let Some(root) = dir.parent().and_then(Path::parent) {
                c.push(root.join(".ddit/ort").join(ORT_LIBRARY));
            }
            if let Some(root) = dir.parent().and_then(Path::parent).and_then(Path::parent) {
                c.push(root.join(".ddit/ort").join(ORT_LIBRARY));
            }
        }
    }
    c.push(PathBuf::from(".ddit/ort").join(ORT_LIBRARY));
    c.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.ddit/ort")
            .join(ORT_LIBRARY),
    );
    c.push(PathBuf::from("/usr/local/lib").join(ORT_LIBRARY));
    c.push(PathBuf::from("/usr/lib").join(ORT_LIBRARY));
    c
}

/// Loads ONNX Runtime once per process, with one intra-op thread pool of `intra_threads` that
/// every session of the process shares (spinning per `spin`), and, under `--shared-allocator`,
/// one device arena they share too; the first engine's config sets each.
pub fn environment(cfg: &EngineConfig) -> Result<&'static Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    let res = ENV.get_or_init(|| {
        let path = cfg
            .ort_library
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .or_else(|| default_library_candidates().into_iter().find(|p| p.exists()))
            .ok_or_else(|| {
                format!("{ORT_LIBRARY} not found: set ORT_DYLIB_PATH or --ort-library, or run scripts/ort.sh")
            })?;
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        // The library first: any ONNX Runtime call before it (the pool options are one) makes
        // `ort` load its default library name instead, and panic when that is not on the path.
        let builder =
            ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(cfg.intra_threads.max(1))
            .and_then(|p| p.with_inter_threads(1))
            .and_then(|p| p.with_spin_control(cfg.spin))
            .map_err(|e| format!("the thread pool: {e}"))?;
        builder
            .with_name("ddit")
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| format!("creating the environment: {e}"))
    });
    let env = res.as_ref().map_err(|m| WorkerError::Runtime {
        context: "onnxruntime".into(),
        message: m.clone(),
    })?;
    if cfg.shared() {
        shared_arena(env, cfg)?;
    }
    Ok(env)
}

/// Registers the environment's shared device arena once per process (the first engine to
/// register it sets its device, limit and growth); a failure is the provider's.
fn shared_arena(env: &Environment, cfg: &EngineConfig) -> Result<()> {
    static REGISTERED: Mutex<bool> = Mutex::new(false);
    let mut done = REGISTERED
        .lock()
        .map_err(|_| WorkerError::Internal("shared arena lock poisoned".into()))?;
    if !*done {
        let first = cfg.providers.first().unwrap_or(&Provider::Cpu);
        if let Provider::Cuda { device } | Provider::TensorRt { device } = first {
            // Registering a CUDA arena while the CUDA provider's library cannot load (a missing
            // libcublasLt, say) aborts the process inside ONNX Runtime (an uncaught C++
            // exception); the provider registered first fails with its error instead.
            let probe = cfg.cuda(*device).build().error_on_failure();
            let failed = |message: String| WorkerError::Provider {
                provider: first.name().into(),
                message,
            };
            Session::builder(env)
                .map_err(|e| failed(e.to_string()))?
                .with_execution_providers([probe])
                .map_err(|e| failed(e.to_string()))?;
        }
        let limit = cfg.cuda.mem_limit.unwrap_or(0);
        register_shared_allocator(env, first, limit, cfg.cuda.arena_extend)?;
        *done = true;
    }
    Ok(())
}

/// An input value for a segment.
pub enum Input<'a> {
    F32(&'a Tensor),
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

pub struct Segment {
    pub name: String,
    session: Session,
    /// Inputs and outputs in manifest order, each with the element type the manifest declares
    /// (f32 tensors are converted to and from it in [`super::dtype`]).
    inputs: Vec<(String, TensorDtype)>,
    outputs: Vec<String>,
    /// The I/O binding of [`Segment::run_bound`], made on first use.
    binding: Option<IoBinding>,
    /// Where ONNX Runtime placed each node, read back from the session.
    pub placement: Placement,
}

/// An input of [`Segment::run_bound`]: host data (copied to the session's device when bound) or
/// a value another segment left on the device.
pub enum Bound<'a> {
    Host(Input<'a>),
    Device(&'a DynValue),
}

impl Segment {
    /// Creates the session and checks its I/O names and element types against the manifest.
    pub fn load(
        env: &Environment,
        cfg: &EngineConfig,
        path: &Path,
        spec: &SegmentSpec,
        manifest: &Manifest,
    ) -> Result<Self> {
        let ctx = |what: &str| format!("segment {} ({}): {what}", spec.name, path.display());
        let trt = cfg
            .providers
            .iter()
            .any(|p| matches!(p, Provider::TensorRt { .. }));
        let profile = match trt {
            true => {
                trt_profile(spec, manifest, &cfg.tensorrt).map_err(|m| WorkerError::Package {
                    path: path.display().to_string(),
                    message: m,
                })?
            }
            false => None,
        };
        // Every session runs on the environment's one thread pool (see `environment`), records
        // where its nodes go, and allocates from the shared arena when there is one.
        let mut builder = Session::builder(env)
            .map_err(|e| WorkerError::runtime(ctx("builder"), e))?
            .with_config_entry(RECORD_PLACEMENT, "1")
            .map_err(|e| WorkerError::runtime(ctx("builder"), e))?;
        if cfg.shared() {
            builder = builder
                .with_env_allocators()
                .map_err(|e| WorkerError::runtime(ctx("builder"), e))?;
        }
        let mut builder = builder
            .with_execution_providers(cfg.dispatch(
                &manifest.model.hash,
                spec.role,
                profile.as_ref(),
            ))
            .map_err(|e| WorkerError::Provider {
                provider: cfg.primary().to_string(),
                message: e.to_string(),
            })?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| WorkerError::runtime(ctx("load"), e))?;
        let mismatch = |m: String| WorkerError::Package {
            path: path.display().to_string(),
            message: m,
        };
        let check = |kind: &str,
                     got: Vec<(String, Option<TensorElementType>)>,
                     want: &[ddit_schemas::TensorSpec]| {
            if got.len() != want.len() {
                return Err(mismatch(format!(
                    "{kind}: the graph has {}, the manifest {}",
                    got.len(),
                    want.len()
                )));
            }
            for ((name, ty), w) in got.iter().zip(want) {
                if *name != w.name || *ty != Some(element(w.dtype)) {
                    return Err(mismatch(format!(
                        "{kind} `{name}` ({ty:?}) does not match the manifest's `{}` ({:?})",
                        w.name, w.dtype
                    )));
                }
            }
            Ok(())
        };
        let io = |outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|o| (o.name().to_string(), o.dtype().tensor_type()))
                .collect::<Vec<_>>()
        };
        check("inputs", io(session.inputs()), &spec.inputs)?;
        check("outputs", io(session.outputs()), &spec.outputs)?;
        let placement = Placement::read(&session)?;
        if cfg.strict() {
            placement.check_strict(&spec.name, &cfg.providers)?;
        }
        tracing::debug!(segment = %spec.name, placed = %placement.label(), "placement");
        Ok(Self {
            placement,
            name: spec.name.clone(),
            inputs: spec
                .inputs
                .iter()
                .map(|t| (t.name.clone(), t.dtype))
                .collect(),
            outputs: spec.outputs.iter().map(|t| t.name.clone()).collect(),
            session,
            binding: None,
        })
    }

    /// Runs the segment; inputs in manifest order; returns every output in manifest order.
    pub fn run(&mut self, inputs: Vec<Input<'_>>) -> Result<Vec<Tensor>> {
        let ctx = |what: &str| format!("segment {}: {what}", self.name);
        if inputs.len() != self.inputs.len() {
            return Err(WorkerError::Internal(ctx(&format!(
                "{} inputs given, {} expected",
                inputs.len(),
                self.inputs.len()
            ))));
        }
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for ((name, dtype), inp) in self.inputs.iter().zip(&inputs) {
            let v: SessionInputValue<'_> = match inp {
                // Views over the caller's buffers: no copy of activations per step.
                Input::F32(t) if *dtype == TensorDtype::F32 => {
                    TensorRef::from_array_view((t.shape.clone(), t.data.as_slice()))
                        .map_err(|e| WorkerError::runtime(ctx(name), e))?
                        .into()
                }
                // A half-precision input: converted, so owned.
                Input::F32(t) => host_value(t, *dtype, &ctx(name))?.into(),
                Input::I64 { shape, data } => {
                    TensorRef::from_array_view((shape.clone(), data.as_slice()))
                        .map_err(|e| WorkerError::runtime(ctx(name), e))?
                        .into()
                }
            };
            feeds.push((Cow::Owned(name.clone()), v));
        }
        let out = self
            .session
            .run(feeds)
            .map_err(|e| WorkerError::runtime(ctx("run"), e))?;
        let mut res = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            res.push(read_f32(&out[name.as_str()], &ctx(name))?);
        }
        Ok(res)
    }

    /// Runs the segment through an I/O binding: every output stays in `device` memory (the
    /// session's), where the next segment reads it; inputs in manifest order; returns every
    /// output in manifest order.
    pub fn run_bound(
        &mut self,
        inputs: Vec<Bound<'_>>,
        device: &MemoryInfo,
    ) -> Result<Vec<DynValue>> {
        let ctx = |what: &str| format!("segment {}: {what}", self.name);
        if inputs.len() != self.inputs.len() {
            return Err(WorkerError::Internal(ctx("wrong number of bound inputs")));
        }
        let binding = match &mut self.binding {
            Some(b) => b,
            None => {
                let b = self
                    .session
                    .create_binding()
                    .map_err(|e| WorkerError::runtime(ctx("binding"), e))?;
                self.binding.insert(b)
            }
        };
        // Outputs bound afresh each run: a bound output keeps its first shape, and rows change
        // from step to step as jobs join and leave.
        for name in &self.outputs {
            binding
                .bind_output_to_device(name.as_str(), device)
                .map_err(|e| WorkerError::runtime(ctx(name), e))?;
        }
        // Host inputs as owned tensors: ort clones a borrowed view on binding, and that clone
        // deadlocks in ort 2.0.0-rc.15 (its identity session takes a lock it already holds).
        for ((name, dtype), inp) in self.inputs.iter().zip(&inputs) {
            let bound = match inp {
                Bound::Device(v) if element_of(v) == Some(element(*dtype)) => {
                    binding.bind_input(name.as_str(), *v)
                }
                // Another segment's output of another precision (the fp32 timestep embedding
                // into a half-precision block): through the host, converted.
                Bound::Device(v) => {
                    let t = to_host(v, &ctx(name))?;
                    let v = host_value(&t, *dtype, &ctx(name))?;
                    binding.bind_input(name.as_str(), &v)
                }
                Bound::Host(Input::F32(t)) => {
                    let v = host_value(t, *dtype, &ctx(name))?;
                    binding.bind_input(name.as_str(), &v)
                }
                Bound::Host(Input::I64 { shape, data }) => {
                    OrtTensor::from_array((shape.clone(), data.clone()))
                        .and_then(|v| binding.bind_input(name.as_str(), &v))
                }
            };
            bound.map_err(|e| WorkerError::runtime(ctx(name), e))?;
        }
        let mut out = self
            .session
            .run_binding(binding)
            .map_err(|e| WorkerError::runtime(ctx("run"), e))?;
        self.outputs
            .iter()
            .map(|n| {
                out.remove(n.as_str())
                    .ok_or_else(|| WorkerError::Internal(ctx(&format!("no output {n}"))))
            })
            .collect()
    }
}
