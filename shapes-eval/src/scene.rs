//! The ShapesEval scene checker: colour segmentation, shape classification and relative
//! position, and the parser of the shapes world's captions.

use image::RgbImage;

/// The palette of the shapes world (`tools/train/shapes.py`).
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 205, 30]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub colour: &'static str,
    pub shape: &'static str,
    pub x: f32,
    pub y: f32,
    pub area: usize,
}

fn dist2(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3)
        .map(|i| (i32::from(a[i]) - i32::from(b[i])).pow(2))
        .sum()
}

/// Nearest palette colour of a pixel, or `None` for background and unclear pixels.
fn classify(p: [u8; 3]) -> Option<usize> {
    let white = dist2(p, [255, 255, 255]);
    let (best, d) = COLOURS
        .iter()
        .enumerate()
        .map(|(i, (_, c))| (i, dist2(p, *c)))
        .min_by_key(|x| x.1)?;
    // A pixel belongs to a colour when it is much closer to it than to the background.
    if d < 60 * 60 && d * 2 < white {
        Some(best)
    } else {
        None
    }
}

/// Objects in an image: connected regions of one palette colour, at least `min_area` pixels.
pub fn detect(img: &RgbImage, min_area: usize) -> Vec<Detected> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let labels: Vec<Option<usize>> = img.pixels().map(|p| classify(p.0)).collect();
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        let Some(c) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let mut pix = Vec::new();
        while let Some(i) = stack.pop() {
            pix.push(i);
            let (x, y) = (i % w, i / w);
            let mut push = |j: usize| {
                if !seen[j] && labels[j] == Some(c) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
        if pix.len() < min_area {
            continue;
        }
        let xs = pix.iter().map(|i| i % w);
        let ys = pix.iter().map(|i| i / w);
        let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.clone().max().unwrap_or(0));
        let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.clone().max().unwrap_or(0));
        let n = pix.len() as f32;
        let cx = xs.map(|v| v as f32).sum::<f32>() / n + 0.5;
        let cy = ys.map(|v| v as f32).sum::<f32>() / n + 0.5;
        // Corners of the bounding box tell the shapes apart: a square fills all four, a
        // triangle (apex up) only the bottom two, a circle none.
        let inside = |x: usize, y: usize| labels[y * w + x] == Some(c);
        let k = 2usize.min((x1 - x0 + 1) / 3).max(1);
        let corner = |xa: usize, ya: usize| -> usize {
            (0..k)
                .flat_map(|dy| (0..k).map(move |dx| (dx, dy)))
                .filter(|(dx, dy)| inside(xa + dx, ya + dy))
                .count()
        };
        let top = corner(x0, y0) + corner(x1 + 1 - k, y0);
        let bottom = corner(x0, y1 + 1 - k) + corner(x1 + 1 - k, y1 + 1 - k);
        let full = 2 * k * k;
        // Noise is not an object: a shape fills a good part of its box.
        let fill = pix.len() as f32 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
        if fill < 0.4 {
            continue;
        }
        let shape = if top * 2 > full && bottom * 2 > full {
            "square"
        } else if bottom * 2 > full && top * 4 <= full {
            "triangle"
        } else {
            "circle"
        };
        out.push(Detected {
            colour: COLOURS[c].0,
            shape,
            x: cx,
            y: cy,
            area: pix.len(),
        });
    }
    out.sort_by_key(|d| std::cmp::Reverse(d.area));
    out
}

/// An object named in a caption or prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub colour: String,
    pub shape: String,
}

/// A parsed caption: one object, or two with a relation (`left of` / `above`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SceneText {
    pub objects: Vec<Named>,
    pub relation: Option<String>,
}

/// Parses "a red circle", "a red circle left of a blue square", "a red circle above a blue square".
pub fn parse_caption(text: &str) -> Option<SceneText> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let obj = |w: &[&str]| -> Option<Named> {
        match w {
            [a, c, s]
                if (*a == "a" || *a == "an")
                    && COLOURS.iter().any(|x| x.0 == *c)
                    && SHAPES.contains(s) =>
            {
                Some(Named {
                    colour: (*c).into(),
                    shape: (*s).into(),
                })
            }
            _ => None,
        }
    };
    match words.len() {
        3 => Some(SceneText {
            objects: vec![obj(&words)?],
            relation: None,
        }),
        8 if words[3] == "left" && words[4] == "of" => Some(SceneText {
            objects: vec![obj(&words[..3])?, obj(&words[5..])?],
            relation: Some("left of".into()),
        }),
        7 if words[3] == "above" => Some(SceneText {
            objects: vec![obj(&words[..3])?, obj(&words[4..])?],
            relation: Some("above".into()),
        }),
        _ => None,
    }
}

/// GenEval-style judgement of one image against its prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Judgement {
    pub count: bool,
    pub colour: bool,
    pub shape: bool,
    pub position: bool,
}

impl Judgement {
    pub fn correct(&self) -> bool {
        self.count && self.colour && self.shape && self.position
    }
}

/// Scores detected objects against a prompt's objects and relation.
pub fn judge(want: &SceneText, got: &[Detected]) -> Judgement {
    let count = got.len() == want.objects.len();
    let find = |n: &Named| got.iter().find(|d| d.colour == n.colour);
    let colour = want.objects.iter().all(|n| find(n).is_some());
    let shape = want
        .objects
        .iter()
        .all(|n| find(n).is_some_and(|d| d.shape == n.shape));
    let position = match (&want.relation, want.objects.as_slice()) {
        (None, _) => true,
        (Some(rel), [a, b]) => match (find(a), find(b)) {
            (Some(da), Some(db)) => {
                if rel == "left of" {
                    da.x < db.x
                } else {
                    da.y < db.y
                }
            }
            _ => false,
        },
        _ => false,
    };
    Judgement {
        count,
        colour,
        shape,
        position,
    }
}
