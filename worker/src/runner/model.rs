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
    /// [`Model::velocity`] with a block cache per row: row `i` runs the first joint block, then
    /// either the rest or, when [`BlockCache::hit`] says so, reuses the rest's residual from its
    /// last computed step. Rows that compute give exactly [`Model::velocity`]'s numbers. The
    /// caches are only read: the returned updates (one per row) are committed by the caller once
    /// the whole step has succeeded, so that a failed pass retried row by row finds them as
    /// they were.
    fn velocity_cached(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        caches: &[&BlockCache],
    ) -> Result<(Tensor, Vec<CacheUpdate>)>;
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

/// One row's block cache (FirstBlockCache): the first joint block's image-stream residual at
/// the last step that ran every block, and what the other blocks then added to its output.
#[derive(Debug, Clone, Default)]
pub struct BlockCache {
    /// Skip when the residual's relative L1 change is below this (0: never).
    pub threshold: f32,
    probe: Option<Vec<f32>>,
    rest: Option<Vec<f32>>,
    /// Steps that skipped the blocks.
    pub skipped: u32,
}

/// What a step did with a row's [`BlockCache`].
#[derive(Debug)]
pub enum CacheUpdate {
    /// The row ran every block without a cache (threshold 0).
    None,
    /// The row ran every block: its first-block residual and the other blocks' residual.
    Store { probe: Vec<f32>, rest: Vec<f32> },
    /// The row skipped the blocks after the first.
    Skipped,
}

impl BlockCache {
    /// A row without a cache.
    pub const OFF: Self = Self {
        threshold: 0.0,
        probe: None,
        rest: None,
        skipped: 0,
    };

    pub fn new(threshold: f32) -> Self {
        Self {
            threshold,
            ..Self::default()
        }
    }

    pub fn on(&self) -> bool {
        self.threshold > 0.0
    }

    /// The cached residual of the other blocks, when `probe` (this step's first-block
    /// residual) is within the threshold of the last computed step's.
    pub fn hit(&self, probe: &[f32]) -> Option<&[f32]> {
        let (last, rest) = (self.probe.as_deref()?, self.rest.as_deref()?);
        if !self.on() || last.len() != probe.len() || rest.len() != probe.len() {
            return None;
        }
        let (mut diff, mut norm) = (0f64, 0f64);
        for (a, b) in probe.iter().zip(last) {
            diff += f64::from((a - b).abs());
            norm += f64::from(b.abs());
        }
        (diff < f64::from(self.threshold) * norm).then_some(rest)
    }

    /// Records what a step that succeeded did.
    pub fn commit(&mut self, update: CacheUpdate) {
        match update {
            CacheUpdate::None => {}
            CacheUpdate::Store { probe, rest } => {
                (self.probe, self.rest) = (Some(probe), Some(rest))
            }
            CacheUpdate::Skipped => self.skipped += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(threshold: f32, probe: Vec<f32>) -> BlockCache {
        let mut c = BlockCache::new(threshold);
        let rest = vec![9.0; probe.len()];
        c.commit(CacheUpdate::Store { probe, rest });
        c
    }

    #[test]
    fn a_hit_needs_a_stored_step_a_threshold_and_a_change_below_it() {
        assert!(BlockCache::new(0.5).hit(&[1.0]).is_none(), "nothing stored");
        assert!(stored(0.0, vec![1.0]).hit(&[1.0]).is_none(), "threshold 0");
        assert!(
            stored(0.5, vec![1.0, 1.0]).hit(&[1.0]).is_none(),
            "another length"
        );
        // |Δ| = 0.5 against |last| = 2: exactly the threshold, a miss; 0.25 below it, a hit.
        let c = stored(0.25, vec![1.0, -1.0]);
        assert!(
            c.hit(&[1.25, -0.75]).is_none(),
            "at the threshold is a miss"
        );
        assert_eq!(c.hit(&[1.125, -0.875]), Some(&[9.0, 9.0][..]));
        // A zero residual never hits (0 < 0 is false), so a dead row recomputes.
        assert!(stored(0.5, vec![0.0, 0.0]).hit(&[0.0, 0.0]).is_none());
    }

    #[test]
    fn commits_store_and_count() {
        let mut c = BlockCache::new(0.5);
        c.commit(CacheUpdate::None);
        assert!(c.hit(&[1.0]).is_none());
        c.commit(CacheUpdate::Store {
            probe: vec![1.0],
            rest: vec![2.0],
        });
        c.commit(CacheUpdate::Skipped);
        assert_eq!((c.hit(&[1.0]), c.skipped), (Some(&[2.0][..]), 1));
    }
}
