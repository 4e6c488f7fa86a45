//! Where nodes run, read from real sessions on real exported graphs; the shared device arena;
//! and packages refused where they cannot run.
//!
//! Every engine of this test binary asks for the shared arena, so the process's one ONNX Runtime
//! environment is created with it whichever test runs first.
#![allow(clippy::unwrap_used)]

mod common;

use ddit_worker::engine::placement::register_shared_allocator;
use ddit_worker::engine::session::environment;
use ddit_worker::engine::{ArenaExtend, EngineConfig, Provider};
use ddit_worker::runner::Model;
use ddit_worker::tensor::Tensor;
use ddit_worker::WorkerError;

fn shared() -> EngineConfig {
    EngineConfig {
        shared_allocator: Some(true),
        ..EngineConfig::default()
    }
}

#[test]
fn every_node_of_the_real_segments_is_read_back_on_the_cpu() {
    let e = common::load(common::package(), &shared()).unwrap();
    let by = &e.placement().by_provider;
    assert_eq!(by.keys().collect::<Vec<_>>(), ["CPUExecutionProvider"]);
    let nodes = &by["CPUExecutionProvider"];
    // Ten roles and two block files: a few hundred nodes, every one with a name and an op.
    assert!(nodes.len() > 100, "{} nodes", nodes.len());
    assert!(nodes
        .iter()
        .all(|n| !n.name.is_empty() && !n.op_type.is_empty()));
    for op in ["MatMul", "Conv", "Attention", "LayerNormalization"] {
        assert!(nodes.iter().any(|n| n.op_type == op), "no {op} node");
    }
    // The result label and the metric come from the placement, not from the request.
    assert_eq!(e.provider(), "cpu");
    assert_eq!(Model::provider(&e), "cpu");
    assert_eq!(
        ddit_worker::engine::placement::observed().as_deref(),
        Some("cpu")
    );
}

#[test]
fn engines_on_the_shared_arena_compute_what_engines_on_their_own_do() {
    let cfg = shared();
    let mut a = common::load(common::package(), &cfg).unwrap();
    // This ONNX Runtime has no CUDA: a CUDA arena cannot be made, and says so, naming the flag.
    let env = environment(&cfg).unwrap();
    let cuda = Provider::Cuda { device: 0 };
    match register_shared_allocator(env, &cuda, 1 << 30, ArenaExtend::SameAsRequested) {
        Err(WorkerError::Provider { provider, message }) => {
            assert_eq!(provider, "cuda");
            assert!(message.contains("--shared-allocator"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Sessions on their own arenas compute the same numbers.
    let own = EngineConfig {
        shared_allocator: Some(false),
        ..EngineConfig::default()
    };
    let mut b = common::load(common::package(), &own).unwrap();
    let v = a.manifest.values.clone();
    let (c, s, d) = (
        v.latent_channels as usize,
        v.sample_size as usize,
        v.hidden_size as usize,
    );
    let l = v.text_lengths.prompt as usize;
    let lat = Tensor::new(vec![2, c, s, s], vec![0.25; 2 * c * s * s]).unwrap();
    let ctx = Tensor::new(vec![2, l, d], vec![-0.5; 2 * l * d]).unwrap();
    let ts = [10.0, 900.0];
    for _ in 0..2 {
        let got = a.velocity(&lat, &ctx, &ts).unwrap();
        let want = b.velocity(&lat, &ctx, &ts).unwrap();
        assert_eq!(got.data, want.data);
    }
}

#[test]
fn an_int8_package_is_refused_under_a_gpu_provider_before_the_provider_loads() {
    let pkg = common::int8_package();
    for p in [
        Provider::Cuda { device: 0 },
        Provider::TensorRt { device: 0 },
    ] {
        let cfg = EngineConfig {
            providers: vec![p.clone(), Provider::Cpu],
            ..shared()
        };
        // This ONNX Runtime has no CUDA: had the package check not come first, registering the
        // provider would have failed with another message.
        match common::load(pkg, &cfg) {
            Err(WorkerError::Provider { provider, message }) => {
                assert_eq!(provider, p.name());
                assert!(message.contains("int8"), "{message}");
                assert!(message.contains("MatMulIntegerToFloat"), "{message}");
                assert!(message.contains(&pkg.display().to_string()), "{message}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an int8 package loaded under {}", p.name()),
        }
    }
    // On the CPU it runs.
    let e = common::load(pkg, &shared()).unwrap();
    let by = &e.placement().by_provider;
    let cpu = &by["CPUExecutionProvider"];
    let int8 = ["MatMulIntegerToFloat", "DynamicQuantizeMatMul"];
    assert!(cpu.iter().any(|n| int8.contains(&n.op_type.as_str())));
}
