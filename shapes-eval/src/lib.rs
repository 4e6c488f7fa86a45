//! ShapesEval: the demo world's held-out scenes, the scene checker that judges generated images,
//! and the scores (caption exact match and attributes, VQA by question kind, GenEval-style
//! generation). No model here: [`jobs`] makes the jobs, whoever runs them hands the texts and
//! images back to [`score`] (`ddit-worker eval shapes` runs them through its runner).

pub mod font;
pub mod scene;

use std::path::{Path, PathBuf};

use ddit_schemas::{CaptionParams, GenerateParams, Job, TaskParams, VqaParams};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use scene::{detect, judge, parse_caption, Judgement, COLOURS, SHAPES};

/// Why a set could not be read or a report not written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Qa {
    pub question: String,
    pub answer: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Scene {
    pub id: u64,
    pub image: String,
    pub caption: String,
    pub qa: Vec<Qa>,
}

/// Reads `DIR/scenes.jsonl`.
pub fn load_set(dir: &Path) -> Result<Vec<Scene>> {
    let p = dir.join("scenes.jsonl");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| EvalError::Invalid {
                path: p.clone(),
                message: e.to_string(),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub scenes: usize,
    pub caption_exact: f64,
    pub caption_colour: f64,
    pub caption_shape: f64,
    pub caption_position: f64,
    pub vqa: f64,
    pub vqa_questions: usize,
    /// VQA by question kind (see [`question_kind`]): (kind, correct, asked), sorted by kind.
    pub vqa_by_kind: Vec<(String, usize, usize)>,
    pub generation: f64,
    pub gen_count: f64,
    pub gen_colour: f64,
    pub gen_shape: f64,
    pub gen_position: f64,
}

impl Scores {
    pub fn table(&self) -> String {
        let rows = [
            ("caption exact match", self.caption_exact),
            ("caption colour", self.caption_colour),
            ("caption shape", self.caption_shape),
            ("caption position", self.caption_position),
            ("vqa accuracy", self.vqa),
            ("generation (all correct)", self.generation),
            ("generation count", self.gen_count),
            ("generation colour", self.gen_colour),
            ("generation shape", self.gen_shape),
            ("generation position", self.gen_position),
        ];
        let mut s = format!(
            "ShapesEval on {} scenes ({} questions)\n",
            self.scenes, self.vqa_questions
        );
        for (k, v) in rows {
            s.push_str(&format!("{k:<28} {v:.3}\n"));
        }
        if !self.vqa_by_kind.is_empty() {
            s.push_str("vqa by question kind\n");
            for (kind, right, asked) in &self.vqa_by_kind {
                let acc = *right as f64 / (*asked).max(1) as f64;
                s.push_str(&format!("  {kind:<48} {right:>4}/{asked:<4} {acc:.3}\n"));
            }
        }
        s.push_str(&format!(
            "caption_exact={:.3} vqa={:.3} generation={:.3}\n",
            self.caption_exact, self.vqa, self.generation
        ));
        s
    }
}

/// The kind of a question: its words with shape and colour names replaced by `<shape>` and
/// `<colour>`, and the scene's object count, e.g. "is the <shape> left of the <shape>? (2 objects)".
pub fn question_kind(question: &str, objects: usize) -> String {
    let words: Vec<String> = question
        .split_whitespace()
        .map(|w| {
            let (stem, tail) = w.split_at(w.trim_end_matches(['?', '.', ',']).len());
            if SHAPES.contains(&stem) {
                format!("<shape>{tail}")
            } else if COLOURS.iter().any(|c| c.0 == stem) {
                format!("<colour>{tail}")
            } else {
                w.to_string()
            }
        })
        .collect();
    let plural = if objects == 1 { "" } else { "s" };
    format!("{} ({objects} object{plural})", words.join(" "))
}

/// Caption attributes, slot by slot: (colour, shape, position) correctness fractions.
fn caption_attributes(pred: &str, reference: &str) -> (f64, f64, f64) {
    let (Some(r), Some(p)) = (parse_caption(reference), parse_caption(pred)) else {
        return (0.0, 0.0, 0.0);
    };
    let n = r.objects.len() as f64;
    let colour = r
        .objects
        .iter()
        .enumerate()
        .filter(|(i, o)| p.objects.get(*i).is_some_and(|q| q.colour == o.colour))
        .count() as f64
        / n;
    let shape = r
        .objects
        .iter()
        .enumerate()
        .filter(|(i, o)| p.objects.get(*i).is_some_and(|q| q.shape == o.shape))
        .count() as f64
        / n;
    let position = f64::from(u8::from(
        r.relation == p.relation && r.objects.len() == p.objects.len(),
    ));
    (colour, shape, position)
}

/// One scene's outputs next to the references (a line of `predictions.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub id: u64,
    pub image: String,
    pub caption: String,
    pub predicted_caption: String,
    pub caption_exact: bool,
    pub qa: Vec<QaPrediction>,
    /// The scene checker's verdict on the image generated from `caption`.
    pub generation: Judgement,
    pub generation_correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QaPrediction {
    pub question: String,
    pub answer: String,
    pub predicted: String,
    pub correct: bool,
}

/// What [`score`] returns.
pub struct Report {
    pub scores: Scores,
    /// The generated images with their prompts, in scene order.
    pub images: Vec<(String, RgbImage)>,
    pub predictions: Vec<Prediction>,
}

/// Per scene: a caption job (`cap-{id}`), one VQA job per question (`vqa-{id}-{k}`) and a
/// generation job from the caption (`gen-{id}`), all seeded `base_seed + id`.
pub fn jobs(scenes: &[Scene], set: &Path, base_seed: u64) -> Vec<Job> {
    let img = |s: &Scene| -> String { set.join(&s.image).display().to_string() };
    let mut jobs = Vec::new();
    for s in scenes {
        let seed = base_seed.wrapping_add(s.id);
        jobs.push(Job {
            job_id: format!("cap-{}", s.id),
            task: TaskParams::Caption(CaptionParams {
                image: img(s),
                seed: Some(seed),
                ..Default::default()
            }),
            deadline: None,
            submitted_at: None,
        });
        for (k, q) in s.qa.iter().enumerate() {
            jobs.push(Job {
                job_id: format!("vqa-{}-{k}", s.id),
                task: TaskParams::Vqa(VqaParams {
                    image: img(s),
                    question: q.question.clone(),
                    seed: Some(seed),
                    ..Default::default()
                }),
                deadline: None,
                submitted_at: None,
            });
        }
        jobs.push(Job {
            job_id: format!("gen-{}", s.id),
            task: TaskParams::Generate(GenerateParams {
                prompt: s.caption.clone(),
                seed: Some(seed),
                ..Default::default()
            }),
            deadline: None,
            submitted_at: None,
        });
    }
    jobs
}

/// Scores every scene from the jobs' answers: `text_of(job id)` is a succeeded caption or VQA
/// job's text, `png_of(job id)` a generation job's first image.
pub fn score<'a>(
    scenes: &[Scene],
    text_of: impl Fn(&str) -> Option<String>,
    png_of: impl Fn(&str) -> Option<&'a [u8]>,
) -> Report {
    let mut sc = Scores {
        scenes: scenes.len(),
        ..Scores::default()
    };
    let mut images = Vec::new();
    let mut predictions = Vec::new();
    let mut tally = GenTally::default();
    let mut kinds: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for s in scenes {
        let objects = parse_caption(&s.caption).map_or(0, |t| t.objects.len());
        let cap = text_of(&format!("cap-{}", s.id)).unwrap_or_default();
        sc.caption_exact += f64::from(u8::from(cap == s.caption));
        let mut qa = Vec::new();
        let (c, sh, p) = caption_attributes(&cap, &s.caption);
        sc.caption_colour += c;
        sc.caption_shape += sh;
        sc.caption_position += p;
        for (k, q) in s.qa.iter().enumerate() {
            let a = text_of(&format!("vqa-{}-{k}", s.id)).unwrap_or_default();
            let correct = a.trim() == q.answer;
            sc.vqa += f64::from(u8::from(correct));
            sc.vqa_questions += 1;
            let k = kinds
                .entry(question_kind(&q.question, objects))
                .or_default();
            k.0 += usize::from(correct);
            k.1 += 1;
            qa.push(QaPrediction {
                question: q.question.clone(),
                answer: q.answer.clone(),
                predicted: a,
                correct,
            });
        }
        let judged = match png_of(&format!("gen-{}", s.id)) {
            Some(png) => {
                let (j, rgb) = judge_png(png, &s.caption);
                if let Some(rgb) = rgb {
                    images.push((s.caption.clone(), rgb));
                }
                j
            }
            None => Judgement::default(),
        };
        tally.add(&judged);
        predictions.push(Prediction {
            id: s.id,
            image: s.image.clone(),
            caption: s.caption.clone(),
            caption_exact: cap == s.caption,
            predicted_caption: cap,
            qa,
            generation: judged,
            generation_correct: judged.correct(),
        });
    }
    let n = scenes.len().max(1) as f64;
    sc.caption_exact /= n;
    sc.caption_colour /= n;
    sc.caption_shape /= n;
    sc.caption_position /= n;
    sc.vqa /= sc.vqa_questions.max(1) as f64;
    sc.vqa_by_kind = kinds.into_iter().map(|(k, (r, a))| (k, r, a)).collect();
    tally.fill(&mut sc, n);
    Report {
        scores: sc,
        images,
        predictions,
    }
}

