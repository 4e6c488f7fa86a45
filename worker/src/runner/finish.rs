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

impl<M: Model> Runner<'_, M> {
    pub(super) fn finish(&mut self, a: Active, sink: &mut dyn ImageSink) -> JobResult {
        let _span = a.span.clone().entered();
        let provider = self.model.provider().to_string();
        let outcome = match &a.work {
            Work::Generate { states, plan, .. } => self
                .decode_images(&a.job_id, states, plan, sink)
                .map(|o| (o, None)),
            Work::Masked {
                state, answer_from, ..
            } => self
                .codec
                .decode_generated(&state.canvas()[*answer_from..])
                .map(|t| (vec![], Some(t))),
        };
        let steps = match &a.work {
            Work::Generate { states, .. } => states.first().map(|s| s.total_steps()).unwrap_or(0),
            Work::Masked { state, .. } => state.steps_taken(),
        } as u32;
        match outcome {
            Ok((outputs, text)) => {
                tracing::debug!(steps, "succeeded");
                JobResult {
                    job_id: a.job_id.clone(),
                    status: Status::Succeeded,
                    task: Some(a.task.to_string()),
                    outputs,
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
                }
            }
            Err(e) => {
                tracing::warn!("failed: {e}");
                self.failed(&a.job_id, Some(a.task), Status::Failed, Some(&e))
            }
        }
    }

    fn decode_images(
        &mut self,
        job_id: &str,
        states: &[FlowState],
        plan: &GeneratePlan,
        sink: &mut dyn ImageSink,
    ) -> Result<Vec<Output>> {
        let vae = &self.model.manifest().values.vae;
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let mut outputs = Vec::with_capacity(states.len());
        for (i, s) in states.iter().enumerate() {
            let mut z = s.latents.clone();
            z.data.iter_mut().for_each(|x| *x = *x / scale + shift);
            let img = self.model.vae_decode(&z)?;
            let rgb = image_io::to_rgb(&img)?;
            let png = image_io::encode_png(&rgb)?;
            let seed = plan.seed.wrapping_add(i as u64);
            let uri = sink.put(job_id, i as u32, &png, seed)?;
            outputs.push(Output {
                uri,
                width: rgb.width(),
                height: rgb.height(),
                sha256: ddit_schemas::hex(&Sha256::digest(&png)),
                seed,
            });
        }
        Ok(outputs)
    }
}
