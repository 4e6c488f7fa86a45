//! Every segment of every fixture variant, exported and run with ONNX Runtime (CPU), against the
//! PyTorch reference outputs committed in `tests/fixtures/*/golden.safetensors`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{export, f32s, golden, max_err, nan_max, run, Gold};
use ddit_export::StoreDtype;
use ddit_schemas::{Manifest, Role, SegmentSpec};

/// fp32 tolerance promised by the issue; the measured errors are printed (about 2e-6).
const F32_TOL: f32 = 1e-4;
/// fp16 weight storage of an fp32 checkpoint: weights rounded to 11 significant bits.
/// Measured about 3e-3 on the tiny fixture; 2e-2 leaves headroom across segments.
const F16_TOL: f32 = 2e-2;
/// int8 joint blocks and T5 (int8 weights per output channel, activations quantized to uint8 per
/// row at run time), one bound per kind of segment; every segment without an int8 `MatMul` is
/// held to [`F32_TOL`]. Its quality is judged on ShapesEval (docs/performance.md,
/// `worker/tests/shapes_eval.rs`).
///
/// Measured on the tiny fixture (CPU, ORT 1.31.1): T5 hidden states 5.13e-2; joint blocks
/// 1.83e-3 to 4.65e-3 (`joint_blocks_0_2/text_tokens_out`), tails 2.83e-3 and 3.22e-3; chained
/// velocity 7.76e-3, chained logits 9.41e-2 (T5's error carried through). (One scale per tensor
/// measured 5.94e-2; 2.20e-3 to 4.39e-3; 3.18e-3, 3.36e-3; 5.74e-3, 6.98e-2.) Each bound is about
/// 1.5 times the measurement: the export is deterministic, but ORT's u8×s8 `MatMul` kernels differ
/// between CPUs (AVX2, AVX-512, VNNI), so a few ulps of int8 rounding may land differently. A
/// block whose output is half its true update off is about 20 times the blocks' bound
/// ([`a_half_broken_block_fails_the_int8_bound`]); the old single bound of 0.2 let it through.
const INT8_TOL: Tolerances = Tolerances {
    plain: F32_TOL,
    t5: 8e-2,
    blocks: 7e-3,
    velocity: 1.2e-2,
    logits: 1.4e-1,
};

/// Bounds on the max abs error of one package: `t5` for a text encoder and `blocks` for joint
/// blocks and tails that run int8 `MatMul`s, `velocity` and `logits` for the chained
/// transformer, `plain` for every segment without int8 `MatMul`s.
struct Tolerances {
    plain: f32,
    t5: f32,
    blocks: f32,
    velocity: f32,
    logits: f32,
}

impl Tolerances {
    const fn all(tol: f32) -> Self {
        Self {
            plain: tol,
            t5: tol,
            blocks: tol,
            velocity: tol,
            logits: tol,
        }
    }

    fn segment(&self, seg: &SegmentSpec, int8: bool) -> f32 {
        match (int8, seg.role) {
            (false, _) => self.plain,
            (true, Role::TextEncoder) => self.t5,
            (true, Role::JointBlocks | Role::ImageTail | Role::TextTail) => self.blocks,
            (true, r) => panic!("{}: int8 MatMuls in a {r:?} segment", seg.name),
        }
    }
}

/// Whether a segment's graph holds an int8 `MatMul` (`MatMulIntegerToFloat`).
fn has_int8(pkg: &Path, seg: &SegmentSpec) -> bool {
    let bytes = std::fs::read(pkg.join(&seg.files[0].path)).unwrap();
    let op = b"MatMulIntegerToFloat";
    bytes.windows(op.len()).any(|w| w == op)
}

fn inputs(seg: &ddit_schemas::SegmentSpec, vals: Vec<Gold>) -> Vec<(&str, Gold)> {
    assert_eq!(seg.inputs.len(), vals.len(), "{}: input count", seg.name);
    seg.inputs
        .iter()
        .map(|s| s.name.as_str())
        .zip(vals)
        .collect()
}

/// One comparison: (segment/output, max abs error, tolerance).
type Checked = (String, f32, f32);

