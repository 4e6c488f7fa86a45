//! Where ONNX Runtime placed each node, read back from the session; and the one device allocator
//! every session of the process shares.
//!
//! Placement comes from `Session_GetEpGraphAssignmentInfo` (ONNX Runtime 1.24+), which reports
//! the nodes each execution provider took when the session was created (after the basic graph
//! optimizations; fusions a provider does inside its own subgraph are not split back out). The
//! session must be created with [`RECORD_PLACEMENT`] set. Neither this nor the shared allocator
//! is wrapped by `ort` 2.0.0-rc.15, so both call the C API directly: the only `unsafe` in the
//! worker, kept to this file.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::AsPointer;

use super::providers::{ArenaExtend, Provider};
use crate::error::{Result, WorkerError};

/// The session configuration entry that makes ONNX Runtime keep the placement.
pub const RECORD_PLACEMENT: &str = "session.record_ep_graph_assignment_info";

/// Most CPU-bound nodes an error lists by name.
const LISTED: usize = 12;

/// One node of a session's graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedNode {
    pub name: String,
    pub op_type: String,
    pub domain: String,
}

/// A session's nodes by the execution provider that runs them (ONNX Runtime's names, e.g.
/// `CUDAExecutionProvider`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub by_provider: BTreeMap<String, Vec<PlacedNode>>,
}

const CPU_EP: &str = "CPUExecutionProvider";

/// Operators that also compute shapes and indices. ONNX Runtime's CUDA provider leaves the small
/// integer subgraphs that compute shapes (from `Shape` to a `Reshape`'s target) on the CPU on
/// purpose, where they are cheaper than a kernel launch; such nodes are not a fallback. Every
/// other operator on the CPU is: a kernel the GPU providers lack (an int8 or contrib operator, an
/// opset they do not know yet).
const SHAPE_OPS: &[&str] = &[
    "Shape",
    "Size",
    "Gather",
    "Slice",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Cast",
    "Range",
    "ConstantOfShape",
    "Expand",
    "Equal",
    "Where",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Floor",
    "Ceil",
    "Min",
    "Max",
    "ReduceProd",
    "Identity",
    "Constant",
];

/// ddit's name for an ONNX Runtime execution provider, e.g. `CUDAExecutionProvider` -> `cuda`.
pub fn short_name(ep: &str) -> String {
    match ep {
        CPU_EP => "cpu".into(),
        "CUDAExecutionProvider" => "cuda".into(),
        "TensorrtExecutionProvider" => "tensorrt".into(),
        other => other
            .trim_end_matches("ExecutionProvider")
            .to_ascii_lowercase(),
    }
}

impl Placement {
    /// Reads the placement of a session created with [`RECORD_PLACEMENT`].
    pub fn read(session: &Session) -> Result<Self> {
        let api = ort::api();
        let err = |e: ort::Error| WorkerError::runtime("reading node placement", e);
        let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
        let mut count = 0usize;
        // SAFETY: the session is alive for the whole call; ONNX Runtime owns the returned arrays
        // and strings, which live as long as the session, and we copy them out before returning.
        unsafe {
            ort::Error::result_from_status((api.Session_GetEpGraphAssignmentInfo)(
                session.ptr(),
                &mut subgraphs,
                &mut count,
            ))
            .map_err(err)?;
            let mut placement = Placement::default();
            for i in 0..count {
                let sg = *subgraphs.add(i);
                let mut ep: *const c_char = std::ptr::null();
                ort::Error::result_from_status((api.EpAssignedSubgraph_GetEpName)(sg, &mut ep))
                    .map_err(err)?;
                let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
                let mut n = 0usize;
                ort::Error::result_from_status((api.EpAssignedSubgraph_GetNodes)(
                    sg, &mut nodes, &mut n,
                ))
                .map_err(err)?;
                let list = placement.by_provider.entry(text(ep)).or_default();
                for j in 0..n {
                    let node = *nodes.add(j);
                    let (mut name, mut op, mut domain) =
                        (std::ptr::null(), std::ptr::null(), std::ptr::null());
                    ort::Error::result_from_status((api.EpAssignedNode_GetName)(node, &mut name))
                        .map_err(err)?;
                    ort::Error::result_from_status((api.EpAssignedNode_GetOperatorType)(
                        node, &mut op,
                    ))
                    .map_err(err)?;
                    ort::Error::result_from_status((api.EpAssignedNode_GetDomain)(
                        node,
                        &mut domain,
                    ))
                    .map_err(err)?;
                    list.push(PlacedNode {
                        name: text(name),
                        op_type: text(op),
                        domain: text(domain),
                    });
                }
            }
            Ok(placement)
        }
    }

