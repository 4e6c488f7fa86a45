//! Loading checks: a wrong or partial package, or an unavailable provider, fails at start-up.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use ddit_worker::engine::{EngineConfig, Provider};
use ddit_worker::WorkerError;

fn load_err(p: &Path, cfg: &EngineConfig) -> WorkerError {
    match common::load(p, cfg) {
        Ok(_) => panic!("loaded a broken package"),
        Err(e) => e,
    }
}

#[test]
fn loads_and_reports_the_provider() {
    let e = common::load(common::package(), &EngineConfig::default()).unwrap();
    assert_eq!(e.provider(), "cpu");
    assert_eq!(e.manifest.values.num_layers, 4);
}

#[test]
fn a_changed_segment_is_refused() {
    let (_d, p) = common::copy_package();
    let f = p.join("text_head.onnx");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&f, b).unwrap();
    let e = load_err(&p, &EngineConfig::default());
    assert!(
        matches!(e, WorkerError::Package { .. }) && e.to_string().contains("sha256"),
        "{e}"
    );
}

#[test]
fn a_missing_segment_is_refused() {
    let (_d, p) = common::copy_package();
    std::fs::remove_file(p.join("vae_decoder.onnx")).unwrap();
    let e = load_err(&p, &EngineConfig::default());
    assert!(e.to_string().contains("vae_decoder.onnx"), "{e}");
}

#[test]
fn another_manifest_version_is_refused() {
    let (_d, p) = common::copy_package();
    let m = p.join("manifest.json");
    let v = ddit_schemas::MANIFEST_FORMAT_VERSION;
    let text = std::fs::read_to_string(&m).unwrap().replace(
        &format!("\"format_version\": {v}"),
        &format!("\"format_version\": {}", v + 1),
    );
    std::fs::write(&m, text).unwrap();
    let e = load_err(&p, &EngineConfig::default());
    assert!(e.to_string().contains("format_version"), "{e}");
}

#[test]
fn a_manifest_whose_signature_disagrees_with_the_graph_is_refused() {
    let (_d, p) = common::copy_package();
    let m = p.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    for s in v["segments"].as_array_mut().unwrap() {
        if s["role"] == "text_head" {
            s["inputs"][0]["name"] = "renamed".into();
        }
    }
    std::fs::write(&m, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let e = load_err(&p, &EngineConfig::default());
    assert!(e.to_string().contains("renamed"), "{e}");
}

#[test]
fn requested_gpu_provider_that_cannot_register_is_an_error() {
    // The CPU build of ONNX Runtime has no CUDA or TensorRT: asking for them must fail loudly.
    for p in [
        Provider::Cuda { device: 0 },
        Provider::TensorRt { device: 0 },
    ] {
        let cfg = EngineConfig {
            providers: vec![p.clone(), Provider::Cpu],
            ..EngineConfig::default()
        };
        match load_err(common::package(), &cfg) {
            WorkerError::Provider { provider, .. } => assert_eq!(provider, p.name()),
            e => panic!("{e}"),
        }
    }
}

/// Deterministic values in [-1, 1).
fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * k).sin() * 1e4).fract())
        .collect()
}

#[test]
fn io_bound_steps_equal_the_plain_path() {
    use ddit_worker::runner::Model;
    use ddit_worker::tensor::Tensor;
    let (mut plain, _) = common::engine();
    let cfg = EngineConfig {
        io_binding: true,
        ..EngineConfig::default()
    };
    // Blocks in two files: the streams cross from one bound segment to the next.
    let mut bound = common::load(common::package(), &cfg).unwrap();
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
        // Twice: the second run reuses each binding and its output buffers.
        for _ in 0..2 {
            let want = plain.velocity(&lat, &ctx, &ts).unwrap();
            let got = bound.velocity(&lat, &ctx, &ts).unwrap();
            assert_eq!(got.shape, want.shape);
            assert_eq!(got.data, want.data, "batch {b}: bound != plain");
        }
    }
}
