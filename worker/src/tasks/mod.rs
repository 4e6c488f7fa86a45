//! Task parameters: defaults from the paper and the manifest, validated with errors that name
//! the field and its allowed range.

pub mod input;
mod limits;
mod speed;

use ddit_schemas::{GenerateParams, Job, Manifest, TaskParams};

use crate::error::{Result, WorkerError};
use crate::sampler::rng::seed_from_job_id;
pub use limits::JobLimits;
pub use speed::SpeedOptions;

/// D-DiT's defaults (the paper's settings).
pub const GENERATE_STEPS: u32 = 28;
pub const GENERATE_GUIDANCE: f32 = 7.0;
pub const CAPTION_STEPS: u32 = 64;
pub const VQA_STEPS: u32 = 32;
pub const MAX_STEPS: u32 = 1000;
pub const MAX_GUIDANCE: f32 = 30.0;
pub const MAX_IMAGES: u32 = 8;
pub const MAX_TEXT_CHARS: usize = 4000;
pub const MAX_CANVAS: u32 = 1024;

/// The VQA prompt of `ddit-model.md`.
pub fn vqa_prompt(question: &str) -> String {
    format!("Q: {question} Answer the question using a single word or phrase. A: ")
}

/// Sizes the model accepts, from the manifest.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Pixels per side of the training resolution.
    pub native: u32,
    /// Width and height must be multiples of this (VAE factor × patch size).
    pub multiple: u32,
    /// Largest side the position table covers.
    pub max: u32,
    pub vae_factor: u32,
}

impl Geometry {
    pub fn of(m: &Manifest) -> Self {
        let v = &m.values;
        let f = v.vae.downsample_factor as u32;
        let p = v.patch_size as u32;
        Self {
            native: v.sample_size as u32 * f,
            multiple: f * p,
            max: v.pos_embed_max_size as u32 * p * f,
            vae_factor: f,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratePlan {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub num_images: u32,
    pub speed: SpeedOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CaptionPlan {
    pub image: String,
    pub steps: u32,
    pub length: u32,
    pub prompt: Option<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VqaPlan {
    pub image: String,
    pub question: String,
    pub steps: u32,
    pub length: u32,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Generate(GeneratePlan),
    Caption(CaptionPlan),
    Vqa(VqaPlan),
}

impl Plan {
    pub fn task(&self) -> &'static str {
        match self {
            Plan::Generate(_) => "generate",
            Plan::Caption(_) => "caption",
            Plan::Vqa(_) => "vqa",
        }
    }
}

fn range_u32(field: &str, v: Option<u32>, default: u32, lo: u32, hi: u32) -> Result<u32> {
    let v = v.unwrap_or(default);
    if v < lo || v > hi {
        return Err(WorkerError::invalid(
            field,
            format!("{v} is outside the allowed range {lo}..={hi}"),
        ));
    }
    Ok(v)
}

fn text(field: &str, s: &str, allow_empty: bool, limits: &JobLimits) -> Result<()> {
    if !allow_empty && s.trim().is_empty() {
        return Err(WorkerError::invalid(field, "must not be empty"));
    }
    if s.chars().count() > MAX_TEXT_CHARS {
        return Err(WorkerError::invalid(
            field,
            format!("longer than {MAX_TEXT_CHARS} characters"),
        ));
    }
    limits.check_chars(field, s)
}

/// `params.steps` (or `default`) in the schema's range, then against this worker's cap.
fn steps(v: Option<u32>, default: u32, limits: &JobLimits) -> Result<u32> {
    let n = range_u32("params.steps", v, default, 1, MAX_STEPS)?;
    limits.check_steps(n)?;
    Ok(n)
}

/// Checks a job id (also used in output keys and Redis keys).
pub fn validate_job_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(WorkerError::invalid(
            "job_id",
            "1-128 characters from [A-Za-z0-9_.:-], starting with a letter or digit",
        ))
    }
}

/// A generate job's plan: its texts, guidance, sizes, images and speed options, against the
/// model and this worker's `limits`.
fn plan_generate(
    p: &GenerateParams,
    m: &Manifest,
    limits: &JobLimits,
    default_seed: u64,
) -> Result<GeneratePlan> {
    let g = Geometry::of(m);
    text("params.prompt", &p.prompt, false, limits)?;
    let negative_prompt = p.negative_prompt.clone().unwrap_or_default();
    text("params.negative_prompt", &negative_prompt, true, limits)?;
    let guidance = p.guidance.unwrap_or(GENERATE_GUIDANCE);
    if !guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance) {
        return Err(WorkerError::invalid(
            "params.guidance",
            format!("{guidance} is outside the allowed range 0..={MAX_GUIDANCE}"),
        ));
    }
    let side = |field: &str, v: Option<u32>| -> Result<u32> {
        let v = v.unwrap_or(g.native);
        if v < g.multiple || v > g.max || !v.is_multiple_of(g.multiple) {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{v} must be a multiple of {} between {} and {} pixels",
                    g.multiple, g.multiple, g.max
                ),
            ));
        }
        JobLimits::check(field, v.into(), limits.max_side.into(), "--max-side")?;
        Ok(v)
    };
    let (width, height) = (
        side("params.width", p.width)?,
        side("params.height", p.height)?,
    );
    limits.check_pixels(width, height)?;
    let num_images = range_u32("params.num_images", p.num_images, 1, 1, MAX_IMAGES)?;
    limits.check_images(num_images)?;
    let (speed, default_steps) = SpeedOptions::of(p, GENERATE_STEPS)?;
    let speed = speed.fit(p, m)?;
    Ok(GeneratePlan {
        prompt: p.prompt.clone(),
        negative_prompt,
        steps: steps(p.steps, default_steps, limits)?,
        guidance,
        width,
        height,
        seed: p.seed.unwrap_or(default_seed),
        num_images,
        speed,
    })
}

/// Validates a job against the model and this worker's `limits`, and fills in defaults.
pub fn plan(job: &Job, m: &Manifest, limits: &JobLimits) -> Result<Plan> {
    validate_job_id(&job.job_id)?;
    let default_seed = seed_from_job_id(&job.job_id);
    match &job.task {
        TaskParams::Generate(p) => plan_generate(p, m, limits, default_seed).map(Plan::Generate),
        TaskParams::Caption(p) => {
            input::check_uri("params.image", &p.image)?;
            if let Some(pr) = &p.prompt {
                text("params.prompt", pr, true, limits)?;
            }
            let default_length = m.values.text_lengths.caption as u32;
            let length = range_u32("params.length", p.length, default_length, 1, MAX_CANVAS)?;
            // The model's own default canvas is always allowed; a longer one asked for is capped.
            if p.length.is_some() && length > default_length {
                limits.check_text_tokens(length)?;
            }
            Ok(Plan::Caption(CaptionPlan {
                image: p.image.clone(),
                steps: steps(p.steps, CAPTION_STEPS, limits)?,
                length,
                // Absent: the model's default prefix; "": none.
                prompt: p
                    .prompt
                    .clone()
                    .or_else(|| m.values.caption_prompt.clone())
                    .filter(|s| !s.is_empty()),
                seed: p.seed.unwrap_or(default_seed),
            }))
        }
        TaskParams::Vqa(p) => {
            input::check_uri("params.image", &p.image)?;
            text("params.question", &p.question, false, limits)?;
            Ok(Plan::Vqa(VqaPlan {
                image: p.image.clone(),
                question: p.question.clone(),
                steps: steps(p.steps, VQA_STEPS, limits)?,
                length: m.values.text_lengths.vqa as u32,
                seed: p.seed.unwrap_or(default_seed),
            }))
        }
    }
}
