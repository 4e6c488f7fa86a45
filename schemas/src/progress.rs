//! Progress events, published on `{prefix}:progress:{job_id}` while a job runs.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub job_id: String,
    /// Sampler steps done (summed over the images of a generation job).
    pub step: u64,
    /// Steps in all (0 when unknown in advance: masked diffusion may finish early).
    pub total: u64,
}