    /// Adds another session's placement to this one.
    pub fn merge(&mut self, other: &Placement) {
        for (ep, nodes) in &other.by_provider {
            self.by_provider
                .entry(ep.clone())
                .or_default()
                .extend(nodes.iter().cloned());
        }
    }

    /// Where the nodes run, in ddit's names: every provider that runs at least one node, in a
    /// fixed order (`tensorrt`, `cuda`, `cpu`, then any other), joined by `+`; e.g. `cpu`,
    /// `cuda`, `tensorrt+cuda`, `cuda+cpu`. An empty graph runs nowhere else than the CPU.
    pub fn label(&self) -> String {
        let rank = |s: &str| match s {
            "tensorrt" => 0,
            "cuda" => 1,
            "cpu" => 2,
            _ => 3,
        };
        let mut names: Vec<String> = self
            .by_provider
            .iter()
            .filter(|(_, nodes)| !nodes.is_empty())
            .map(|(ep, _)| short_name(ep))
            .collect();
        names.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
        names.dedup();
        if names.is_empty() {
            return "cpu".into();
        }
        names.join("+")
    }

    /// The nodes left to the CPU provider.
    pub fn on_cpu(&self) -> &[PlacedNode] {
        self.by_provider.get(CPU_EP).map_or(&[], Vec::as_slice)
    }

    /// Under `--strict-placement`, with a GPU provider first in `requested`: an error naming
    /// `segment` and the nodes that would fall back to the CPU (shape computations aside, see
    /// [`SHAPE_OPS`]).
    pub fn check_strict(&self, segment: &str, requested: &[Provider]) -> Result<()> {
        let Some(primary) = requested.first().filter(|p| **p != Provider::Cpu) else {
            return Ok(());
        };
        let cpu: Vec<&PlacedNode> = self
            .on_cpu()
            .iter()
            .filter(|n| !(n.domain.is_empty() && SHAPE_OPS.contains(&n.op_type.as_str())))
            .collect();
        if cpu.is_empty() {
            return Ok(());
        }
        let total: usize = self.by_provider.values().map(Vec::len).sum();
        let mut names: Vec<String> = cpu
            .iter()
            .take(LISTED)
            .map(|n| format!("{} ({})", n.name, n.op_type))
            .collect();
        if cpu.len() > LISTED {
            names.push(format!("and {} more", cpu.len() - LISTED));
        }
        Err(WorkerError::Provider {
            provider: primary.name().into(),
            message: format!(
                "strict placement: segment {segment}: {} of {total} nodes would fall back to the \
                 CPU: {}; the requested providers have no kernel for them (run with \
                 --strict-placement false to allow it, slowly)",
                cpu.len(),
                names.join(", ")
            ),
        })
    }
}

/// The label of the engine loaded last in this process (every engine of a process loads the same
/// package with the same providers): what `/metrics` reports as `ddit_execution_provider`.
static OBSERVED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records an engine's [`Placement::label`].
pub fn observe(label: &str) {
    if let Ok(mut o) = OBSERVED.lock() {
        *o = Some(label.to_string());
    }
}

/// The label an engine of this process recorded, if one loaded.
pub fn observed() -> Option<String> {
    OBSERVED.lock().ok().and_then(|o| o.clone())
}

