//! D-DiT's samplers, exactly as `ddit-model.md` defines them, independent of ONNX Runtime.
//!
//! Each sampler is a per-job state machine that asks for one model call per step (or none, when
//! the masked-diffusion cache holds); the runner batches those calls across jobs. The samplers
//! see the model only through [`FlowModel`] and [`MaskedModel`], and every random draw comes from
//! the job's own [`rng::JobRng`], so a job gives the same output alone or inside a batch.

pub mod flow;
pub mod masked;
pub mod rng;

use crate::engine::Tensor;
use crate::error::Result;

/// "Give me velocities for this batch": latents `[N, C, h, w]`, text stream `[N, L, D]`,
/// one timestep per row on the 0..num_train_timesteps scale.
pub trait FlowModel {
    fn velocity(&mut self, latents: &Tensor, context: &Tensor, timesteps: &[f32])
        -> Result<Tensor>;
}

/// "Give me token logits for this batch": image stream `[N, T, D]` and temb `[N, D]` of clean
/// images (timestep 0), canvases of token ids `[N][L]`. Returns `[N, L, V]`.
pub trait MaskedModel {
    fn logits(&mut self, image_tokens: &Tensor, temb: &Tensor, ids: &[Vec<i64>]) -> Result<Tensor>;
}
