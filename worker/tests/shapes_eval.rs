//! A small ShapesEval slice on the committed demo model: a guard against sampler regressions.
//! Thresholds sit well below the model's measured scores (see the README), so only a real
//! regression fails it.
#![allow(clippy::unwrap_used)]

mod common;

use ddit_worker::engine::EngineConfig;
use ddit_worker::eval::{run, EvalOptions};
use ddit_worker::runner::RunnerConfig;
use ddit_worker::text::TextCodec;

#[test]
fn shapes_eval_slice() {
    let root = common::workspace();
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    common::export(
        &root.join("models/ddit-shapes"),
        &pkg,
        "ddit-shapes",
        [16, 16, 32],
        None,
    );
    // Two runners on their own threads, as `eval` runs a narrow model on two cores.
    let cfg = EngineConfig::default();
    let mut engines = vec![
        common::load(&pkg, &cfg).unwrap(),
        common::load(&pkg, &cfg).unwrap(),
    ];
    let codec =
        TextCodec::for_package(&engines[0].tokenizer_path, &engines[0].manifest.values).unwrap();
    let opts = EvalOptions {
        limit: Some(24),
        runner: RunnerConfig {
            max_batch: 16,
            ..RunnerConfig::default()
        },
        seed: 0,
    };
    let report = run(&mut engines, &codec, &root.join("models/shapes-eval"), opts).unwrap();
    let scores = &report.scores;
    print!("{}", scores.table());
    assert_eq!(report.images.len(), 24);
    assert_eq!(report.predictions.len(), 24);
    // The per-scene lines agree with the scores.
    let exact = report
        .predictions
        .iter()
        .filter(|p| p.caption_exact)
        .count();
    assert_eq!(exact as f64 / 24.0, scores.caption_exact);
    assert!(
        scores.caption_exact >= 0.7,
        "caption exact {:.3}",
        scores.caption_exact
    );
    assert!(scores.vqa >= 0.6, "vqa {:.3}", scores.vqa);
    assert!(
        scores.generation >= 0.5,
        "generation {:.3}",
        scores.generation
    );
}