/// A C string owned by ONNX Runtime, copied.
///
/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Registers, in the process's one ONNX Runtime environment, a device arena for `provider`'s
/// memory that every session created with `session.use_env_allocators` then shares, instead of
/// one arena per session (per segment): `CreateAndRegisterAllocatorV2`. `max_mem` 0: no limit.
pub fn register_shared_allocator(
    env: &Environment,
    provider: &Provider,
    max_mem: usize,
    extend: ArenaExtend,
) -> Result<()> {
    let (ep, device, id) = match provider {
        Provider::Cpu => (CPU_EP, AllocationDevice::CPU, 0),
        Provider::Cuda { device } | Provider::TensorRt { device } => {
            ("CUDAExecutionProvider", AllocationDevice::CUDA, *device)
        }
    };
    let ctx = |e: ort::Error| WorkerError::Provider {
        provider: provider.name().into(),
        message: format!("the shared allocator (--shared-allocator): {e}"),
    };
    let info =
        MemoryInfo::new(device, id, AllocatorType::Arena, MemoryType::Default).map_err(ctx)?;
    let api = ort::api();
    let keys = [c"max_mem", c"arena_extend_strategy"];
    let values = [max_mem, extend.ort_value()];
    let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
    let ep = CString::new(ep).map_err(|e| WorkerError::Internal(e.to_string()))?;
    let device_id =
        CString::new(id.to_string()).map_err(|e| WorkerError::Internal(e.to_string()))?;
    let (opt_keys, opt_values) = ([c"device_id".as_ptr()], [device_id.as_ptr()]);
    // SAFETY: every pointer passed lives until the calls return; the arena configuration is
    // released after ONNX Runtime copied it into the allocator.
    unsafe {
        let mut cfg: *mut ort::sys::OrtArenaCfg = std::ptr::null_mut();
        ort::Error::result_from_status((api.CreateArenaCfgV2)(
            key_ptrs.as_ptr(),
            values.as_ptr(),
            keys.len(),
            &mut cfg,
        ))
        .map_err(ctx)?;
        let status = (api.CreateAndRegisterAllocatorV2)(
            env.ptr().cast_mut(),
            ep.as_ptr(),
            info.ptr(),
            cfg,
            opt_keys.as_ptr(),
            opt_values.as_ptr(),
            opt_keys.len(),
        );
        (api.ReleaseArenaCfg)(cfg);
        ort::Error::result_from_status(status).map_err(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, op: &str) -> PlacedNode {
        PlacedNode {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
        }
    }

    fn placed(list: &[(&str, usize)]) -> Placement {
        let mut p = Placement::default();
        for (ep, n) in list {
            p.by_provider.insert(
                ep.to_string(),
                (0..*n).map(|i| node(&format!("n{i}"), "MatMul")).collect(),
            );
        }
        p
    }

    #[test]
    fn labels_name_every_provider_that_runs_a_node_in_a_fixed_order() {
        assert_eq!(placed(&[(CPU_EP, 3)]).label(), "cpu");
        assert_eq!(placed(&[("CUDAExecutionProvider", 3)]).label(), "cuda");
        let mixed = placed(&[
            (CPU_EP, 1),
            ("CUDAExecutionProvider", 2),
            ("TensorrtExecutionProvider", 1),
        ]);
        assert_eq!(mixed.label(), "tensorrt+cuda+cpu");
        assert_eq!(
            placed(&[(CPU_EP, 0), ("CUDAExecutionProvider", 2)]).label(),
            "cuda"
        );
        assert_eq!(Placement::default().label(), "cpu");
    }

    // No GPU here, so ONNX Runtime cannot produce a CPU fallback: this branch is checked on a
    // placement made by hand (the reader itself runs on real sessions in tests/placement.rs).
    #[test]
    fn strict_placement_names_the_segment_and_the_nodes_that_fall_back() {
        let cuda = [Provider::Cuda { device: 0 }, Provider::Cpu];
        let mut p = placed(&[("CUDAExecutionProvider", 5)]);
        assert!(p.check_strict("joint_blocks_0", &cuda).is_ok());
        // The shape computations the CUDA provider keeps on the CPU on purpose are no fallback.
        p.by_provider.insert(
            CPU_EP.into(),
            vec![node("s", "Shape"), node("g", "Gather"), node("c", "Concat")],
        );
        assert!(p.check_strict("joint_blocks_0", &cuda).is_ok());
        p.by_provider.insert(
            CPU_EP.into(),
            (0..14)
                .map(|i| node(&format!("q{i}"), "DynamicQuantizeMatMul"))
                .collect(),
        );
        let e = p
            .check_strict("joint_blocks_0", &cuda)
            .expect_err("a CPU node under strict placement")
            .to_string();
        assert!(e.contains("`cuda`") && e.contains("joint_blocks_0"), "{e}");
        assert!(e.contains("14 of 19 nodes"), "{e}");
        assert!(
            e.contains("q0 (DynamicQuantizeMatMul)") && e.contains("and 2 more"),
            "{e}"
        );
        // CPU-only: the CPU is not a fallback.
        assert!(p.check_strict("joint_blocks_0", &[Provider::Cpu]).is_ok());
    }
}
