//! Packages for the GPU, checked here on the CPU: the TensorRT target's graphs compute what the
//! default graphs compute, and a package split under a small file limit (T5 and the joint blocks
//! in several files) runs jobs to the same bytes as the unsplit one.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{job, run_jobs_on, write_png};
use ddit_schemas::{Dim, Manifest, Role, Status};
use ddit_worker::engine::profiles::trt_profile;
use ddit_worker::engine::TensorRtOptions;
use ddit_worker::runner::{Incoming, Model};
use ddit_worker::tensor::Tensor;
use serde_json::json;

fn tiny() -> PathBuf {
    common::workspace().join("tests/fixtures/tiny-f32/checkpoint")
}

/// Exports `checkpoint` into `out` (text lengths 12 / 10 / 40, as the common package) with
/// `edit` applied to the options.
fn export(
    checkpoint: &Path,
    out: &Path,
    edit: impl FnOnce(&mut ddit_export::ExportOptions),
) -> Manifest {
    let mut o = ddit_export::ExportOptions::new(checkpoint, out);
    o.name = Some("tiny".into());
    o.text_lengths = ddit_export::LengthOverrides {
        prompt: Some(12),
        caption: Some(10),
        vqa: Some(40),
    };
    edit(&mut o);
    ddit_export::convert(&o).unwrap()
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

#[test]
fn the_tensorrt_target_computes_what_the_default_computes() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, trt) = (dir.path().join("cpu"), dir.path().join("trt"));
    export(&tiny(), &cpu, |_| {});
    let m = export(&tiny(), &trt, |o| o.target = ddit_export::Target::TensorRt);
    assert_eq!(m.model.opset, 22);
    let (mut a, _) = common::engine_of(&cpu);
    let (mut b, _) = common::engine_of(&trt);
    let v = a.manifest.values.clone();
    let (c, s, d) = (
        v.latent_channels as usize,
        v.sample_size as usize,
        v.hidden_size as usize,
    );
    let ids: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..12).map(|i| (i * 7 + r * 3) % 40 + 2).collect())
        .collect();
    let mut worst = BTreeMap::new();
    let mut note = |what: &str, x: &Tensor, y: &Tensor| {
        worst.insert(what.to_string(), max_diff(x, y));
    };
    let (ta, tb) = (a.encode_text(&ids).unwrap(), b.encode_text(&ids).unwrap());
    note("text", &ta, &tb);
    // A square and a non-square latent grid, batch 2 with two timesteps.
    for (h, w) in [(s, s), (s / 2, s)] {
        let lat = Tensor::new(vec![2, c, h, w], wave(2 * c * h * w, 0.37)).unwrap();
        let ts = [10.0, 700.5];
        let va = a.velocity(&lat, &ta, &ts).unwrap();
        let vb = b.velocity(&lat, &ta, &ts).unwrap();
        note(&format!("velocity {h}x{w}"), &va, &vb);
    }
    let tokens = (s / v.patch_size as usize).pow(2);
    let x = Tensor::new(vec![2, tokens, d], wave(2 * tokens * d, 0.23)).unwrap();
    let temb = a.time_embed(&[0.0, 0.0]).unwrap();
    let positions = vec![vec![0, 3, 11], vec![5]];
    let la = a.logits(&x, &temb, &ids, &positions).unwrap();
    let lb = b.logits(&x, &temb, &ids, &positions).unwrap();
    note("logits", &la, &lb);
    let f = v.vae.downsample_factor as usize;
    let img = Tensor::new(vec![1, 3, s * f, s * f], wave(3 * s * s * f * f, 0.11)).unwrap();
    let (ma, _) = a.vae_encode(&img).unwrap();
    let (mb, _) = b.vae_encode(&img).unwrap();
    note("vae mean", &ma, &mb);
    note(
        "vae decode",
        &a.vae_decode(&ma).unwrap(),
        &b.vae_decode(&ma).unwrap(),
    );
    eprintln!("tensorrt target vs default, max |diff|: {worst:?}");
    for (what, e) in &worst {
        assert!(*e <= 1e-5, "{what}: max |diff| {e} over 1e-5");
    }
}

/// A safetensors file of f32 tensors: name -> (shape, values).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn read_safetensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Tensors::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        assert_eq!(v["dtype"], "F32", "{k}");
        let shape = serde_json::from_value(v["shape"].clone()).unwrap();
        let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        let vals = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(k.clone(), (shape, vals));
    }
    out
}

