//! The caps on one job's cost, shared by every command that runs jobs. A job's work grows with
//! pixels per image × images × guidance rows (2) × steps; the job schema alone allows the
//! model's whole position table (3072 px a side for D-DiT) × 8 images × 1000 steps, which no
//! fleet wants from one message. A job over a cap fails once with `invalid_job`, naming the
//! field, the cap and the flag.

use clap::Args;
use ddit_worker::tasks::{JobLimits, MAX_TEXT_CHARS};

const D: JobLimits = JobLimits::DEFAULT;

#[derive(Args, Clone)]
pub struct LimitArgs {
    /// Most pixels (width × height) of one generated image. Default 1024 × 1024: four times
    /// D-DiT's native 512 × 512 (4096 image tokens, whose attention grows with their square).
    #[arg(long, default_value_t = D.max_pixels, env = "DDIT_MAX_PIXELS")]
    max_pixels: u64,
    /// Most pixels of a generated image's side; also what the TensorRT optimization profiles
    /// cover (with `--max-batch`). Default 1024: D-DiT's 512 native side doubled, the size
    /// whose activations fit a 40 GB card at the default batch (docs/deploy.md).
    #[arg(long, default_value_t = D.max_side, env = "DDIT_MAX_SIDE")]
    max_side: u32,
    /// Most images one generate job may ask for (each is a whole sampling chain of up to two
    /// rows). Default 4: what image UIs offer per request; 8 would fill an 8-row batch alone.
    #[arg(long, default_value_t = D.max_images, env = "DDIT_MAX_IMAGES_PER_JOB")]
    max_images_per_job: u32,
    /// Most sampling steps of any task. Default 250: about 9 × generation's 28 and 4 ×
    /// captioning's 64, far past where either sampler still improves.
    #[arg(long, default_value_t = D.max_steps, env = "DDIT_MAX_STEPS")]
    max_steps: u32,
    /// Most tokens of a caption canvas a job may ask for (`params.length`; the model's own
    /// default is always allowed). Default 256: twice D-DiT's 128.
    #[arg(long, default_value_t = D.max_text_tokens, env = "DDIT_MAX_TEXT_TOKENS")]
    max_text_tokens: u32,
    /// Most characters of a prompt, negative prompt or question (at most the schema's 4000).
    /// Default 4000: a prompt is cut to the model's prompt tokens anyway, so its length costs
    /// only tokenisation.
    #[arg(long, default_value_t = D.max_text_chars, env = "DDIT_MAX_TEXT_CHARS")]
    max_text_chars: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> JobLimits {
        JobLimits {
            max_pixels: self.max_pixels,
            max_side: self.max_side,
            max_images: self.max_images_per_job,
            max_steps: self.max_steps,
            max_text_tokens: self.max_text_tokens,
            max_text_chars: self.max_text_chars.min(MAX_TEXT_CHARS),
        }
    }
}
