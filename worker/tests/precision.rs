//! Half-precision packages (`ddit-export convert --precision`) in the worker: fed and read in
//! the element types their segments declare, on the CPU provider (fp16; bf16 is refused there).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{job, run_jobs_on, write_png};
use ddit_export::Precision;
use ddit_schemas::{Status, TensorDtype};
use ddit_worker::engine::{EngineConfig, Package};
use ddit_worker::runner::{Incoming, Model};
use ddit_worker::tensor::Tensor;
use ddit_worker::WorkerError;
use serde_json::json;

/// The tiny fixture exported in `precision` (blocks split 2 + 2, the common package's canvases).
fn export(out: &Path, precision: Precision) {
    let ck = common::workspace().join("tests/fixtures/tiny-f32/checkpoint");
    let mut o = ddit_export::ExportOptions::new(ck, out);
    o.name = Some("tiny".into());
    o.precision = precision;
    o.blocks_per_segment = Some(2);
    o.text_lengths = ddit_export::LengthOverrides {
        prompt: Some(12),
        caption: Some(10),
        vqa: Some(40),
    };
    ddit_export::convert(&o).unwrap();
}

fn fp16_package() -> &'static Path {
    static PKG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = PKG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        export(&pkg, Precision::Fp16);
        (dir, pkg)
    });
    p
}

/// Deterministic values in [-1, 1).
fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * k).sin() * 1e4).fract())
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
}

/// Every engine call on the fp16 package stays near the fp32 package's: the f16 inputs are
/// bound and the f16 outputs read back as f32 (an input fed as f32 to an f16 graph would fail
/// to run, an f16 output read as f32 would fail to extract). The gap is fp16's own (the
/// reference's fp16-vs-fp32 gap on this fixture is about 4e-3 at the velocity).
#[test]
fn an_fp16_package_computes_what_the_fp32_package_computes_to_fp16_accuracy() {
    let (mut a, _) = common::engine();
    let (mut h, _) = common::engine_of(fp16_package());
    let joint = h
        .manifest
        .segments
        .iter()
        .find(|s| s.name == "joint_blocks_1_3");
    assert_eq!(joint.unwrap().inputs[0].dtype, TensorDtype::F16);
    let v = a.manifest.values.clone();
    let (c, s, d) = (
        v.latent_channels as usize,
        v.sample_size as usize,
        v.hidden_size as usize,
    );
    let ids: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..12).map(|i| (i * 7 + r * 3) % 40 + 2).collect())
        .collect();
    let mut worst = Vec::new();
    let (ta, th) = (a.encode_text(&ids).unwrap(), h.encode_text(&ids).unwrap());
    worst.push(("context", max_diff(&ta, &th)));
    let lat = Tensor::new(vec![2, c, s, s], wave(2 * c * s * s, 0.37)).unwrap();
    let ts = [10.0, 700.5];
    let (va, vh) = (
        a.velocity(&lat, &ta, &ts).unwrap(),
        h.velocity(&lat, &ta, &ts).unwrap(),
    );
    worst.push(("velocity", max_diff(&va, &vh)));
    let tokens = (s / v.patch_size as usize).pow(2);
    let x = Tensor::new(vec![2, tokens, d], wave(2 * tokens * d, 0.23)).unwrap();
    let temb = a.time_embed(&[0.0, 0.0]).unwrap();
    let positions = vec![vec![0, 3, 11], vec![5]];
    let la = a.logits(&x, &temb, &ids, &positions).unwrap();
    let lh = h.logits(&x, &temb, &ids, &positions).unwrap();
    worst.push(("logits", max_diff(&la, &lh)));
    let f = v.vae.downsample_factor as usize;
    let img = Tensor::new(vec![1, 3, s * f, s * f], wave(3 * s * s * f * f, 0.11)).unwrap();
    let (ma, _) = a.vae_encode(&img).unwrap();
    let (mh, _) = h.vae_encode(&img).unwrap();
    worst.push(("vae mean", max_diff(&ma, &mh)));
    let decoded = (a.vae_decode(&ma).unwrap(), h.vae_decode(&ma).unwrap());
    worst.push(("vae decode", max_diff(&decoded.0, &decoded.1)));
    eprintln!("fp16 vs fp32 package, max |diff|: {worst:?}");
    for (what, e) in worst {
        // Not equal (it is not the fp32 graph), finite, and within about two fp16 steps at the
        // largest values (measured at most 2.7e-3).
        assert!(e > 0.0 && e <= 6e-3, "{what}: max |diff| {e}");
    }
}

