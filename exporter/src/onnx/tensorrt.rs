//! What TensorRT's ONNX parser accepts, for `--target tensorrt`: the operator list written
//! down in `tensorrt_ops.txt` (its header names the source and version) and the opset.

use super::graph::Graph;
use crate::error::{ExportError, Result};

/// The opset of TensorRT-target graphs: the newest the TensorRT 10.13 parser's ONNX knows.
pub const OPSET: u32 = 22;

/// The parser's operator list, one name a line (`#` starts a comment).
pub const OPS_TEXT: &str = include_str!("tensorrt_ops.txt");

/// Every operator of [`OPS_TEXT`].
pub fn ops() -> impl Iterator<Item = &'static str> {
    OPS_TEXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Whether TensorRT's parser accepts `op` of `domain`.
pub fn accepts(domain: &str, op: &str) -> bool {
    domain.is_empty() && ops().any(|o| o == op)
}

/// Refuses a graph with a node TensorRT's parser would not take, naming the node.
pub fn check(g: &Graph) -> Result<()> {
    match g.nodes.iter().find(|n| !accepts(n.domain, n.op)) {
        None => Ok(()),
        Some(n) => Err(ExportError::Argument {
            name: "target".into(),
            message: format!(
                "segment {}: node {} (op `{}`, domain `{}`) is not an operator TensorRT 10.13's \
                 ONNX parser accepts (src/onnx/tensorrt_ops.txt)",
                g.name, n.name, n.op, n.domain
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::MS_DOMAIN;

    #[test]
    fn the_list_reads_and_leaves_out_what_came_after_10_13() {
        assert!(ops().count() > 100);
        for op in ["MatMul", "Softmax", "LayerNormalization", "Resize", "Split"] {
            assert!(accepts("", op), "{op}");
        }
        for op in [
            "Attention",
            "RMSNormalization",
            "RotaryEmbedding",
            "TensorScatter",
        ] {
            assert!(!accepts("", op), "{op}");
        }
        assert!(!accepts(MS_DOMAIN, "MatMul"));
        assert!(!accepts(MS_DOMAIN, "DynamicQuantizeMatMul"));
    }
}
