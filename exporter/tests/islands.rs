//! The fp32 islands inside half-precision graphs, read from the ONNX files as written.
//!
//! ONNX Runtime's CPU provider computes the fp16 operators it has no kernel for in f32 anyway
//! (it inserts the casts), so deleting an island would pass every parity test here and overflow
//! on a GPU. This holds each island structurally: `LayerNormalization` with `stash_type` 1,
//! `Attention` with `softmax_precision` 1, `InstanceNormalization` (GroupNorm) and `Softmax`
//! (`--target tensorrt`) fed by a `Cast` to f32; T5 and the timestep embedding all fp32; and no
//! f32 initializer in a half segment but the GroupNorm statistics' unit scale and zero bias (and
//! `Resize`'s scales, f32 by the operator's definition).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use ddit_export::{Precision, Target};
use ddit_schemas::{Manifest, Role};

/// ONNX `TensorProto.DataType`: FLOAT, FLOAT16, BFLOAT16.
const F32: u64 = 1;
const F16: u64 = 10;
const BF16: u64 = 16;

struct Node {
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Integer attributes by name.
    ints: HashMap<String, u64>,
}

struct Model {
    nodes: Vec<Node>,
    /// Initializers as (name, data type).
    inits: Vec<(String, u64)>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// A varint field's value (`common::fields` keeps only the field numbers of varints).
fn varint_field(msg: &[u8], number: u64) -> Option<u64> {
    let mut b = msg;
    while !b.is_empty() {
        let (key, rest) = varint(b);
        b = rest;
        match key & 7 {
            0 => {
                let (v, rest) = varint(b);
                if key >> 3 == number {
                    return Some(v);
                }
                b = rest;
            }
            2 => {
                let (n, rest) = varint(b);
                b = &rest[n as usize..];
            }
            5 => b = &b[4..],
            1 => b = &b[8..],
            w => panic!("wire type {w}"),
        }
    }
    None
}

fn varint(b: &[u8]) -> (u64, &[u8]) {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, &b[i + 1..]);
        }
    }
    panic!("truncated varint")
}

/// ModelProto.graph = 7; GraphProto: node = 1, initializer = 5; NodeProto: input = 1,
/// output = 2, op_type = 4, attribute = 5; AttributeProto: name = 1, i = 3; TensorProto:
/// data_type = 2, name = 8.
fn read(path: &Path) -> Model {
    let bytes = std::fs::read(path).unwrap();
    let mut m = Model {
        nodes: Vec::new(),
        inits: Vec::new(),
    };
    let graph = common::fields(&bytes)
        .into_iter()
        .find_map(|(f, v)| (f == 7).then_some(v).flatten())
        .unwrap();
    for (f, v) in common::fields(graph) {
        match (f, v) {
            (1, Some(node)) => {
                let mut n = Node {
                    op: String::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    ints: HashMap::new(),
                };
                for (f, v) in common::fields(node) {
                    match (f, v) {
                        (1, Some(v)) => n.inputs.push(text(v)),
                        (2, Some(v)) => n.outputs.push(text(v)),
                        (4, Some(v)) => n.op = text(v),
                        (5, Some(attr)) => {
                            let name = common::fields(attr)
                                .into_iter()
                                .find_map(|(f, v)| (f == 1).then_some(v).flatten())
                                .map(text)
                                .unwrap();
                            if let Some(i) = varint_field(attr, 3) {
                                n.ints.insert(name, i);
                            }
                        }
                        _ => {}
                    }
                }
                m.nodes.push(n);
            }
            (5, Some(t)) => {
                let name = common::fields(t)
                    .into_iter()
                    .find_map(|(f, v)| (f == 8).then_some(v).flatten())
                    .map(text)
                    .unwrap();
                m.inits.push((name, varint_field(t, 2).unwrap()));
            }
            _ => {}
        }
    }
    m
}

impl Model {
    /// The node that outputs `value`, if any.
    fn producer(&self, value: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == value))
    }

    /// The first producer up from `value` whose op is not in `through` (following input 0).
    fn up_through(&self, value: &str, through: &[&str]) -> Option<&Node> {
        let mut n = self.producer(value)?;
        while through.contains(&n.op.as_str()) {
            n = self.producer(&n.inputs[0])?;
        }
        Some(n)
    }

    /// Whether `value` is the output of a `Cast` to f32.
    fn cast_to_f32(&self, value: &str) -> bool {
        self.nodes.iter().any(|n| {
            n.op == "Cast" && n.outputs.iter().any(|o| o == value) && n.ints.get("to") == Some(&F32)
        })
    }
}

