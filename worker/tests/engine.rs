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
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 2");
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