/// Runs every segment on its golden inputs; returns each output's error and tolerance.
fn check_segments(
    pkg: &Path,
    m: &Manifest,
    g: &HashMap<String, Gold>,
    tol: &Tolerances,
) -> Vec<Checked> {
    let n = m.values.num_layers as usize;
    let mut errs = Vec::new();
    let mut covered = vec![false; n];
    for seg in &m.segments {
        let (ins, want): (Vec<Gold>, Vec<Gold>) = match seg.role {
            Role::TextEncoder => (
                vec![g["t5.input_ids"].clone()],
                vec![g["t5.hidden"].clone()],
            ),
            Role::ContextEmbedder => (vec![g["t5.hidden"].clone()], vec![g["ctx.out"].clone()]),
            Role::TimestepEmbed => (vec![g["time.t"].clone()], vec![g["time.temb"].clone()]),
            Role::PatchEmbed => (
                vec![g["patch.latents"].clone()],
                vec![g["patch.tokens"].clone()],
            ),
            Role::NullImage => {
                let (s, v) = g["null.out"].f32();
                let mut rep = v.to_vec();
                rep.extend_from_slice(v);
                (
                    vec![g["blocks.temb"].clone()],
                    vec![f32s(&[2, s[1], s[2]], rep)],
                )
            }
            Role::JointBlocks | Role::ImageTail | Role::TextTail => {
                let [s, e] = seg.blocks.unwrap();
                let (s, e) = (s as usize, e as usize);
                covered[s..e].iter_mut().for_each(|c| *c = true);
                let x = g[&format!("blocks.x.{e}")].clone();
                let y = g[&format!("blocks.y.{e}")].clone();
                (
                    vec![
                        g[&format!("blocks.x.{s}")].clone(),
                        g[&format!("blocks.y.{s}")].clone(),
                        g["blocks.temb"].clone(),
                    ],
                    match seg.role {
                        Role::ImageTail => vec![x],
                        Role::TextTail => vec![y],
                        _ => vec![x, y],
                    },
                )
            }
            Role::ImageHead => (
                vec![
                    g[&format!("blocks.x.{n}")].clone(),
                    g["blocks.temb"].clone(),
                    // Latents of the velocity's shape (a 3 x 5 patch grid): only their shape
                    // is read.
                    {
                        let (shape, v) = g["image_head.out"].f32();
                        Gold::F32(shape.to_vec(), vec![0.0; v.len()])
                    },
                ],
                vec![g["image_head.out"].clone()],
            ),
            Role::TextHead => (
                vec![g[&format!("blocks.y.{n}")].clone()],
                vec![g["text_head.out"].clone()],
            ),
            Role::VaeEncoder => (
                vec![g["vae_enc.image"].clone()],
                vec![g["vae_enc.mean"].clone(), g["vae_enc.logvar"].clone()],
            ),
            Role::VaeDecoder => (
                vec![g["vae_dec.z"].clone()],
                vec![g["vae_dec.image"].clone()],
            ),
        };
        let outs = run(pkg, seg, inputs(seg, ins));
        let bound = tol.segment(seg, has_int8(pkg, seg));
        for (i, (o, w)) in outs.iter().zip(&want).enumerate() {
            let tag = format!("{}/{}", seg.name, seg.outputs[i].name);
            errs.push((tag.clone(), max_err(&tag, o, w), bound));
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "joint-block segments must cover every block"
    );
    errs
}

/// The whole transformer by chaining segments: ids -> T5 -> context; latents -> patches; blocks
/// across every joint file; heads. Returns (velocity error, logits error).
fn check_chain(pkg: &Path, m: &Manifest, g: &HashMap<String, Gold>) -> (f32, f32) {
    let one = |role: Role| m.by_role(role).next().unwrap();
    let seg_in =
        |seg: &ddit_schemas::SegmentSpec, vals: Vec<Gold>| run(pkg, seg, inputs(seg, vals));
    let as_gold = |o: &(Vec<usize>, Vec<f32>)| Gold::F32(o.0.clone(), o.1.clone());
    let t5 = seg_in(one(Role::TextEncoder), vec![g["full.input_ids"].clone()]);
    let ctx = seg_in(one(Role::ContextEmbedder), vec![as_gold(&t5[0])]);
    let temb = seg_in(one(Role::TimestepEmbed), vec![g["full.timestep"].clone()]);
    let mut x = seg_in(one(Role::PatchEmbed), vec![g["full.latents"].clone()]).remove(0);
    let mut y = ctx[0].clone();
    for seg in m.by_role(Role::JointBlocks) {
        let out = seg_in(seg, vec![as_gold(&x), as_gold(&y), as_gold(&temb[0])]);
        x = out[0].clone();
        y = out[1].clone();
    }
    let last = vec![as_gold(&x), as_gold(&y), as_gold(&temb[0])];
    let x = seg_in(one(Role::ImageTail), last.clone()).remove(0);
    let y = seg_in(one(Role::TextTail), last).remove(0);
    let vel = seg_in(
        one(Role::ImageHead),
        vec![as_gold(&x), as_gold(&temb[0]), g["full.latents"].clone()],
    );
    let logits = seg_in(one(Role::TextHead), vec![as_gold(&y)]);
    (
        max_err("velocity", &vel[0], &g["full.velocity"]),
        max_err("logits", &logits[0], &g["full.logits"]),
    )
}

/// Prints every error, then fails on the first one that is NaN, infinite or over its tolerance.
fn assert_within(variant: &str, errs: &[Checked]) {
    for (tag, e, tol) in errs {
        println!("{variant:>14} {tag:<40} max abs err {e:.3e} (tolerance {tol:.1e})");
    }
    let worst = nan_max(errs.iter().map(|e| e.1));
    println!("{variant:>14} worst {worst:.3e}");
    for (tag, e, tol) in errs {
        assert!(
            e.is_finite() && e <= tol,
            "{variant}: {tag} max abs err {e:.3e} > {tol:.1e}"
        );
    }
}

/// Every segment on its golden inputs, then the chained transformer.
fn check_package(
    pkg: &Path,
    m: &Manifest,
    g: &HashMap<String, Gold>,
    tol: &Tolerances,
) -> Vec<Checked> {
    let mut errs = check_segments(pkg, m, g, tol);
    let (ev, el) = check_chain(pkg, m, g);
    errs.push(("chain/velocity".into(), ev, tol.velocity));
    errs.push(("chain/logits".into(), el, tol.logits));
    errs
}

fn check_variant(variant: &str, k: Option<usize>, dtype: StoreDtype, tol: &Tolerances) {
    let (dir, m) = export(variant, |o| {
        o.blocks_per_segment = k;
        o.dtype = dtype;
    });
    let errs = check_package(&dir.path().join("pkg"), &m, &golden(variant), tol);
    assert_within(variant, &errs);
}

#[test]
fn f32_checkpoint_matches_reference() {
    check_variant(
        "tiny-f32",
        Some(2),
        StoreDtype::F32,
        &Tolerances::all(F32_TOL),
    );
}

#[test]
fn f16_checkpoint_matches_reference() {
    // fp16 weights in the checkpoint; the reference ran on the same (rounded) weights in f32.
    check_variant("tiny-f16", None, StoreDtype::F32, &Tolerances::all(F32_TOL));
}

#[test]
fn bf16_checkpoint_matches_reference() {
    check_variant(
        "tiny-bf16",
        Some(1),
        StoreDtype::F32,
        &Tolerances::all(F32_TOL),
    );
}

#[test]
fn sharded_checkpoint_matches_reference() {
    check_variant(
        "tiny-sharded",
        Some(3),
        StoreDtype::F32,
        &Tolerances::all(F32_TOL),
    );
}

#[test]
fn odd_layer_count_splits_into_uneven_segments() {
    let (_dir, m) = export("tiny-odd", |o| o.blocks_per_segment = Some(2));
    let ranges: Vec<[u64; 2]> = m
        .by_role(Role::JointBlocks)
        .map(|s| s.blocks.unwrap())
        .collect();
    assert_eq!(ranges, vec![[0, 2]]);
    for tail in [Role::ImageTail, Role::TextTail] {
        assert_eq!(m.by_role(tail).next().unwrap().blocks, Some([2, 3]));
    }
    check_variant(
        "tiny-odd",
        Some(2),
        StoreDtype::F32,
        &Tolerances::all(F32_TOL),
    );
}

#[test]
fn f16_storage_stays_within_documented_tolerance() {
    check_variant(
        "tiny-f32",
        Some(2),
        StoreDtype::F16,
        &Tolerances::all(F16_TOL),
    );
}

#[test]
fn int8_storage_stays_within_documented_tolerance() {
    check_variant("tiny-f32", Some(2), StoreDtype::Int8, &INT8_TOL);
    // The int8 bounds apply where int8 runs: T5, the joint blocks and the tails, nothing else.
    let (dir, m) = export("tiny-f32", |o| o.dtype = StoreDtype::Int8);
    let mut int8: Vec<Role> = m
        .segments
        .iter()
        .filter(|s| has_int8(&dir.path().join("pkg"), s))
        .map(|s| s.role)
        .collect();
    int8.dedup();
    let want = [
        Role::TextEncoder,
        Role::JointBlocks,
        Role::ImageTail,
        Role::TextTail,
    ];
    assert_eq!(int8, want, "segments with int8 MatMuls");
}

/// A joint-block output halfway between its input and its true output (the update half lost)
/// fails the int8 blocks' bound by a wide margin; it passed the old single bound of 0.2.
#[test]
fn a_half_broken_block_fails_the_int8_bound() {
    let g = golden("tiny-f32");
    for stream in ["x", "y"] {
        let (s, input) = g[&format!("blocks.{stream}.0")].f32();
        let want = &g[&format!("blocks.{stream}.1")];
        let half: Vec<f32> = input
            .iter()
            .zip(want.f32().1)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        let e = max_err(stream, &(s.to_vec(), half), want);
        println!("block 0, stream {stream}: half its update off: max abs err {e:.3e}");
        assert!(e > 10.0 * INT8_TOL.blocks, "{stream}: {e:.3e}");
    }
}

#[test]
fn external_data_path_loads_and_matches_inline() {
    // A threshold of 4 kB sends every weight-bearing segment to external data.
    let (dir, m) = export("tiny-f32", |o| o.external_data_threshold = 4096);
    let pkg = dir.path().join("pkg");
    let external: Vec<&str> = m
        .segments
        .iter()
        .filter(|s| s.files.len() == 2)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        external.contains(&"text_encoder") && external.contains(&"joint_blocks_0_3"),
        "{external:?}"
    );
    for s in m.segments.iter().filter(|s| s.files.len() == 2) {
        assert!(s.files[1].path.ends_with(".onnx.data"));
        // The .onnx file itself holds only the graph and small constants.
        assert!(
            s.files[0].bytes < s.files[1].bytes,
            "{}: {} vs {}",
            s.name,
            s.files[0].bytes,
            s.files[1].bytes
        );
    }
    let errs = check_package(&pkg, &m, &golden("tiny-f32"), &Tolerances::all(F32_TOL));
    assert_within("external", &errs);
    ddit_export::verify(&pkg).unwrap();
}

