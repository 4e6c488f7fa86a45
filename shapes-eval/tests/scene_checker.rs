//! The ShapesEval scene checker is right on the ground-truth renders.
#![allow(clippy::unwrap_used)]

use ddit_shapes_eval::load_set;
use ddit_shapes_eval::scene::{detect, judge, parse_caption};

#[test]
fn checker_scores_ground_truth_renders() {
    let set = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes-eval");
    let scenes = load_set(&set).unwrap();
    assert!(scenes.len() >= 300);
    let mut correct = 0;
    let mut wrong = Vec::new();
    for s in &scenes {
        let img = image::open(set.join(&s.image)).unwrap().to_rgb8();
        let want =
            parse_caption(&s.caption).unwrap_or_else(|| panic!("unparsed caption {}", s.caption));
        let got = detect(&img, (img.width() * img.height()) as usize / 50);
        let j = judge(&want, &got);
        if j.correct() {
            correct += 1;
        } else {
            wrong.push(format!("{}: {} -> {got:?} {j:?}", s.image, s.caption));
        }
    }
    let acc = correct as f64 / scenes.len() as f64;
    println!(
        "checker accuracy on ground truth: {acc:.4} ({correct}/{})",
        scenes.len()
    );
    assert!(
        acc >= 0.99,
        "accuracy {acc:.4}; wrong:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn captions_parse() {
    assert!(parse_caption("a red circle").is_some());
    assert_eq!(
        parse_caption("a red circle left of a blue square")
            .unwrap()
            .relation
            .as_deref(),
        Some("left of")
    );
    assert_eq!(
        parse_caption("a green triangle above a orange circle")
            .unwrap()
            .objects
            .len(),
        2
    );
    assert!(parse_caption("a pink circle").is_none());
    assert!(parse_caption("").is_none());
}