/// Judges one generated PNG against the scene its prompt describes.
fn judge_png(png: &[u8], caption: &str) -> (Judgement, Option<RgbImage>) {
    let Some(want) = parse_caption(caption) else {
        return (Judgement::default(), None);
    };
    match image::load_from_memory(png) {
        Ok(im) => {
            let rgb = im.to_rgb8();
            let j = judge(
                &want,
                &detect(&rgb, (rgb.width() * rgb.height()) as usize / 50),
            );
            (j, Some(rgb))
        }
        Err(_) => (Judgement::default(), None),
    }
}

#[derive(Default)]
struct GenTally {
    all: f64,
    count: f64,
    colour: f64,
    shape: f64,
    position: f64,
}

impl GenTally {
    fn add(&mut self, j: &Judgement) {
        self.all += f64::from(u8::from(j.correct()));
        self.count += f64::from(u8::from(j.count));
        self.colour += f64::from(u8::from(j.colour));
        self.shape += f64::from(u8::from(j.shape));
        self.position += f64::from(u8::from(j.position));
    }

    fn fill(&self, sc: &mut Scores, n: f64) {
        sc.generation = self.all / n;
        sc.gen_count = self.count / n;
        sc.gen_colour = self.colour / n;
        sc.gen_shape = self.shape / n;
        sc.gen_position = self.position / n;
    }
}

