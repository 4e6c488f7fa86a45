//! A job's end: decoded images into the sink, or decoded text, and its result.

use ddit_schemas::{ErrorInfo, JobResult, Metrics, ModelRef, Output, Status};
use sha2::{Digest, Sha256};

use super::work::{Active, Work};
use super::{ImageSink, Model, Runner};
use crate::clock::now_rfc3339;
use crate::error::{Result, WorkerError};
use crate::image_io;
use crate::sampler::flow::FlowState;
use crate::tasks::GeneratePlan;

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

impl<M: Model> Runner<'_, M> {
    /// The job's result, or `None` when the sink reports it once its images are stored.
    pub(super) fn finish(&mut self, a: Active, sink: &mut dyn ImageSink) -> Option<JobResult> {
        let _span = a.span.clone().entered();
        let provider = self.model.provider().to_string();
        let outcome = match &a.work {
            Work::Generate { states, plan, .. } => {
                self.decode_images(states, plan).map(|i| (Some(i), None))
            }
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
                return Some(self.failed(&a.job_id, Some(a.task), Status::Failed, Some(&e)));
            }
        };
        tracing::debug!(steps, "succeeded");
        let result = JobResult {
            job_id: a.job_id.clone(),
            status: Status::Succeeded,
            task: Some(a.task.to_string()),
            outputs: vec![],
            text,
            metrics: Some(Metrics {
                queue_ms: a.queue_ms,
                run_ms: a.started.elapsed().as_millis() as u64,
                steps,
                batch_size: a.batch_max,
                execution_provider: provider,
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

    /// Each image's latent through the VAE decoder, as RGB, with its seed.
    fn decode_images(
        &mut self,
        states: &[FlowState],
        plan: &GeneratePlan,
    ) -> Result<Vec<(image::RgbImage, u64)>> {
        let vae = &self.model.manifest().values.vae;
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let mut images = Vec::with_capacity(states.len());
        for (i, s) in states.iter().enumerate() {
            let mut z = s.latents.clone();
            z.data.iter_mut().for_each(|x| *x = *x / scale + shift);
            let img = self.model.vae_decode(&z)?;
            images.push((image_io::to_rgb(&img)?, plan.seed.wrapping_add(i as u64)));
        }
        Ok(images)
    }
}
