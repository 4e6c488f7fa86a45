//! [`Model::velocity_cached`](crate::runner::Model::velocity_cached) on the engine: the first
//! joint-block file (block 0 alone, as `ddit-export` writes it) runs for every row; the other
//! blocks run only for the rows whose cache misses, as one smaller batch.

use super::session::Input;
use super::{take, Engine, Stream};
use crate::error::{Result, WorkerError};
use crate::runner::{BlockCache, CacheUpdate};
use crate::tensor::Tensor;

fn same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    match a.shape == b.shape {
        true => Ok(()),
        false => Err(WorkerError::Internal(format!(
            "block cache: {what} {:?} against {:?}",
            a.shape, b.shape
        ))),
    }
}

impl Engine {
    pub(super) fn velocity_cached_host(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        caches: &[&BlockCache],
    ) -> Result<(Tensor, Vec<CacheUpdate>)> {
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
        let mut x = take(&mut out, "joint_blocks")?;
        let y1 = take(&mut out, "joint_blocks")?;
        same_shape("block 0's image stream", &x, &x0)?;
        let m = x.row_len();
        // Rows that hit get their cached residual added in place; the others are computed.
        let mut updates = Vec::with_capacity(n);
        let mut misses = Vec::new();
        for (i, cache) in caches.iter().enumerate() {
            let row = i * m..(i + 1) * m;
            if !cache.on() {
                misses.push(i);
                updates.push(CacheUpdate::None);
                continue;
            }
            let probe: Vec<f32> = x.data[row.clone()]
                .iter()
                .zip(&x0.data[row.clone()])
                .map(|(a, b)| a - b)
                .collect();
            if let Some(rest) = cache.hit(&probe) {
                x.data[row]
                    .iter_mut()
                    .zip(rest)
                    .for_each(|(xi, r)| *xi += r);
                updates.push(CacheUpdate::Skipped);
            } else {
                misses.push(i);
                let rest = Vec::new();
                updates.push(CacheUpdate::Store { probe, rest });
            }
        }
        if !misses.is_empty() {
            let outs = if misses.len() == n {
                self.blocks_from(1, &x, &y1, &temb, Stream::Image)?
            } else {
                let pick = |t: &Tensor| -> Result<Tensor> {
                    let rows: Vec<Tensor> = misses.iter().map(|&i| t.row(i)).collect();
                    Tensor::cat(&rows.iter().collect::<Vec<_>>())
                };
                let (xs, ys, ts) = (pick(&x)?, pick(&y1)?, pick(&temb)?);
                self.blocks_from(1, &xs, &ys, &ts, Stream::Image)?
            };
            if outs.data.len() != misses.len() * m {
                return Err(WorkerError::Internal(format!(
                    "block cache: image stream {:?} for {} rows",
                    outs.shape,
                    misses.len()
                )));
            }
            for (k, &i) in misses.iter().enumerate() {
                let (row, out) = (i * m..(i + 1) * m, &outs.data[k * m..(k + 1) * m]);
                if let CacheUpdate::Store { rest, .. } = &mut updates[i] {
                    *rest = out
                        .iter()
                        .zip(&x.data[row.clone()])
                        .map(|(o, a)| o - a)
                        .collect();
                }
                x.data[row].copy_from_slice(out);
            }
        }
        Ok((self.image_head(&x, &temb, latents)?, updates))
    }
}