/// Checks every segment of a package; returns how many islands of each kind it saw.
fn check(pkg: &Path, m: &Manifest, half: u64) -> HashMap<&'static str, usize> {
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for seg in &m.segments {
        let model = read(&pkg.join(&seg.files[0].path));
        let name = &seg.name;
        if matches!(seg.role, Role::TextEncoder | Role::TimestepEmbed) {
            assert_eq!(seg.precision, Precision::Fp32, "{name}");
            for (i, dtype) in &model.inits {
                assert!(*dtype != F16 && *dtype != BF16, "{name}: initializer {i}");
            }
            for n in model.nodes.iter().filter(|n| n.op == "Cast") {
                let to = n.ints["to"];
                assert!(to != F16 && to != BF16, "{name}: a Cast to {to}");
            }
            continue;
        }
        assert_ne!(seg.precision, Precision::Fp32, "{name}");
        // The f32 initializers allowed: the statistics' scale and bias of an
        // InstanceNormalization, and `Resize`'s scales (always f32 in ONNX).
        let mut stats: Vec<String> = model
            .nodes
            .iter()
            .filter(|n| n.op == "Resize")
            .flat_map(|n| n.inputs.get(2).cloned())
            .collect();
        for n in &model.nodes {
            let kind = match n.op.as_str() {
                "LayerNormalization" => {
                    assert_eq!(n.ints.get("stash_type"), Some(&F32), "{name}: {}", n.op);
                    "layer_norm"
                }
                "Attention" => {
                    let p = n.ints.get("softmax_precision");
                    assert_eq!(p, Some(&F32), "{name}: Attention softmax_precision");
                    "attention"
                }
                "InstanceNormalization" => {
                    assert!(
                        model.cast_to_f32(&n.inputs[0]),
                        "{name}: GroupNorm not in f32"
                    );
                    stats.extend(n.inputs[1..].iter().cloned());
                    "group_norm"
                }
                "Softmax" => {
                    assert!(
                        model.cast_to_f32(&n.inputs[0]),
                        "{name}: Softmax not in f32"
                    );
                    "softmax"
                }
                _ => continue,
            };
            *seen.entry(kind).or_default() += 1;
        }
        assert!(model.inits.iter().any(|(_, t)| *t == half), "{name}");
        for (i, dtype) in &model.inits {
            let ok = *dtype != F32 || stats.contains(i);
            assert!(ok, "{name}: f32 initializer {i} outside an island");
        }
    }
    seen
}

fn export_fp16(target: Target) -> HashMap<&'static str, usize> {
    let (dir, m) = common::export("tiny-f32", |o| {
        o.precision = Precision::Fp16;
        o.blocks_per_segment = Some(2);
        o.target = target;
    });
    check(&dir.path().join("pkg"), &m, F16)
}

#[test]
fn fp16_graphs_keep_their_fp32_islands() {
    let seen = export_fp16(Target::Cpu);
    for kind in ["layer_norm", "attention", "group_norm"] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}: {seen:?}"
        );
    }
    assert_eq!(seen.get("softmax"), None, "{seen:?}");
}

#[test]
fn fp16_tensorrt_graphs_keep_their_fp32_islands() {
    let seen = export_fp16(Target::TensorRt);
    for kind in ["layer_norm", "softmax", "group_norm"] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}: {seen:?}"
        );
    }
    assert_eq!(seen.get("attention"), None, "{seen:?}");
}

/// bf16 graphs are written by the same code; they hold the same islands.
#[test]
fn bf16_graphs_keep_their_fp32_islands() {
    let (dir, m) = common::export("tiny-f32", |o| {
        o.precision = Precision::Bf16;
        o.blocks_per_segment = Some(2);
    });
    let seen = check(&dir.path().join("pkg"), &m, BF16);
    assert!(seen.contains_key("attention"), "{seen:?}");
}

/// `--target tensorrt` in half precision scales Q by 1/√d before `Q·Kᵀ`, not the scores after
/// it: the product would otherwise be up to √d times larger in fp16 than needed (about 22 times
/// for the VAE's single 512-channel head) and could overflow to infinity before the scale.
#[test]
fn fp16_tensorrt_attention_scales_q_before_the_scores() {
    let (dir, m) = common::export("tiny-f32", |o| {
        o.precision = Precision::Fp16;
        o.blocks_per_segment = Some(2);
        o.target = Target::TensorRt;
    });
    let mut checked = 0;
    for seg in m.segments.iter().filter(|s| s.precision == Precision::Fp16) {
        let model = read(&dir.path().join("pkg").join(&seg.files[0].path));
        for softmax in model.nodes.iter().filter(|n| n.op == "Softmax") {
            // Softmax <- Cast <- (Add of the bias) <- the scores' MatMul, nothing between.
            let scores = model
                .up_through(&softmax.inputs[0], &["Cast", "Add"])
                .unwrap();
            assert_eq!(
                scores.op, "MatMul",
                "{}: scores from {}",
                seg.name, scores.op
            );
            let q = model
                .up_through(&scores.inputs[0], &["Transpose", "Reshape"])
                .unwrap();
            assert_eq!(q.op, "Mul", "{}: Q not scaled before the MatMul", seg.name);
            checked += 1;
        }
    }
    assert!(checked > 0);
}