/// Through I/O bindings (the GPU path, same numbers on the CPU): the timestep embedding's f32
/// output crosses into the f16 blocks and head through the host, converted; the f16 streams
/// stay bound from segment to segment.
#[test]
fn io_bound_fp16_steps_equal_the_plain_path() {
    let (mut plain, _) = common::engine_of(fp16_package());
    let cfg = EngineConfig {
        io_binding: true,
        ..EngineConfig::default()
    };
    let mut bound = common::load(fp16_package(), &cfg).unwrap();
    let v = &plain.manifest.values;
    let (c, s, d) = (
        v.latent_channels as usize,
        v.sample_size as usize,
        v.hidden_size as usize,
    );
    let l = v.text_lengths.prompt as usize;
    for (b, ts) in [(1, vec![999.0]), (3, vec![10.0, 500.5, 980.0])] {
        let lat = Tensor::new(vec![b, c, s, s], wave(b * c * s * s, 0.37)).unwrap();
        let ctx = Tensor::new(vec![b, l, d], wave(b * l * d, 0.11)).unwrap();
        let want = plain.velocity(&lat, &ctx, &ts).unwrap();
        let got = bound.velocity(&lat, &ctx, &ts).unwrap();
        assert_eq!(got.data, want.data, "batch {b}: bound != plain");
    }
}

fn jobs(img: &str) -> Vec<Incoming> {
    vec![
        job(json!({"job_id": "g1", "task": "generate",
                   "params": {"prompt": "a red circle", "steps": 3, "seed": 1, "num_images": 2}})),
        job(
            json!({"job_id": "c1", "task": "caption", "params": {"image": img, "steps": 6, "seed": 4}}),
        ),
        job(json!({"job_id": "v1", "task": "vqa",
                   "params": {"image": img, "question": "what colour is it?", "steps": 5, "seed": 7}})),
    ]
}

/// Every task runs on the fp16 package through the batching runner (the path of `batch`,
/// `eval` and `serve`), and a seeded job gives the same bytes alone and batched.
#[test]
fn every_task_runs_on_an_fp16_package_and_seeds_hold() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let img = img.to_str().unwrap();
    let (batched, sink, _) = run_jobs_on(fp16_package(), jobs(img), 4);
    let (alone, _, _) = run_jobs_on(fp16_package(), jobs(img), 1);
    for (a, b) in batched.iter().zip(&alone) {
        assert_eq!(a.status, Status::Succeeded, "{}: {:?}", a.job_id, a.error);
        assert_eq!(a.text, b.text, "{}", a.job_id);
        let sha = |r: &ddit_schemas::JobResult| -> Vec<String> {
            r.outputs.iter().map(|o| o.sha256.clone()).collect()
        };
        assert_eq!(sha(a), sha(b), "{}", a.job_id);
    }
    assert_eq!(sink.0.len(), 2);
}

/// A bf16 package on the CPU provider is refused when the engine loads, before any session,
/// naming the segment and the way out.
#[test]
fn a_bf16_package_is_refused_on_the_cpu_naming_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    export(&pkg, Precision::Bf16);
    let p = Package::open(&pkg).unwrap();
    match ddit_worker::engine::Engine::load(&p, &EngineConfig::default()) {
        Err(WorkerError::Provider { provider, message }) => {
            assert_eq!(provider, "cpu");
            assert!(message.contains("context_embedder"), "{message}");
            assert!(message.contains("bf16"), "{message}");
            assert!(message.contains("--precision fp16"), "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a bf16 package loaded on the CPU provider"),
    }
}
