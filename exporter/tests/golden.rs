//! Every segment of every fixture variant, exported and run with ONNX Runtime (CPU), against the
//! PyTorch reference outputs committed in `tests/fixtures/*/golden.safetensors`.
#![allow(clippy::unwrap_used)]

mod common;

use common::parity::{assert_within, check_package, has_int8, inputs, Tolerances};
use common::{export, f32s, golden, max_err, run, Gold};
use ddit_export::StoreDtype;
use ddit_schemas::Role;

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
    half: F32_TOL,
    vae: F32_TOL,
    velocity: 1.2e-2,
    logits: 1.4e-1,
};

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
    // Block 0 alone (the block cache runs it so), then at most 2 a file.
    assert_eq!(ranges, vec![[0, 1], [1, 2]]);
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
        external.contains(&"text_encoder") && external.contains(&"joint_blocks_1_3"),
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
