//! A job's end: decoded images into the sink, or decoded text, and its result. The images of the
//! jobs that finish in one tick are decoded together.

use std::collections::BTreeMap;

use ddit_schemas::{ErrorInfo, JobResult, Metrics, ModelRef, Output, Status};
use sha2::{Digest, Sha256};

use super::step::panicked;
use super::work::{Active, Work};
use super::{Hooks, ImageSink, Model, Runner};
use crate::clock::now_rfc3339;
use crate::error::{Result, WorkerError};
use crate::image_io;
use crate::tensor::Tensor;

/// A result without outputs: failed (with the error), expired or canceled.
pub fn ended_result(
    model: &ModelRef,
    job_id: &str,
    task: Option<&str>,
    status: Status,
    err: Option<&WorkerError>,
) -> JobResult {
    JobResult {
        job_id: job_id.to_string(),
        status,
        task: task.map(str::to_string),
        outputs: vec![],
        text: None,
        metrics: None,
        error: err.map(|e| ErrorInfo {
            kind: e.kind(),
            message: e.to_string(),
            retryable: e.kind().retryable(),
        }),
        attempts: None,
        model: model.clone(),
        finished_at: now_rfc3339(),
    }
}

/// A finished generate job: its decoded images (with their seeds) and its result, whose outputs the
/// [`ImageSink`] fills in once the images are stored.
pub struct Decoded {
    pub result: JobResult,
    pub images: Vec<(image::RgbImage, u64)>,
}

/// One image as stored: its PNG bytes and their sha256 (hex).
pub struct Png {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl Png {
    pub fn of(bytes: Vec<u8>) -> Self {
        let sha256 = ddit_schemas::hex(&Sha256::digest(&bytes));
        Self { bytes, sha256 }
    }
}

/// The PNG bytes of each image, in order (the CPU part of storing them).
pub fn encode_images(images: &[(image::RgbImage, u64)]) -> Result<Vec<Png>> {
    images
        .iter()
        .map(|(rgb, _)| Ok(Png::of(image_io::encode_png(rgb)?)))
        .collect()
}

impl Decoded {
    /// The result naming `stored` (each image's PNG and the URI it was stored under, in order), or
    /// the job's failed result when storing failed.
    pub fn complete(self, stored: Result<Vec<(Png, String)>>) -> JobResult {
        let mut r = self.result;
        match stored {
            Ok(stored) => {
                r.outputs = stored
                    .into_iter()
                    .zip(&self.images)
                    .map(|((png, uri), (rgb, seed))| Output {
                        uri,
                        width: rgb.width(),
                        height: rgb.height(),
                        sha256: png.sha256,
                        seed: *seed,
                    })
                    .collect();
                r.finished_at = now_rfc3339();
                r
            }
            Err(e) => {
                tracing::warn!(job_id = %r.job_id, "failed: {e}");
                ended_result(
                    &r.model,
                    &r.job_id,
                    r.task.as_deref(),
                    Status::Failed,
                    Some(&e),
                )
            }
        }
    }

    /// Encodes and stores each image with `sink.put`, in order, and completes the result.
    pub fn store_in(self, sink: &mut (impl ImageSink + ?Sized)) -> JobResult {
        let job_id = self.result.job_id.clone();
        let stored = encode_images(&self.images).and_then(|pngs| {
            pngs.into_iter()
                .zip(&self.images)
                .enumerate()
                .map(|(i, (png, (_, seed)))| {
                    let uri = sink.put(&job_id, i as u32, &png.bytes, *seed)?;
                    Ok((png, uri))
                })
                .collect()
        });
        self.complete(stored)
    }
}

/// A finished generate job's images with their seeds, or why they could not be decoded.
type Images = Result<Vec<(image::RgbImage, u64)>>;

impl<M: Model> Runner<'_, M> {
    /// The results of the jobs that finished in one tick, in order; their images decoded first,
    /// together.
    pub(super) fn finish_all(
        &mut self,
        done: Vec<Active>,
        sink: &mut dyn ImageSink,
        hooks: &mut dyn Hooks,
    ) {
        if done.is_empty() {
            return;
        }
        let mut images = self.decode_finished(&done).into_iter();
        for a in done {
            let (id, task) = (a.job.job_id.clone(), a.job.task);
            let imgs = images.next().flatten();
            let run = std::panic::AssertUnwindSafe(|| self.finish(a, imgs, sink));
            let r = std::panic::catch_unwind(run).unwrap_or_else(|p| {
                let e = panicked("finishing the job", p.as_ref());
                Some(self.failed(&id, Some(task), Status::Failed, Some(&e)))
            });
            if let Some(r) = r {
                hooks.result(r);
            }
        }
    }