fn write_safetensors(path: &Path, t: &Tensors) {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (k, (shape, vals)) in t {
        let start = data.len();
        data.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            k.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// The tiny checkpoint with a T5 of `layers` layers and a `d_ff`-wide feed-forward
/// (deterministic weights), so that one T5 layer outweighs a joint block and a small file limit
/// splits T5 as well as the blocks.
fn wide_t5_checkpoint(dst: &Path, layers: usize, d_ff: usize) {
    let src = tiny();
    common_copy(&src, dst);
    let te = dst.join("text_encoder");
    let cfg_path = te.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let d = cfg["d_model"].as_u64().unwrap() as usize;
    cfg["num_layers"] = layers.into();
    cfg["d_ff"] = d_ff.into();
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let old = read_safetensors(&te.join("model.safetensors"));
    let mut new = Tensors::new();
    for (k, v) in &old {
        let Some(rest) = k.strip_prefix("encoder.block.") else {
            new.insert(k.clone(), v.clone());
            continue;
        };
        let (i, tail) = rest.split_once('.').unwrap();
        for l in (0..layers).filter(|l| l % 2 == i.parse::<usize>().unwrap()) {
            if l > 1 && tail.contains("relative_attention_bias") {
                continue;
            }
            let key = format!("encoder.block.{l}.{tail}");
            let kf = (l + 1) as f32;
            let t = match tail.rsplit('.').nth(1).unwrap() {
                "wi_0" | "wi_1" => (vec![d_ff, d], wave(d_ff * d, 0.17 * kf)),
                "wo" => (vec![d, d_ff], wave(d * d_ff, 0.29 * kf)),
                _ => v.clone(),
            };
            let scale = if t.0 == v.0 { 1.0 } else { 0.2 };
            new.insert(key, (t.0, t.1.iter().map(|x| x * scale).collect()));
        }
    }
    write_safetensors(&te.join("model.safetensors"), &new);
}

fn common_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            common_copy(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn jobs(img: &str) -> Vec<Incoming> {
    vec![
        job(json!({"job_id": "g1", "task": "generate",
                   "params": {"prompt": "a red circle", "steps": 3, "seed": 1, "num_images": 2}})),
        job(json!({"job_id": "g2", "task": "generate",
                   "params": {"prompt": "two objects", "steps": 3, "seed": 3, "width": 24, "height": 12}})),
        job(
            json!({"job_id": "c1", "task": "caption", "params": {"image": img, "steps": 6, "seed": 4}}),
        ),
        job(json!({"job_id": "v1", "task": "vqa",
                   "params": {"image": img, "question": "what colour is it?", "steps": 5, "seed": 7}})),
    ]
}

/// Every segment's files on disk, their sizes summed.
fn segment_bytes(pkg: &Path, m: &Manifest) -> Vec<(String, u64)> {
    m.segments
        .iter()
        .map(|s| {
            let on_disk = s
                .files
                .iter()
                .map(|f| std::fs::metadata(pkg.join(&f.path)).unwrap().len())
                .sum();
            (s.name.clone(), on_disk)
        })
        .collect()
}

#[test]
fn a_package_split_under_a_small_file_limit_runs_jobs_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    wide_t5_checkpoint(&ck, 3, 512);
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let mw = export(&ck, &whole, |_| {});
    const LIMIT: u64 = 150_000;
    let ms = export(&ck, &split, |o| o.max_file_bytes = LIMIT);

    // Unsplit: one T5 file, two block files (block 0 alone, then the others). Split: every
    // segment's files under the limit.
    assert_eq!(mw.by_role(Role::TextEncoder).count(), 1);
    assert_eq!(mw.by_role(Role::JointBlocks).count(), 2);
    let big = segment_bytes(&whole, &mw).into_iter().map(|(_, b)| b).max();
    assert!(big.unwrap() > LIMIT, "the limit must force splits");
    for (name, bytes) in segment_bytes(&split, &ms) {
        assert!(bytes <= LIMIT, "{name}: {bytes} bytes over {LIMIT}");
    }
    // The manifest names the pieces in order.
    let pieces = |role| -> Vec<(String, [u64; 2])> {
        ms.by_role(role)
            .map(|s| (s.name.clone(), s.blocks.unwrap()))
            .collect()
    };
    let t5 = pieces(Role::TextEncoder);
    let want: Vec<(String, [u64; 2])> = (0..3)
        .map(|l| (format!("text_encoder_{l}_{}", l + 1), [l, l + 1]))
        .collect();
    assert_eq!(t5, want);
    let blocks = pieces(Role::JointBlocks);
    // Block 0 alone, then the others (which fit the limit; T5 is what it splits).
    assert!(blocks.len() > 1, "{blocks:?}");
    let ranges: Vec<[u64; 2]> = blocks.iter().map(|(_, r)| *r).collect();
    assert!(ranges.windows(2).all(|w| w[0][1] == w[1][0]), "{ranges:?}");
    assert_eq!((ranges[0][0], ranges[ranges.len() - 1][1]), (0, 3));
    // TensorRT profiles reach every dynamic input of every piece.
    let trt = TensorRtOptions {
        max_batch: 8,
        max_side: 1024,
        ..TensorRtOptions::default()
    };
    for spec in &ms.segments {
        let p = trt_profile(spec, &ms, &trt).unwrap();
        for input in spec
            .inputs
            .iter()
            .filter(|i| i.shape.iter().any(|d| matches!(d, Dim::Sym(_))))
        {
            let p = p.as_ref().unwrap();
            assert!(p.max.contains(&format!("{}:", input.name)), "{}", spec.name);
        }
    }

    // T5 pieces out of order are refused when the package is opened, naming the piece.
    let swapped = dir.path().join("swapped");
    common_copy(&split, &swapped);
    let mpath = swapped.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    v["segments"].as_array_mut().unwrap().swap(1, 2);
    std::fs::write(&mpath, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let e = ddit_worker::engine::Package::open(&swapped).unwrap_err();
    assert!(e.to_string().contains("text_encoder_2_3"), "{e}");

    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let img = img.to_str().unwrap();
    let (ra, sa, _) = run_jobs_on(&whole, jobs(img), 4);
    let (rb, sb, _) = run_jobs_on(&split, jobs(img), 4);
    for (a, b) in ra.iter().zip(&rb) {
        assert_eq!(a.status, Status::Succeeded, "{}: {:?}", a.job_id, a.error);
        assert_eq!((&a.job_id, &a.text), (&b.job_id, &b.text));
        let hashes = |r: &ddit_schemas::JobResult| -> Vec<String> {
            r.outputs.iter().map(|o| o.sha256.clone()).collect()
        };
        assert_eq!(hashes(a), hashes(b), "{}", a.job_id);
    }
    assert_eq!(ra.len(), 4);
    let (mut pa, mut pb) = (sa.0.clone(), sb.0.clone());
    pa.sort();
    pb.sort();
    assert_eq!(pa.len(), 3);
    assert_eq!(pa, pb);
}
