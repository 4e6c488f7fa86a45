//! Jobs: what a client asks for, on the queue or in a local JSONL file.

use serde::{Deserialize, Serialize};

/// One job. `params` depends on `task`; the worker validates ranges against the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Client-chosen identity, unique per job: results, S3 keys and retries are keyed on it.
    pub job_id: String,
    #[serde(flatten)]
    pub task: TaskParams,
    /// RFC 3339 time after which the job is expired without being computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// RFC 3339 time the client submitted the job (for queue-wait metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
}

/// The task and its parameters, as `{"task": "...", "params": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", content = "params", rename_all = "snake_case")]
pub enum TaskParams {
    Generate(GenerateParams),
    Caption(CaptionParams),
    Vqa(VqaParams),
}

impl TaskParams {
    pub fn name(&self) -> &'static str {
        match self {
            TaskParams::Generate(_) => "generate",
            TaskParams::Caption(_) => "caption",
            TaskParams::Vqa(_) => "vqa",
        }
    }
}

/// Text to image. Unset fields take the model's defaults (see the README).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
    /// A preset of `steps` and the three options below (each set here wins over it). Absent or
    /// `exact`: none of them, so the output is the default sampler's; `fast`: Euler, 16 steps
    /// (when `steps` is absent), `block_cache` 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<Speed>,
    /// The ODE solver. Absent: `euler` (the reference's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver: Option<Solver>,
    /// `[low, high]`: classifier-free guidance only while σ (1 → 0) lies in it; elsewhere one
    /// conditional row. Absent: guidance at every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<[f32; 2]>,
    /// Reuse the joint blocks' residual from the last computed step while the first block's
    /// residual has changed by less than this fraction (relative L1). Absent or 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_cache: Option<f32>,
}

/// Speed presets of a generate job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speed {
    Exact,
    Fast,
}

/// Flow-matching ODE solvers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    /// First order, one model pass per step (diffusers' FlowMatchEulerDiscreteScheduler).
    #[default]
    Euler,
    /// DPM-Solver++(2M): second order from the last two passes, one pass per step.
    Dpmpp2m,
}

/// Image to text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionParams {
    /// `s3://bucket/key`, a local path (or `file://` URI), or `data:image/...;base64,...`.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Canvas length in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u32>,
    /// Prompt prefix kept fixed at the start of the canvas; the caption is the text written after it.
    /// Absent: the model's default (`caption_prompt` in the package manifest, if any); `""`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Visual question answering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaParams {
    pub image: String,
    pub question: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}
