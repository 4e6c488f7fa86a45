//! [`Model::velocity_cached`](crate::runner::Model::velocity_cached) on the engine: the first
//! joint-block file (block 0 alone, as `ddit-export` writes it) runs for every row; the other
//! blocks run only for the rows whose cache misses, as one smaller batch.

use super::session::Input;
use super::{take, Engine, Stream};
use crate::error::{Result, WorkerError};
use crate::runner::BlockCache;
use crate::tensor::Tensor;

impl Engine {
    pub(super) fn velocity_cached_host(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        caches: &mut [BlockCache],
    ) -> Result<Tensor> {
        let n = latents.batch();
        if caches.len() != n || self.joint_blocks.is_empty() {
            return Err(WorkerError::Internal(format!(
                "block cache: {} caches for {n} rows, {} joint-block files",
                caches.len(),
                self.joint_blocks.len()
            )));
        }
        let temb = self.time_embed(timesteps)?;
        let x0 = self.patch_embed(latents)?;
        let inputs = vec![Input::F32(&x0), Input::F32(context), Input::F32(&temb)];
        let mut out = self.joint_blocks[0].run(inputs)?;
        let x1 = take(&mut out, "joint_blocks")?;
        let y1 = take(&mut out, "joint_blocks")?;
        let m = x1.row_len();
        let mut x = x1.clone();
        // Nothing in `caches` changes until the pass has succeeded: a failed pass is retried
        // row by row and must find each cache as it was.
        let mut misses = Vec::new();
        for (i, cache) in caches.iter().enumerate() {
            let row = i * m..(i + 1) * m;
            let probe: Vec<f32> = x1.data[row.clone()]
                .iter()
                .zip(&x0.data[row.clone()])
                .map(|(a, b)| a - b)
                .collect();
            match cache.hit(&probe) {
                Some(rest) => {
                    for (xi, r) in x.data[row].iter_mut().zip(rest) {
                        *xi += r;
                    }
                }
                None => misses.push((i, probe)),
            }
        }
        let mut stores = Vec::with_capacity(misses.len());
        if !misses.is_empty() {
            let pick = |t: &Tensor| -> Result<Tensor> {
                let rows: Vec<Tensor> = misses.iter().map(|(i, _)| t.row(*i)).collect();
                Tensor::cat(&rows.iter().collect::<Vec<_>>())
            };
            let outs = if misses.len() == n {
                self.blocks_from(1, &x1, &y1, &temb, Stream::Image)?
            } else {
                let (xs, ys, ts) = (pick(&x1)?, pick(&y1)?, pick(&temb)?);
                self.blocks_from(1, &xs, &ys, &ts, Stream::Image)?
            };
            for (k, (i, probe)) in misses.into_iter().enumerate() {
                let (row, out) = (i * m..(i + 1) * m, &outs.data[k * m..(k + 1) * m]);
                let rest = out.iter().zip(&x1.data[row.clone()]).map(|(o, a)| o - a);
                stores.push((i, probe, rest.collect::<Vec<f32>>()));
                x.data[row].copy_from_slice(out);
            }
        }
        let v = self.image_head(&x, &temb, latents)?;
        let computed: Vec<usize> = stores.iter().map(|(i, _, _)| *i).collect();
        for (i, probe, rest) in stores {
            caches[i].store(probe, rest);
        }
        for (i, cache) in caches.iter_mut().enumerate() {
            if !computed.contains(&i) {
                cache.skipped += 1;
            }
        }
        Ok(v)
    }
}