/// Generation scores of images generated elsewhere, with the same scene checker: `images` holds
/// `gen_{id:04}.png` for each scene (the PyTorch reference sampler writes them:
/// `tools/reference/eval_shapes.py --images DIR`). A missing image scores zero.
pub fn score_generated(set: &Path, images: &Path, limit: Option<usize>) -> Result<Scores> {
    let mut scenes = load_set(set)?;
    if let Some(n) = limit {
        scenes.truncate(n);
    }
    let mut tally = GenTally::default();
    for s in &scenes {
        let p = images.join(format!("gen_{:04}.png", s.id));
        if let Ok(png) = std::fs::read(&p) {
            tally.add(&judge_png(&png, &s.caption).0);
        }
    }
    let mut sc = Scores {
        scenes: scenes.len(),
        ..Scores::default()
    };
    tally.fill(&mut sc, scenes.len().max(1) as f64);
    Ok(sc)
}

/// A grid of images (scaled ×4), at most `cols` per row, each with its prompt printed under it;
/// also the prompts as text in reading order.
pub fn contact_sheet(images: &[(String, RgbImage)], cols: usize) -> (RgbImage, String) {
    let scale = 4u32;
    let (w, h) = images
        .first()
        .map(|(_, i)| (i.width() * scale, i.height() * scale))
        .unwrap_or((1, 1));
    let per_line = (w / font::CHAR_W).max(1) as usize;
    let text_lines = images
        .iter()
        .map(|(p, _)| font::wrap(p, per_line).len())
        .max()
        .unwrap_or(0) as u32;
    let cell_h = h + 3 + text_lines * font::LINE_H;
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let pad = 4;
    let mut sheet = RgbImage::from_pixel(
        cols as u32 * (w + pad) + pad,
        rows as u32 * (cell_h + pad) + pad,
        image::Rgb([235, 235, 235]),
    );
    let mut legend = String::new();
    for (k, (prompt, im)) in images.iter().enumerate() {
        let (cx, cy) = (
            (k % cols) as u32 * (w + pad) + pad,
            (k / cols) as u32 * (cell_h + pad) + pad,
        );
        let big = image::imageops::resize(im, w, h, image::imageops::FilterType::Nearest);
        image::imageops::overlay(&mut sheet, &big, i64::from(cx), i64::from(cy));
        for (l, line) in font::wrap(prompt, per_line).iter().enumerate() {
            font::draw_text(
                &mut sheet,
                cx,
                cy + h + 3 + l as u32 * font::LINE_H,
                line,
                image::Rgb([20, 20, 20]),
            );
        }
        legend.push_str(&format!(
            "row {} col {}: {prompt}\n",
            k / cols + 1,
            k % cols + 1
        ));
    }
    (sheet, legend)
}