#[test]
fn t5_bucket_table_matches_transformers() {
    let g = common::load_golden(&common::fixtures().join("t5_buckets.safetensors"));
    for (key, nb, md) in [("buckets_32_128", 32, 128), ("buckets_8_8", 8, 8)] {
        let Gold::I64(_, want) = &g[key] else {
            panic!("{key}")
        };
        assert_eq!(
            &ddit_export::segments::t5::bucket_table(nb, md),
            want,
            "{key}"
        );
    }
}

#[test]
fn a_nan_output_fails_the_comparison() {
    let g = golden("tiny-f32");
    let want = &g["time.temb"];
    let (shape, v) = want.f32();
    let all_nan = (shape.to_vec(), vec![f32::NAN; v.len()]);
    assert!(max_err("all NaN", &all_nan, want).is_nan());
    let mut one_nan = (shape.to_vec(), v.to_vec());
    one_nan.1[v.len() / 2] = f32::NAN;
    assert!(max_err("one NaN", &one_nan, want).is_nan());
    assert_eq!(max_err("exact", &(shape.to_vec(), v.to_vec()), want), 0.0);
    // A real segment fed a NaN timestep: its whole output is NaN, and the check fails.
    let (dir, m) = export("tiny-f32", |_| {});
    let seg = m.by_role(Role::TimestepEmbed).next().unwrap();
    let (ts, t) = g["time.t"].f32();
    let out = run(
        &dir.path().join("pkg"),
        seg,
        inputs(seg, vec![f32s(ts, vec![f32::NAN; t.len()])]),
    );
    assert!(out[0].1.iter().all(|x| x.is_nan()));
    let e = max_err("timestep_embed", &out[0], want);
    let checked = vec![("timestep_embed/temb".to_string(), e, F32_TOL)];
    let failed = std::panic::catch_unwind(|| assert_within("nan", &checked));
    assert!(failed.is_err(), "a NaN output passed: max abs err {e}");
}
