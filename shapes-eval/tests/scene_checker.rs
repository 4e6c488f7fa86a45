//! The ShapesEval scene checker is right on the ground-truth renders and rejects wrong ones.
#![allow(clippy::unwrap_used)]

use ddit_shapes_eval::load_set;
use ddit_shapes_eval::scene::{detect, judge, parse_caption, SceneText, COLOURS};
use image::RgbImage;

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

/// Every ground-truth scene with its parsed caption and render.
fn scenes_with_renders() -> Vec<(String, SceneText, RgbImage)> {
    let set = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes-eval");
    load_set(&set)
        .unwrap()
        .into_iter()
        .map(|s| {
            let img = image::open(set.join(&s.image)).unwrap().to_rgb8();
            (s.caption.clone(), parse_caption(&s.caption).unwrap(), img)
        })
        .collect()
}

fn accepts(want: &SceneText, img: &RgbImage) -> bool {
    judge(
        want,
        &detect(img, (img.width() * img.height()) as usize / 50),
    )
    .correct()
}

/// `img` with every pixel near palette colour `from` painted `to`.
fn recolour(img: &RgbImage, from: [u8; 3], to: [u8; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let d: i32 = (0..3)
            .map(|i| (i32::from(p.0[i]) - i32::from(from[i])).pow(2))
            .sum();
        if d < 60 * 60 {
            p.0 = to;
        }
    }
    out
}

/// The checker rejects a render changed so that its caption no longer holds: the relation
/// mirrored, one object recoloured to a colour absent from the scene, or the objects erased.
#[test]
fn checker_rejects_changed_renders() {
    let mut accepted = Vec::new();
    let (mut mirrored, mut recoloured) = (0, 0);
    for (caption, want, img) in scenes_with_renders() {
        let mut wrong: Vec<(&str, RgbImage)> = Vec::new();
        match want.relation.as_deref() {
            Some("left of") => wrong.push(("mirrored", image::imageops::flip_horizontal(&img))),
            Some(_) => wrong.push(("flipped", image::imageops::flip_vertical(&img))),
            None => {}
        }
        mirrored += wrong.len();
        let colour = |name: &str| COLOURS.iter().find(|c| c.0 == name).unwrap().1;
        let absent = COLOURS
            .iter()
            .find(|c| want.objects.iter().all(|o| o.colour != c.0))
            .unwrap();
        for o in &want.objects {
            wrong.push(("recoloured", recolour(&img, colour(&o.colour), absent.1)));
            recoloured += 1;
        }
        let blank = RgbImage::from_pixel(img.width(), img.height(), image::Rgb([255; 3]));
        wrong.push(("blank", blank));
        for (how, w) in wrong {
            if accepts(&want, &w) {
                accepted.push(format!("{caption}: {how}"));
            }
        }
    }
    println!("{mirrored} mirrored or flipped, {recoloured} recoloured renders");
    assert!(mirrored > 50 && recoloured > 300);
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}

/// The checker rejects another scene's render whose objects differ in colour, shape or count.
#[test]
fn checker_rejects_other_scenes_renders() {
    let scenes = scenes_with_renders();
    let key = |t: &SceneText| {
        let mut k: Vec<(String, String)> = t
            .objects
            .iter()
            .map(|o| (o.colour.clone(), o.shape.clone()))
            .collect();
        k.sort();
        k
    };
    let (mut pairs, mut accepted) = (0, Vec::new());
    for (i, (caption, want, _)) in scenes.iter().enumerate() {
        // The next ten scenes whose objects differ from this caption's.
        for (other, got, img) in scenes.iter().cycle().skip(i + 1).take(10) {
            if key(got) == key(want) {
                continue;
            }
            pairs += 1;
            if accepts(want, img) {
                accepted.push(format!("{caption} on the render of {other}"));
            }
        }
    }
    println!("{pairs} mismatched pairs, {} accepted", accepted.len());
    assert!(pairs > 2500);
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}