    /// The job's result, or `None` when the sink reports it once its images are stored.
    fn finish(
        &mut self,
        a: Active,
        images: Option<Images>,
        sink: &mut dyn ImageSink,
    ) -> Option<JobResult> {
        let _span = a.job.span.clone().entered();
        let provider = self.model.provider().to_string();
        let outcome = match &a.work {
            Work::Generate { .. } => images
                .unwrap_or_else(|| Err(WorkerError::Internal("images not decoded".into())))
                .map(|i| (Some(i), None)),
            Work::Masked {
                state, answer_from, ..
            } => self
                .codec
                .decode_generated(&state.canvas()[*answer_from..])
                .map(|t| (None, Some(t))),
        };
        let steps = match &a.work {
            Work::Generate { states, .. } => states.first().map(|s| s.total_steps()).unwrap_or(0),
            Work::Masked { state, .. } => state.steps_taken(),
        } as u32;
        let (images, text) = match outcome {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("failed: {e}");
                return Some(self.failed(
                    &a.job.job_id,
                    Some(a.job.task),
                    Status::Failed,
                    Some(&e),
                ));
            }
        };
        tracing::debug!(steps, "succeeded");
        let result = JobResult {
            job_id: a.job.job_id.clone(),
            status: Status::Succeeded,
            task: Some(a.job.task.to_string()),
            outputs: vec![],
            text,
            metrics: Some(Metrics {
                queue_ms: a.job.queue_ms,
                run_ms: a.job.started.elapsed().as_millis() as u64,
                steps,
                batch_size: a.batch_max,
                execution_provider: provider,
                cached_rows: match &a.work {
                    Work::Generate { caches, .. } => {
                        caches.iter().flatten().map(|c| c.skipped).sum()
                    }
                    Work::Masked { .. } => 0,
                },
            }),
            error: None,
            attempts: None,
            model: self.model_ref(),
            finished_at: now_rfc3339(),
        };
        match images {
            Some(images) => sink.finish(Decoded { result, images }),
            None => Some(result),
        }
    }

    /// Each finished generate job's images (`None` for the other jobs): the latents of one shape
    /// through the VAE decoder together, whichever jobs they belong to, at most `decode_batch`
    /// (and `max_batch`) images and `decode_pixels` pixels a pass. The decoder is row-wise, so an
    /// image is the one it decodes alone.
    fn decode_finished(&mut self, done: &[Active]) -> Vec<Option<Images>> {
        let mut by_shape: BTreeMap<&[usize], Vec<(usize, usize)>> = BTreeMap::new();
        for (ji, a) in done.iter().enumerate() {
            if let Work::Generate { states, .. } = &a.work {
                for (si, s) in states.iter().enumerate() {
                    by_shape.entry(&s.latents.shape).or_default().push((ji, si));
                }
            }
        }
        let f = self.model.manifest().values.vae.downsample_factor.max(1);
        let most = self.cfg.decode_batch.min(self.cfg.max_batch);
        let mut decoded = BTreeMap::new();
        for (shape, rows) in by_shape {
            // A latent [1, C, h, w] decodes to (h·f) × (w·f) pixels.
            let pixels = shape.iter().skip(2).product::<usize>() as u64 * f * f;
            let fit = usize::try_from(self.cfg.decode_pixels / pixels.max(1)).unwrap_or(usize::MAX);
            for chunk in rows.chunks(most.min(fit).max(1)) {
                decoded.extend(chunk.iter().copied().zip(self.decode_rows(done, chunk)));
            }
        }
        done.iter()
            .enumerate()
            .map(|(ji, a)| {
                let Work::Generate { states, plan, .. } = &a.work else {
                    return None;
                };
                let images = (0..states.len()).map(|si| {
                    let img = decoded.remove(&(ji, si)).unwrap_or_else(|| {
                        Err(WorkerError::Internal("an image left undecoded".into()))
                    })?;
                    Ok((img, plan.seed.wrapping_add(si as u64)))
                });
                Some(images.collect())
            })
            .collect()
    }

    /// The images of `rows` ((job, image) of `done`) from one decoder pass; when it fails, each
    /// image again alone, so that one bad image does not fail the others.
    fn decode_rows(
        &mut self,
        done: &[Active],
        rows: &[(usize, usize)],
    ) -> Vec<Result<image::RgbImage>> {
        let vae = &self.model.manifest().values.vae;
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let latents: Vec<Tensor> = rows
            .iter()
            .filter_map(|&(ji, si)| match &done[ji].work {
                Work::Generate { states, .. } => {
                    let mut z = states[si].latents.clone();
                    z.data.iter_mut().for_each(|x| *x = *x / scale + shift);
                    Some(z)
                }
                Work::Masked { .. } => None,
            })
            .collect();
        let out = self.guard("decoding images", |r| {
            let img = r
                .model
                .vae_decode(&Tensor::cat(&latents.iter().collect::<Vec<_>>())?)?;
            match img.batch() == rows.len() {
                true => Ok(img),
                false => Err(WorkerError::Internal(format!(
                    "decoded {:?} for {} latents",
                    img.shape,
                    rows.len()
                ))),
            }
        });
        match out {
            Ok(img) => (0..rows.len())
                .map(|k| image_io::to_rgb(&img.row(k)))
                .collect(),
            Err(e) if rows.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::warn!(
                    images = rows.len(),
                    "batched decode failed, decoding images alone: {e}"
                );
                rows.iter()
                    .flat_map(|r| self.decode_rows(done, std::slice::from_ref(r)))
                    .collect()
            }
        }
    }
}
