//! `--target tensorrt`: every node of every segment is an operator TensorRT 10.13's ONNX parser
//! accepts (the list in src/onnx/tensorrt_ops.txt), in the default domain at opset 22, and every
//! graph input is an ordinary tensor with dynamic dimensions (no shape-value input). Read from
//! the ONNX files as written.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use ddit_export::onnx::tensorrt;
use ddit_export::{ExportError, StoreDtype, Target};
use ddit_schemas::{Dim, TensorDtype};

/// A model file's (opset imports, nodes as (op, domain), input names). ModelProto: opset_import
/// = 8, graph = 7; GraphProto: node = 1, input = 11; NodeProto: op_type = 4, domain = 7;
/// OperatorSetIdProto: domain = 1 (version = 2, a varint).
struct Model {
    opsets: Vec<Vec<u8>>,
    nodes: Vec<(String, String)>,
}

fn read(path: &Path) -> Model {
    let bytes = std::fs::read(path).unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    let mut m = Model {
        opsets: Vec::new(),
        nodes: Vec::new(),
    };
    for (f, v) in common::fields(&bytes) {
        match (f, v) {
            (8, Some(opset)) => m.opsets.push(opset.to_vec()),
            (7, Some(graph)) => {
                for (f, node) in common::fields(graph) {
                    let (1, Some(node)) = (f, node) else { continue };
                    let (mut op, mut domain) = (String::new(), String::new());
                    for (f, v) in common::fields(node) {
                        match (f, v) {
                            (4, Some(v)) => op = text(v),
                            (7, Some(v)) => domain = text(v),
                            _ => {}
                        }
                    }
                    m.nodes.push((op, domain));
                }
            }
            _ => {}
        }
    }
    m
}

fn check_package(variant: &str, dtype: StoreDtype) {
    let (dir, m) = common::export(variant, |o| {
        o.target = Target::TensorRt;
        o.dtype = dtype;
        o.blocks_per_segment = Some(2);
    });
    assert_eq!(m.model.opset, tensorrt::OPSET);
    for seg in &m.segments {
        let model = read(&dir.path().join("pkg").join(&seg.files[0].path));
        // One opset import: the default domain ("" is an empty field 1) at 22 (field 2).
        assert_eq!(
            model.opsets,
            vec![vec![0x0a, 0x00, 0x10, tensorrt::OPSET as u8]],
            "{}",
            seg.name
        );
        assert!(!model.nodes.is_empty(), "{}", seg.name);
        for (op, domain) in &model.nodes {
            assert!(
                domain.is_empty() && tensorrt::accepts(domain, op),
                "{variant} {}: op {op} (domain `{domain}`) is not in TensorRT 10.13's list",
                seg.name
            );
        }
        // No shape-value inputs: every input has a dynamic dimension, and the only integer
        // input is T5's token ids (read by a Gather, never as a shape).
        for input in &seg.inputs {
            assert!(
                input.shape.iter().any(|d| matches!(d, Dim::Sym(_))),
                "{} input {} has a fixed shape",
                seg.name,
                input.name
            );
            if input.dtype == TensorDtype::I64 {
                assert_eq!(input.name, "input_ids", "{}", seg.name);
            }
        }
    }
}

#[test]
fn every_segment_uses_only_operators_tensorrt_parses() {
    check_package("tiny-f32", StoreDtype::F32);
    check_package("tiny-odd", StoreDtype::F32);
    check_package("tiny-f32", StoreDtype::F16);
}

#[test]
fn the_default_target_keeps_the_fused_attention_and_no_contrib_import() {
    let (dir, m) = common::export("tiny-f32", |_| {});
    let pkg = dir.path().join("pkg");
    let attention = m
        .segments
        .iter()
        .map(|s| read(&pkg.join(&s.files[0].path)))
        .inspect(|model| assert_eq!(model.opsets.len(), 1))
        .flat_map(|model| model.nodes)
        .filter(|(op, _)| op == "Attention")
        .count();
    // T5's two layers, three joint blocks, the two tails, the VAE's two mid-blocks.
    assert_eq!(attention, 2 + 3 + 2 + 2);
}

#[test]
fn int8_weights_for_tensorrt_are_refused_naming_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = ddit_export::ExportOptions::new(common::checkpoint("tiny-f32"), dir.path());
    o.target = Target::TensorRt;
    o.dtype = StoreDtype::Int8;
    let e = ddit_export::convert(&o).unwrap_err();
    assert!(
        matches!(&e, ExportError::Argument { name, .. } if name == "target"),
        "{e}"
    );
    assert!(e.to_string().contains("com.microsoft"), "{e}");
}

#[test]
fn a_limit_below_one_layer_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = ddit_export::ExportOptions::new(common::checkpoint("tiny-f32"), dir.path());
    o.max_file_bytes = 20_000;
    let e = ddit_export::convert(&o).unwrap_err();
    assert!(
        matches!(&e, ExportError::Argument { name, .. } if name == "max-file-bytes"),
        "{e}"
    );
    assert!(e.to_string().contains("20000"), "{e}");
}
