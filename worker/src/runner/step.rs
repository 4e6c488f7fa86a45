//! One tick: cancellations, cached masked steps, one forward pass per group chunk, then results
//! for the jobs that ended and progress for the rest.

use std::collections::BTreeMap;
use std::time::Instant;

use ddit_schemas::Status;

use super::work::{GroupKey, Work};
use super::{BlockCache, Hooks, ImageSink, Model, Runner};
use crate::error::{Result, WorkerError};
use crate::tensor::Tensor;

/// The cache lent to a row of a job without one.
static NO_CACHE: BlockCache = BlockCache::OFF;

/// (index of the active job, index of its image) for each row of a forward pass.
type Rows = Vec<(usize, usize)>;

/// A caught panic as an error that names where it happened and what it said.
pub(super) fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> WorkerError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    WorkerError::Internal(format!("panic in {what}: {msg}"))
}

impl<M: Model> Runner<'_, M> {
    /// One step for every active job.
    pub(super) fn tick(&mut self, sink: &mut dyn ImageSink, hooks: &mut dyn Hooks) {
        self.drop_ended(hooks);
        // Masked jobs whose cache holds advance without the model.
        for a in &mut self.active {
            if let Work::Masked { state, .. } = &mut a.work {
                if !state.needs_forward() {
                    state.advance();
                }
            }
        }
        let mut failed: BTreeMap<usize, WorkerError> = BTreeMap::new();
        for (key, rows) in self.groups() {
            for chunk in rows.chunks(self.cfg.max_batch.max(1)) {
                let Some(Err(e)) = self.guarded(&key, chunk, hooks, true) else {
                    continue;
                };
                if chunk.len() == 1 {
                    failed.entry(chunk[0].0).or_insert(e);
                    continue;
                }
                // One bad row must not fail its neighbours: each row again, alone. A failure
                // happens before any row is updated, so the retried rows step exactly once. The
                // retries report no failure of their own: one failing pass is one fault.
                tracing::warn!(
                    rows = chunk.len(),
                    "batched step failed, retrying rows alone: {e}"
                );
                for row in chunk {
                    match self.guarded(&key, std::slice::from_ref(row), hooks, false) {
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            failed.entry(row.0).or_insert(e);
                        }
                        // Halted by a device fault (this pass's, or another runner's): a row of
                        // the failing pass is charged like a retried one, so that a job that
                        // breaks devices runs out of attempts instead of going back free.
                        None => {
                            if let WorkerError::Device { context, message } = &e {
                                failed.entry(row.0).or_insert(WorkerError::Device {
                                    context: context.clone(),
                                    message: message.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        self.settle(failed, sink, hooks);
    }

    /// [`Self::forward`], with a panic turned into an error: the thread and the other jobs live
    /// on. A failure is reported to `hooks` when `report`; `None` (no pass) once they say the
    /// runner is halted.
    fn guarded(
        &mut self,
        key: &GroupKey,
        chunk: &[(usize, usize)],
        hooks: &mut dyn Hooks,
        report: bool,
    ) -> Option<Result<()>> {
        if hooks.halted() {
            return None;
        }
        #[cfg(feature = "fault-injection")]
        let poisoned = chunk
            .iter()
            .any(|&(ai, _)| self.active[ai].job.job_id.contains("ddit-inject-panic"));
        let run = std::panic::AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            assert!(!poisoned, "injected panic (the fault-injection feature)");
            #[cfg(feature = "fault-injection")]
            if let Some(e) = self.injected(chunk) {
                return Err(e);
            }
            self.forward(key, chunk, hooks)
        });
        let res =
            std::panic::catch_unwind(run).unwrap_or_else(|p| Err(panicked("a step", p.as_ref())));
        if let (true, Err(e)) = (report, &res) {
            hooks.failure(e);
        }
        Some(res)
    }

    /// Test-only faults (the `fault-injection` feature), by job id: `ddit-inject-oom` fails its
    /// pass as an allocation that failed; `ddit-inject-device` fails its pass as a lost GPU
    /// does, and every pass of this process after it (CUDA's errors are sticky).
    #[cfg(feature = "fault-injection")]
    fn injected(&self, chunk: &[(usize, usize)]) -> Option<WorkerError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        static DEVICE_LOST: AtomicBool = AtomicBool::new(false);
        let holds = |marker: &str| {
            chunk
                .iter()
                .any(|&(ai, _)| self.active[ai].job.job_id.contains(marker))
        };
        if holds("ddit-inject-device") {
            DEVICE_LOST.store(true, Ordering::SeqCst);
        }
        if DEVICE_LOST.load(Ordering::SeqCst) {
            let lost = "CUDA failure 700: an illegal memory access was encountered ; GPU=0";
            return Some(WorkerError::runtime("joint_blocks (injected)", lost));
        }
        let oom = "Failed to allocate memory for requested buffer of size 1073741824";
        holds("ddit-inject-oom").then(|| WorkerError::runtime("joint_blocks (injected)", oom))
    }

    /// Cancellation, deadlines and the job timeout, between steps.
    fn drop_ended(&mut self, hooks: &mut dyn Hooks) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            let r = if hooks.canceled(&a.job.job_id) {
                a.job.span.in_scope(|| tracing::info!("canceled"));
                self.failed(&a.job.job_id, Some(a.job.task), Status::Canceled, None)
            } else if a.job.ends.is_some_and(|t| now >= t) {
                let (step, total) = a.work.progress();
                let (secs, ran) = (a.job.received.elapsed(), a.job.started.elapsed());
                let message = format!(
                    "the deadline or the job timeout passed {:.1} s after the delivery ({:.1} s \
                     running), at step {step} of {total}",
                    secs.as_secs_f64(),
                    ran.as_secs_f64()
                );
                a.job.span.in_scope(|| tracing::warn!("{message}"));
                self.expired(&a.job.job_id, a.job.task, message)
            } else {
                i += 1;
                continue;
            };
            self.active.remove(i);
            hooks.result(r);
        }
    }

    /// The rows that need the model this step, grouped by shape (in key order).
    fn groups(&self) -> BTreeMap<GroupKey, Rows> {
        let mut groups: BTreeMap<GroupKey, Rows> = BTreeMap::new();
        for (ai, a) in self.active.iter().enumerate() {
            let key = a.work.key();
            match &a.work {
                Work::Generate { states, .. } => {
                    for (si, s) in states.iter().enumerate() {
                        if !s.done() {
                            groups.entry(key.clone()).or_default().push((ai, si));
                        }
                    }
                }
                Work::Masked { state, .. } => {
                    if state.needs_forward() {
                        groups.entry(key).or_default().push((ai, 0));
                    }
                }
            }
        }
        groups
    }

    /// One batched forward pass over `chunk`, recorded in each of its jobs' spans.
    fn forward(
        &mut self,
        key: &GroupKey,
        chunk: &[(usize, usize)],
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let t0 = Instant::now();
        let (kind, res) = match key {
            GroupKey::Generate { .. } => ("generate", self.forward_generate(chunk)),
            GroupKey::Masked { .. } => ("masked", self.forward_masked(chunk)),
        };
        res?;
        let seconds = t0.elapsed().as_secs_f64();
        hooks.step(kind, chunk.len(), seconds);
        for &(ai, si) in chunk {
            let a = &mut self.active[ai];
            a.batch_max = a.batch_max.max(chunk.len() as u32);
            // Recorded in the job's span without entering it; the fields are computed only when
            // a subscriber wants debug events.
            tracing::debug!(
                parent: &a.job.span,
                kind,
                image = si,
                step = a.work.progress().0,
                rows = chunk.len(),
                seconds,
                "step"
            );
        }
        Ok(())
    }

    /// Results: failures, then finished jobs (their images decoded together); progress for the
    /// rest.
    fn settle(
        &mut self,
        mut failed: BTreeMap<usize, WorkerError>,
        sink: &mut dyn ImageSink,
        hooks: &mut dyn Hooks,
    ) {
        let active = std::mem::take(&mut self.active);
        let mut keep = Vec::with_capacity(active.len());
        let mut done = Vec::new();
        let now = Instant::now();
        for (ai, mut a) in active.into_iter().enumerate() {
            if let Some(e) = failed.remove(&ai) {
                a.job.span.in_scope(|| tracing::warn!("failed: {e}"));
                let r = self.failed(&a.job.job_id, Some(a.job.task), Status::Failed, Some(&e));
                hooks.result(r);
            } else if a.work.done() {
                done.push(a);
            } else {
                if let Some((step, total)) = a.progress_due(self.cfg.progress_every, now) {
                    hooks.progress(&a.job.job_id, step, total);
                }
                keep.push(a);
            }
        }
        self.active = keep;
        self.finish_all(done, sink, hooks);
    }

    fn forward_generate(&mut self, rows: &[(usize, usize)]) -> Result<()> {
        // Batched as [uncond rows..., cond rows...], each row only where its guidance needs it
        // (`FlowState::halves`); rows are borrowed, copied once by `cat`. A job with a block
        // cache is grouped apart (`GroupKey`), so a pass either caches every row or none.
        let mut picks = Vec::with_capacity(2 * rows.len());
        let (mut latents, mut ctx_rows, mut ts, mut caches) = (vec![], vec![], vec![], vec![]);
        for half in 0..2 {
            for (k, &(ai, si)) in rows.iter().enumerate() {
                let Work::Generate {
                    states,
                    context,
                    caches: own,
                    ..
                } = &self.active[ai].work
                else {
                    return Err(WorkerError::Internal("mixed batch".into()));
                };
                if states[si].halves()[half] {
                    picks.push((k, half));
                    latents.push(&states[si].latents);
                    ctx_rows.push(&context[half]);
                    ts.push(states[si].timestep());
                    caches.push(own.get(si).map_or(&NO_CACHE, |c| &c[half]));
                }
            }
        }
        let lat = Tensor::cat(&latents)?;
        let ctx = Tensor::cat(&ctx_rows)?;
        let (v, updates) = if caches.iter().any(|c| c.on()) {
            self.model.velocity_cached(&lat, &ctx, &ts, &caches)?
        } else {
            (self.model.velocity(&lat, &ctx, &ts)?, vec![])
        };
        // Every check before any row changes: a failed pass is retried row by row from the same
        // state.
        let cached = !updates.is_empty();
        if v.shape != lat.shape || (cached && updates.len() != picks.len()) {
            return Err(WorkerError::Internal(format!(
                "velocity {:?} ({} cache updates) for latents {:?}",
                v.shape,
                updates.len(),
                lat.shape
            )));
        }
        let m = v.row_len();
        // The batch row of each image's [uncond, cond] velocity.
        let mut at = vec![[None; 2]; rows.len()];
        for (j, &(k, half)) in picks.iter().enumerate() {
            at[k][half] = Some(j);
        }
        let mut steps = Vec::with_capacity(rows.len());
        for (&(ai, si), [u, c]) in rows.iter().zip(at) {
            let (Some(u), Some(c)) = (u.or(c), c.or(u)) else {
                return Err(WorkerError::Internal("a row with no velocity".into()));
            };
            steps.push((ai, si, u, c));
        }
        for (ai, si, u, c) in steps {
            if let Work::Generate { states, .. } = &mut self.active[ai].work {
                states[si].apply(&v.data[u * m..(u + 1) * m], &v.data[c * m..(c + 1) * m]);
            }
        }
        for (&(k, half), update) in picks.iter().zip(updates) {
            let (ai, si) = rows[k];
            if let Work::Generate { caches, .. } = &mut self.active[ai].work {
                if let Some(c) = caches.get_mut(si) {
                    c[half].commit(update);
                }
            }
        }
        Ok(())
    }

    fn forward_masked(&mut self, rows: &[(usize, usize)]) -> Result<()> {
        let mut toks = Vec::with_capacity(rows.len());
        let mut tembs = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len());
        for &(ai, _) in rows {
            let Work::Masked {
                state,
                image_tokens,
                temb,
                ..
            } = &self.active[ai].work
            else {
                return Err(WorkerError::Internal("mixed batch".into()));
            };
            toks.push(image_tokens);
            tembs.push(temb);
            ids.push(state.canvas().to_vec());
            positions.push(state.masked_positions());
        }
        let x = Tensor::cat(&toks)?;
        let t = Tensor::cat(&tembs)?;
        let logits = self.model.logits(&x, &t, &ids, &positions)?;
        let total: usize = positions.iter().map(Vec::len).sum();
        let v = self.model.manifest().values.vocab_size as usize;
        if logits.data.len() != total * v {
            return Err(WorkerError::Internal(format!(
                "logits {:?} for {total} masked positions",
                logits.shape
            )));
        }
        let mut at = 0;
        for (&(ai, _), ps) in rows.iter().zip(&positions) {
            let n = ps.len() * v;
            if let Work::Masked { state, .. } = &mut self.active[ai].work {
                state.set_logits(&logits.data[at..at + n]);
                state.advance();
            }
            at += n;
        }
        Ok(())
    }
}