/// Where the sheet and legend go.
pub fn write_sheet(out: &Path, images: &[(String, RgbImage)]) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (sheet, legend) = contact_sheet(images, 8);
    let png = out.join("contact_sheet.png");
    sheet.save(&png).map_err(|e| EvalError::Invalid {
        path: png.clone(),
        message: e.to_string(),
    })?;
    let txt = out.join("contact_sheet.txt");
    std::fs::write(&txt, legend).map_err(io(&txt))?;
    Ok((png, txt))
}

/// Writes `OUT/predictions.jsonl`: one [`Prediction`] per scene.
pub fn write_predictions(out: &Path, predictions: &[Prediction]) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let path = out.join("predictions.jsonl");
    let mut text = String::new();
    for p in predictions {
        let line = serde_json::to_string(p).map_err(|e| EvalError::Invalid {
            path: path.clone(),
            message: format!("serialising a prediction: {e}"),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_sheet_prints_each_prompt_under_its_image() {
        let red = RgbImage::from_pixel(32, 32, image::Rgb([220, 40, 40]));
        let blue = RgbImage::from_pixel(32, 32, image::Rgb([40, 80, 220]));
        let images = vec![
            ("a red square".to_string(), red),
            (
                "a blue square left of a yellow circle".to_string(),
                blue.clone(),
            ),
            ("a blue circle".to_string(), blue),
        ];
        let (sheet, legend) = contact_sheet(&images, 2);
        // 128-px cells, 21 characters per line: the longest prompt takes two lines.
        let cell_h = 128 + 3 + 2 * font::LINE_H;
        assert_eq!(sheet.dimensions(), (2 * 132 + 4, 2 * (cell_h + 4) + 4));
        let dark_in = |x0: u32, y0: u32| {
            (y0..y0 + 2 * font::LINE_H)
                .flat_map(|y| (x0..x0 + 128).map(move |x| (x, y)))
                .filter(|&(x, y)| sheet.get_pixel(x, y).0 == [20, 20, 20])
                .count()
        };
        // Text under the first, second and third image; none under the empty fourth cell.
        assert!(dark_in(4, 4 + 131) > 30);
        assert!(dark_in(136, 4 + 131 + font::LINE_H) > 30);
        assert!(dark_in(4, cell_h + 8 + 131) > 30);
        assert_eq!(dark_in(136, cell_h + 8 + 131), 0);
        assert_eq!(legend.lines().count(), 3);
        assert!(legend.starts_with("row 1 col 1: a red square"));
    }

    #[test]
    fn questions_are_grouped_by_kind_and_object_count() {
        assert_eq!(
            question_kind("is the circle left of the square?", 2),
            "is the <shape> left of the <shape>? (2 objects)"
        );
        assert_eq!(
            question_kind("what shape is the red object?", 1),
            "what shape is the <colour> object? (1 object)"
        );
        assert_eq!(
            question_kind("how many objects are there?", 2),
            "how many objects are there? (2 objects)"
        );
        let sc = Scores {
            vqa_by_kind: vec![("what colour is the <shape>? (2 objects)".into(), 3, 4)],
            ..Scores::default()
        };
        let table = sc.table();
        assert!(table.contains("what colour is the <shape>? (2 objects)"));
        assert!(table.contains("3/4    0.750"), "{table}");
        assert!(table.ends_with("caption_exact=0.000 vqa=0.000 generation=0.000\n"));
    }
}
