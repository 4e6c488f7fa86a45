//! What the runner needs from a model: the per-job encoders and the per-step forward of each
//! task. Every method is batch-first, and row `i` of an output depends only on row `i` of the
//! inputs, so batching never changes a job's numbers.

use ddit_schemas::Manifest;

use crate::error::Result;
use crate::tensor::Tensor;

pub trait Model {
    /// The package's manifest: the model's values and identity.
    fn manifest(&self) -> &Manifest;
    /// The execution provider reported in results (`cpu`, `cuda`, `tensorrt`).
    fn provider(&self) -> &str;
    /// Token ids `[B][L]` (equal lengths) -> text stream `[B, L, D]`.
    fn encode_text(&mut self, ids: &[Vec<i64>]) -> Result<Tensor>;
    /// Image in [-1, 1] `[B, 3, H, W]` -> (posterior mean, logvar) in VAE space.
    fn vae_encode(&mut self, image: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Clean latents `[B, C, h, w]` (model space) -> (image stream `[B, T, D]`, temb at t = 0).
    fn encode_image(&mut self, latents: &Tensor) -> Result<(Tensor, Tensor)>;
    /// VAE-space latents -> image in [-1, 1].
    fn vae_decode(&mut self, z: &Tensor) -> Result<Tensor>;
    /// Text to image, one step: latents `[N, C, h, w]`, text stream `[N, L, D]`, one timestep
    /// per row on the 0..num_train_timesteps scale -> velocities `[N, C, h, w]`.
    fn velocity(&mut self, latents: &Tensor, context: &Tensor, timesteps: &[f32])
        -> Result<Tensor>;
    /// Captioning and VQA, one step: image stream `[N, T, D]`, temb `[N, D]`, canvases `[N][L]`,
    /// and the positions of each canvas whose logits are wanted (its masked ones, ascending) ->
    /// logits `[1, M, V]`, M the number of positions, row `i`'s positions first.
    fn logits(
        &mut self,
        image_tokens: &Tensor,
        temb: &Tensor,
        ids: &[Vec<i64>],
        positions: &[Vec<usize>],
    ) -> Result<Tensor>;
}
