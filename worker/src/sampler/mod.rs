//! D-DiT's samplers, exactly as `ddit-model.md` defines them, independent of ONNX Runtime.
//!
//! Each sampler is a per-job state machine that asks for one model call per step (or none, when
//! the masked-diffusion cache holds); the runner makes those calls through its `Model` trait and
//! batches them across jobs. Samplers see only [`crate::tensor::Tensor`] and slices of model
//! output, and every random draw comes from the job's own [`rng::JobRng`], so a job gives the
//! same output alone or inside a batch.

pub mod flow;
pub mod masked;
pub mod rng;
