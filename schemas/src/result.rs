//! Results: one per job, the source of truth for its outcome.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub job_id: String,
    pub status: Status,
    /// `generate`, `caption` or `vqa` (absent when the job could not be parsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Images written (generate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output>,
    /// The caption or the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Deliveries of the job this worker counted, the one that ended it included (the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    pub model: ModelRef,
    /// RFC 3339.
    pub finished_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// `s3://bucket/key` under the service, or a path relative to the output folder locally.
    pub uri: String,
    pub width: u32,
    pub height: u32,
    /// sha256 of the PNG bytes.
    pub sha256: String,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub queue_ms: u64,
    pub run_ms: u64,
    pub steps: u32,
    /// Largest number of jobs that shared a forward pass with this one.
    pub batch_size: u32,
    /// Where the nodes ran, read from the sessions: every execution provider that ran one,
    /// joined by `+` (`cpu`, `cuda`, `tensorrt+cuda`, `cuda+cpu` without strict placement).
    pub execution_provider: String,
    /// Model rows (an image's conditional or unconditional velocity at one step) that skipped
    /// the joint blocks after the first through the block cache (`params.block_cache`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_rows: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Error kinds form a small fixed set: they drive ack / retry / dead-letter and label metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The job does not parse or a parameter is out of range.
    InvalidJob,
    /// The input image cannot be read, decoded or is too large.
    InvalidInput,
    /// The input object or file does not exist.
    InputNotFound,
    /// The model failed while running (not the job's fault).
    ModelError,
    /// A dependency (S3, Redis, broker) is unavailable; retrying may succeed.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::InputNotFound => "input_not_found",
            ErrorKind::ModelError => "model_error",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether a retry of the same job may succeed.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    pub message: String,
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub name: String,
    pub hash: String,
}
