//! [`Model::velocity_cached`](crate::runner::Model::velocity_cached) on the engine: the first
//! joint-block file (block 0 alone, as `ddit-export` writes it) runs for every row; the other
//! blocks run only for the rows whose cache misses, as one smaller batch.

use super::session::Input;
use super::{take, Engine, Stream};
use crate::error::{Result, WorkerError};
use crate::runner::{BlockCache, CacheUpdate};
use crate::tensor::Tensor;

/// An error unless `t` is `[n, ...]` with `want`'s dims after the batch axis (`want` `None`:
/// any).
fn check(what: &str, t: &Tensor, n: usize, want: Option<&Tensor>) -> Result<()> {
    let rows_ok = t.batch() == n;
    let dims_ok = want.is_none_or(|w| t.shape.get(1..) == w.shape.get(1..));
    match rows_ok && dims_ok {
        true => Ok(()),
        false => Err(WorkerError::Internal(format!(
            "block cache: {what} {:?} for {n} rows",
            t.shape
        ))),
    }
}

/// Each row's decision: a row whose cache hits gets its cached residual added to `x` (block
/// 0's output) in place; the others are misses, to be computed. One update per row.
fn decide(x: &mut Tensor, x0: &Tensor, caches: &[&BlockCache]) -> (Vec<CacheUpdate>, Vec<usize>) {
    let m = x.row_len();
    let mut updates = Vec::with_capacity(caches.len());
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
    (updates, misses)
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
        check("patch embedding", &x0, n, None)?;
        check("block 0's image stream", &x, n, Some(&x0))?;
        check("block 0's text stream", &y1, n, None)?;
        check("timestep embedding", &temb, n, None)?;
        let (mut updates, misses) = decide(&mut x, &x0, caches);
        if !misses.is_empty() {
            self.blocks_for(&misses, &mut x, &y1, &temb, &mut updates)?;
        }
        Ok((self.image_head(&x, &temb, latents)?, updates))
    }

    /// The blocks after the first for the `misses` rows of (`x`, `y`, `temb`), as one batch:
    /// their image stream replaces theirs in `x`, and what the blocks added goes into their
    /// `Store` updates.
    fn blocks_for(
        &mut self,
        misses: &[usize],
        x: &mut Tensor,
        y: &Tensor,
        temb: &Tensor,
        updates: &mut [CacheUpdate],
    ) -> Result<()> {
        let outs = if misses.len() == x.batch() {
            self.blocks_from(1, x, y, temb, Stream::Image)?
        } else {
            let pick = |t: &Tensor| -> Result<Tensor> {
                let rows: Vec<Tensor> = misses.iter().map(|&i| t.row(i)).collect();
                Tensor::cat(&rows.iter().collect::<Vec<_>>())
            };
            let (xs, ys, ts) = (pick(x)?, pick(y)?, pick(temb)?);
            self.blocks_from(1, &xs, &ys, &ts, Stream::Image)?
        };
        check("the blocks' image stream", &outs, misses.len(), Some(x))?;
        let m = x.row_len();
        for (k, &i) in misses.iter().enumerate() {
            let (row, out) = (i * m..(i + 1) * m, &outs.data[k * m..(k + 1) * m]);
            if let Some(CacheUpdate::Store { rest, .. }) = updates.get_mut(i) {
                *rest = out
                    .iter()
                    .zip(&x.data[row.clone()])
                    .map(|(o, a)| o - a)
                    .collect();
            }
            x.data[row].copy_from_slice(out);
        }
        Ok(())
    }
}
