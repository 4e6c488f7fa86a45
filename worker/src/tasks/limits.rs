//! What one job may cost on this worker: caps on the parameters that multiply its work (pixels
//! per image × images × guidance rows × steps, and the caption canvas), set by the operator
//! (`--max-pixels`, `--max-images-per-job`, `--max-steps`, `--max-text-tokens`, `--max-text-chars`). A
//! job over a cap fails at admission with an `invalid_job` error that names the field, its
//! value, the cap and the flag; it is final (never retried).

use crate::error::{Result, WorkerError};

/// The caps a worker applies to each job, on top of what the model and the job schema allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Pixels per generated image (`width × height`).
    pub max_pixels: u64,
    /// Pixels of a generated image's longer side; also the largest side the TensorRT
    /// optimization profiles cover.
    pub max_side: u32,
    /// Images per generate job.
    pub max_images: u32,
    /// Sampling steps of any task.
    pub max_steps: u32,
    /// Tokens of a caption canvas (`params.length`).
    pub max_text_tokens: u32,
    /// Characters of a prompt, negative prompt or question.
    pub max_text_chars: usize,
}

impl JobLimits {
    /// The fleet defaults (the flags' defaults; the reasons are in the flags' help):
    /// 1024 × 1024 pixels, 1024 a side, 4 images, 250 steps, a 256-token caption canvas, 4000
    /// characters.
    pub const DEFAULT: Self = Self {
        max_pixels: 1024 * 1024,
        max_side: 1024,
        max_images: 4,
        max_steps: 250,
        max_text_tokens: 256,
        max_text_chars: super::MAX_TEXT_CHARS,
    };

    /// `width × height` of one image, against `--max-pixels`.
    pub fn check_pixels(&self, width: u32, height: u32) -> Result<()> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(WorkerError::invalid(
                "params.width × params.height",
                format!(
                    "{width} × {height} = {pixels} pixels per image; this worker allows at most \
                     {} (--max-pixels)",
                    self.max_pixels
                ),
            ));
        }
        Ok(())
    }

    /// A count against its cap: `field`'s `value` may be at most `cap` (set by `flag`).
    pub fn check(field: &str, value: u64, cap: u64, flag: &str) -> Result<()> {
        if value > cap {
            return Err(WorkerError::invalid(
                field,
                format!("{value} is more than this worker allows: at most {cap} ({flag})"),
            ));
        }
        Ok(())
    }

    pub fn check_images(&self, n: u32) -> Result<()> {
        let cap = u64::from(self.max_images);
        Self::check("params.num_images", n.into(), cap, "--max-images-per-job")
    }

    pub fn check_steps(&self, n: u32) -> Result<()> {
        let cap = u64::from(self.max_steps);
        Self::check("params.steps", n.into(), cap, "--max-steps")
    }

    pub fn check_text_tokens(&self, n: u32) -> Result<()> {
        let cap = u64::from(self.max_text_tokens);
        Self::check("params.length", n.into(), cap, "--max-text-tokens")
    }

    /// Characters of `text` in `field`.
    pub fn check_chars(&self, field: &str, text: &str) -> Result<()> {
        let n = text.chars().count() as u64;
        Self::check(field, n, self.max_text_chars as u64, "--max-text-chars")
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<()>) -> (String, String) {
        match r {
            Err(WorkerError::InvalidJob { field, message }) => (field, message),
            other => panic!("expected an invalid job, got {other:?}"),
        }
    }

    #[test]
    fn a_value_at_its_cap_passes_and_one_over_names_the_field_the_cap_and_the_flag() {
        let l = JobLimits::DEFAULT;
        assert!(l.check_pixels(1024, 1024).is_ok());
        assert!(l.check_pixels(2048, 512).is_ok());
        let (field, m) = message(l.check_pixels(1024, 1032));
        assert_eq!(field, "params.width × params.height");
        assert!(
            m.contains("1056768 pixels") && m.contains("1048576 (--max-pixels)"),
            "{m}"
        );

        assert!(l.check_images(4).is_ok());
        let (field, m) = message(l.check_images(5));
        assert_eq!(field, "params.num_images");
        assert!(m.contains("at most 4 (--max-images-per-job)"), "{m}");

        assert!(l.check_steps(250).is_ok());
        assert_eq!(message(l.check_steps(251)).0, "params.steps");
        assert!(l.check_text_tokens(256).is_ok());
        assert_eq!(message(l.check_text_tokens(257)).0, "params.length");
        assert!(l.check_chars("params.prompt", &"é".repeat(4000)).is_ok());
        let (field, m) = message(l.check_chars("params.prompt", &"é".repeat(4001)));
        assert_eq!(field, "params.prompt");
        assert!(m.contains("4001") && m.contains("--max-text-chars"), "{m}");
    }

    #[test]
    fn the_largest_sides_do_not_overflow() {
        let l = JobLimits::DEFAULT;
        assert!(l.check_pixels(u32::MAX, u32::MAX).is_err());
    }
}
