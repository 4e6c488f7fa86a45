//! ONNX Runtime fuses what the exporter writes: every tanh-GELU becomes one `FastGelu`, every
//! T5 RMSNorm one `SimplifiedLayerNormalization`, and attention stays one `Attention`
//! (no Softmax left). Read from the model ORT saves after its optimisations.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use ddit_export::StoreDtype;
use ddit_schemas::Role;
use ort::session::Session;

/// Op type -> count over the main graph of an ONNX file (ModelProto.graph = 7,
/// GraphProto.node = 1, NodeProto.op_type = 4).
fn op_counts(path: &Path) -> HashMap<String, usize> {
    let bytes = std::fs::read(path).unwrap();
    let mut counts = HashMap::new();
    for (f, graph) in common::fields(&bytes) {
        let (7, Some(graph)) = (f, graph) else {
            continue;
        };
        for (f, node) in common::fields(graph) {
            let (1, Some(node)) = (f, node) else { continue };
            for (f, op) in common::fields(node) {
                if let (4, Some(op)) = (f, op) {
                    *counts
                        .entry(String::from_utf8(op.to_vec()).unwrap())
                        .or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// The op counts of one segment as written, and after ONNX Runtime's optimisations.
fn written_and_optimized(
    role: Role,
    dtype: StoreDtype,
) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let (dir, m) = common::export("tiny-f32", |o| o.dtype = dtype);
    let file = dir
        .path()
        .join("pkg")
        // The last file of the role: block 0 has a file of its own, the others share one.
        .join(&m.by_role(role).last().unwrap().files[0].path);
    let optimized = dir.path().join("optimized.onnx");
    let _session: Session = Session::builder(common::env())
        .unwrap()
        .with_optimized_model_path(&optimized)
        .unwrap()
        .commit_from_file(&file)
        .unwrap();
    (op_counts(&file), op_counts(&optimized))
}

#[test]
fn every_tanh_gelu_of_the_joint_blocks_becomes_one_fast_gelu() {
    let (written, after) = written_and_optimized(Role::JointBlocks, StoreDtype::F32);
    let gelus = written["Tanh"];
    assert!(gelus >= 2, "{written:?}");
    assert_eq!(written.get("Pow"), Some(&gelus));
    assert_eq!(after.get("FastGelu"), Some(&gelus), "{after:?}");
    assert_eq!(after.get("Tanh"), None, "{after:?}");
    assert_eq!(after.get("Pow"), None, "{after:?}");
    one_attention_op_per_layer(&written, &after);
}

fn one_attention_op_per_layer(written: &HashMap<String, usize>, after: &HashMap<String, usize>) {
    let layers = written["Attention"];
    assert!(layers >= 2, "{written:?}");
    assert_eq!(after.get("Attention"), Some(&layers), "{after:?}");
    assert_eq!(after.get("Softmax"), None, "{after:?}");
}

#[test]
fn every_rms_norm_and_gelu_of_t5_becomes_one_op() {
    let (written, after) = written_and_optimized(Role::TextEncoder, StoreDtype::F32);
    let norms = written["Sqrt"];
    let gelus = written.get("Tanh").copied().unwrap_or(0);
    assert!(norms >= 3, "{written:?}");
    assert_eq!(
        after.get("SimplifiedLayerNormalization"),
        Some(&norms),
        "{after:?}"
    );
    assert_eq!(
        after.get("FastGelu").copied().unwrap_or(0),
        gelus,
        "{after:?}"
    );
    for op in ["Sqrt", "Pow", "Tanh", "ReduceMean"] {
        assert_eq!(after.get(op), None, "{op} left: {after:?}");
    }
    one_attention_op_per_layer(&written, &after);
}

#[test]
fn int8_turns_every_linear_layer_of_the_blocks_and_t5_into_one_integer_matmul() {
    for role in [Role::JointBlocks, Role::TextEncoder] {
        let (f32_written, _) = written_and_optimized(role, StoreDtype::F32);
        let (written, after) = written_and_optimized(role, StoreDtype::Int8);
        let linears = f32_written["MatMul"];
        assert!(linears >= 8, "{role}: {f32_written:?}");
        let op = "MatMulIntegerToFloat";
        assert_eq!(written.get(op), Some(&linears), "{role}");
        assert_eq!(written.get("MatMul"), None, "{role}: {written:?}");
        // ONNX Runtime keeps them integer (nothing dequantized back to a float MatMul), and
        // nothing quantizes a whole tensor at once (that would tie the rows of a batch together).
        assert_eq!(after.get(op), Some(&linears), "{role}: {after:?}");
        for float_or_per_tensor in [
            "MatMul",
            "DequantizeLinear",
            "DynamicQuantizeMatMul",
            "DynamicQuantizeLinear",
        ] {
            assert_eq!(after.get(float_or_per_tensor), None, "{role}: {after:?}");
        }
        // The layers that read one input (Q, K and V; T5's gated pair) share its quantization.
        let quantized = after["QuantizeLinear"];
        assert!(quantized < linears, "{role}: {quantized} of {linears}");
        assert_eq!(written["QuantizeLinear"], quantized, "{role}");
    }
}
