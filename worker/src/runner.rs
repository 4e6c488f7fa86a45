//! Cross-job batching: many jobs step together, one forward pass per group per step.
//!
//! Jobs of the same task and shapes form a group (generation: latent size and prompt length;
//! captioning and VQA: canvas length and image tokens). Each tick, every active job advances by
//! exactly one sampler step; the jobs of a group that need the model share one forward pass (up
//! to `max_batch` rows). Masked-diffusion jobs whose canvas did not change reuse their cached
//! probabilities and skip the pass. New jobs join between ticks; finished, failed or canceled
//! jobs leave. Every job keeps its own RNG, so batching never changes which numbers it draws.

use std::collections::BTreeMap;
use std::time::Instant;

use ddit_schemas::{ErrorInfo, Job, JobResult, Metrics, ModelRef, Output, Status};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::engine::{Engine, Tensor};
use crate::error::{Result, WorkerError};
use crate::image_io::{self, ImageLimits};
use crate::sampler::flow::FlowState;
use crate::sampler::masked::MaskedState;
use crate::sampler::rng::JobRng;
use crate::sampler::{FlowModel, MaskedModel};
use crate::tasks::input::InputFetcher;
use crate::tasks::{self, CaptionPlan, GeneratePlan, Plan, VqaPlan};
use crate::text::TextCodec;

/// How captioning turns an image into a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    /// `mean + exp(logvar/2)·ε`, as D-DiT does (ε from the job's RNG).
    Sample,
    /// The posterior mean (deterministic in the image).
    Mean,
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub max_batch: usize,
    pub caption_latent: LatentMode,
    pub image_limits: ImageLimits,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            caption_latent: LatentMode::Sample,
            image_limits: ImageLimits::default(),
        }
    }
}

/// A job as received: parsed, or the reason it could not be (with whatever id it carried).
pub enum Incoming {
    Job(Box<Job>),
    Unparseable { job_id: String, error: WorkerError },
}

/// Where jobs come from. `wait` asks to block until one is available; `None` then means the
/// source is exhausted (or shutting down). With `wait = false`, `None` means "none right now".
pub trait JobSource {
    fn next_job(&mut self, wait: bool) -> Option<Incoming>;
}

/// Where generated images go. Returns the output's URI.
pub trait ImageSink {
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], seed: u64) -> Result<String>;
}

/// What the service plugs in: progress, cancellation and the results themselves.
pub trait Hooks {
    fn progress(&mut self, _job_id: &str, _step: usize, _total: usize) {}
    fn canceled(&mut self, _job_id: &str) -> bool {
        false
    }
    fn result(&mut self, result: JobResult);
    /// One batched forward pass took `seconds` for `rows` rows (`kind`: generate or masked).
    fn step(&mut self, _kind: &'static str, _rows: usize, _seconds: f64) {}
}

enum Work {
    Generate {
        states: Vec<FlowState>,
        /// Text streams `[1, L, D]` of the negative and the positive prompt, encoded once per job.
        context: [Tensor; 2],
        plan: GeneratePlan,
    },
    Masked {
        state: Box<MaskedState>,
        image_tokens: Tensor,
        temb: Tensor,
        answer_from: usize,
    },
}

struct Active {
    job_id: String,
    task: &'static str,
    started: Instant,
    queue_ms: u64,
    batch_max: u32,
    work: Work,
}

impl Active {
    fn rows(&self) -> usize {
        match &self.work {
            Work::Generate { states, .. } => states.len(),
            Work::Masked { .. } => 1,
        }
    }

    fn progress(&self) -> (usize, usize) {
        match &self.work {
            Work::Generate { states, .. } => (
                states.iter().map(FlowState::steps_taken).sum(),
                states.iter().map(FlowState::total_steps).sum(),
            ),
            Work::Masked { state, .. } => (state.steps_taken(), 0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum GroupKey {
    Generate {
        latent: Vec<usize>,
        text: Vec<usize>,
    },
    Masked {
        tokens: Vec<usize>,
        canvas: usize,
    },
}

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
        model: model.clone(),
        finished_at: now_rfc3339(),
    }
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_time(field: &str, s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| WorkerError::invalid(field, format!("`{s}` is not an RFC 3339 time: {e}")))
}

pub struct Runner<'a> {
    pub engine: &'a mut Engine,
    pub codec: &'a TextCodec,
    pub fetcher: &'a dyn InputFetcher,
    pub cfg: RunnerConfig,
    active: Vec<Active>,
}

impl<'a> Runner<'a> {
    pub fn new(
        engine: &'a mut Engine,
        codec: &'a TextCodec,
        fetcher: &'a dyn InputFetcher,
        cfg: RunnerConfig,
    ) -> Self {
        Self {
            engine,
            codec,
            fetcher,
            cfg,
            active: Vec::new(),
        }
    }

    fn model_ref(&self) -> ModelRef {
        ModelRef {
            name: self.engine.manifest.model.name.clone(),
            hash: self.engine.manifest.model.hash.clone(),
        }
    }

    fn failed(
        &self,
        job_id: &str,
        task: Option<&str>,
        status: Status,
        err: Option<&WorkerError>,
    ) -> JobResult {
        ended_result(&self.model_ref(), job_id, task, status, err)
    }

    /// Runs until the source is exhausted and every admitted job has its result.
    pub fn run(
        &mut self,
        source: &mut dyn JobSource,
        sink: &mut dyn ImageSink,
        hooks: &mut dyn Hooks,
    ) {
        let mut exhausted = false;
        loop {
            while !exhausted && self.rows() < self.cfg.max_batch.max(1) {
                match source.next_job(self.active.is_empty()) {
                    Some(inc) => self.admit(inc, hooks),
                    None => {
                        if self.active.is_empty() {
                            exhausted = true;
                        }
                        break;
                    }
                }
            }
            if self.active.is_empty() {
                if exhausted {
                    return;
                }
                continue;
            }
            self.tick(sink, hooks);
        }
    }

    fn rows(&self) -> usize {
        self.active.iter().map(Active::rows).sum()
    }

    fn admit(&mut self, inc: Incoming, hooks: &mut dyn Hooks) {
        let job = match inc {
            Incoming::Job(j) => j,
            Incoming::Unparseable { job_id, error } => {
                hooks.result(self.failed(&job_id, None, Status::Failed, Some(&error)));
                return;
            }
        };
        let task = job.task.name();
        let fail = |this: &Self, e: &WorkerError| {
            this.failed(&job.job_id, Some(task), Status::Failed, Some(e))
        };
        let now = OffsetDateTime::now_utc();
        let mut queue_ms = 0;
        if let Some(s) = &job.submitted_at {
            match parse_time("submitted_at", s) {
                Ok(t) => queue_ms = (now - t).whole_milliseconds().max(0) as u64,
                Err(e) => return hooks.result(fail(self, &e)),
            }
        }
        if let Some(d) = &job.deadline {
            match parse_time("deadline", d) {
                Ok(t) if t <= now => {
                    let mut r = self.failed(&job.job_id, Some(task), Status::Expired, None);
                    r.error = Some(ErrorInfo {
                        kind: ddit_schemas::ErrorKind::InvalidJob,
                        message: format!("deadline {d} passed before the job started"),
                        retryable: false,
                    });
                    return hooks.result(r);
                }
                Ok(_) => {}
                Err(e) => return hooks.result(fail(self, &e)),
            }
        }
        let started = Instant::now();
        let work = tasks::plan(&job, &self.engine.manifest).and_then(|p| self.prepare(p));
        match work {
            Ok(work) => self.active.push(Active {
                job_id: job.job_id.clone(),
                task,
                started,
                queue_ms,
                batch_max: 0,
                work,
            }),
            Err(e) => hooks.result(fail(self, &e)),
        }
    }

    fn prepare(&mut self, plan: Plan) -> Result<Work> {
        match plan {
            Plan::Generate(p) => self.prepare_generate(p),
            Plan::Caption(p) => self.prepare_caption(p),
            Plan::Vqa(p) => self.prepare_vqa(p),
        }
    }

    fn prepare_generate(&mut self, p: GeneratePlan) -> Result<Work> {
        let v = self.engine.manifest.values.clone();
        let len = v.text_lengths.prompt as usize;
        let neg = self
            .codec
            .encode_padded(&p.negative_prompt, len, "params.negative_prompt")?;
        let pos = self.codec.encode_padded(&p.prompt, len, "params.prompt")?;
        // [uncond, cond], encoded once per job and kept as rows for batching.
        let both = self.engine.encode_text(&[neg, pos])?;
        let context = [both.row(0), both.row(1)];
        let f = v.vae.downsample_factor as usize;
        let shape = [
            v.latent_channels as usize,
            p.height as usize / f,
            p.width as usize / f,
        ];
        let states = (0..p.num_images)
            .map(|i| {
                let mut rng = JobRng::new(p.seed.wrapping_add(u64::from(i)));
                FlowState::new(
                    shape,
                    &mut rng,
                    p.steps as usize,
                    v.scheduler.shift,
                    v.scheduler.num_train_timesteps as usize,
                    p.guidance,
                )
            })
            .collect();
        Ok(Work::Generate {
            states,
            context,
            plan: p,
        })
    }

    /// Image -> (image tokens, temb at timestep 0), drawing the posterior noise from `rng`.
    fn encode_image(&mut self, uri: &str, rng: &mut JobRng) -> Result<(Tensor, Tensor)> {
        let bytes = self.fetcher.fetch(uri)?;
        let img = image_io::decode(&bytes, uri, self.cfg.image_limits)?;
        let native = tasks::Geometry::of(&self.engine.manifest).native;
        let pixels = image_io::preprocess(&img, native);
        let (mean, logvar) = self.engine.vae_encode(&pixels)?;
        let vae = self.engine.manifest.values.vae.clone();
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let mut z = mean;
        if self.cfg.caption_latent == LatentMode::Sample {
            for (zi, lv) in z.data.iter_mut().zip(&logvar.data) {
                *zi += (0.5 * lv).exp() * rng.normal();
            }
        }
        z.data.iter_mut().for_each(|x| *x = (*x - shift) * scale);
        let tokens = self.engine.patch_embed(&z)?;
        let temb = self.engine.time_embed(&[0.0])?;
        Ok((tokens, temb))
    }

    fn masked_work(
        &mut self,
        image: &str,
        prefix: Vec<i64>,
        length: usize,
        steps: u32,
        seed: u64,
        answer_from: usize,
    ) -> Result<Work> {
        let mut rng = JobRng::new(seed);
        let (image_tokens, temb) = self.encode_image(image, &mut rng)?;
        let v = &self.engine.manifest.values;
        let state = MaskedState::new(
            &prefix,
            length,
            i64::from(v.tokens.mask_id),
            v.vocab_size as usize,
            steps as usize,
            rng,
        );
        Ok(Work::Masked {
            state: Box::new(state),
            image_tokens,
            temb,
            answer_from,
        })
    }

    fn prepare_caption(&mut self, p: CaptionPlan) -> Result<Work> {
        let prefix = match &p.prompt {
            Some(t) => self.codec.encode_prefix(t, "params.prompt")?,
            None => vec![],
        };
        if prefix.len() >= p.length as usize {
            return Err(WorkerError::invalid(
                "params.prompt",
                format!(
                    "the prompt (this one or the model's caption_prompt) is {} tokens and leaves \
                     no room on a {}-token canvas",
                    prefix.len(),
                    p.length
                ),
            ));
        }
        // The caption is the text written after the prefix.
        let n = prefix.len();
        self.masked_work(&p.image, prefix, p.length as usize, p.steps, p.seed, n)
    }

    fn prepare_vqa(&mut self, p: VqaPlan) -> Result<Work> {
        let prefix = self
            .codec
            .encode_prefix(&tasks::vqa_prompt(&p.question), "params.question")?;
        if prefix.len() >= p.length as usize {
            return Err(WorkerError::invalid(
                "params.question",
                format!(
                    "the prompt is {} tokens; the VQA canvas holds {}",
                    prefix.len(),
                    p.length
                ),
            ));
        }
        let n = prefix.len();
        self.masked_work(&p.image, prefix, p.length as usize, p.steps, p.seed, n)
    }

    fn key(a: &Active) -> GroupKey {
        match &a.work {
            Work::Generate {
                states, context, ..
            } => GroupKey::Generate {
                latent: states
                    .first()
                    .map(|s| s.latents.shape.clone())
                    .unwrap_or_default(),
                text: context[0].shape.clone(),
            },
            Work::Masked {
                state,
                image_tokens,
                ..
            } => GroupKey::Masked {
                tokens: image_tokens.shape.clone(),
                canvas: state.canvas().len(),
            },
        }
    }

    /// One step for every active job.
    fn tick(&mut self, sink: &mut dyn ImageSink, hooks: &mut dyn Hooks) {
        // Cancellation between steps.
        let mut i = 0;
        while i < self.active.len() {
            if hooks.canceled(&self.active[i].job_id) {
                let a = self.active.remove(i);
                let r = self.failed(&a.job_id, Some(a.task), Status::Canceled, None);
                hooks.result(r);
            } else {
                i += 1;
            }
        }
        // Group the rows that need the model this step.
        // Masked jobs whose cache holds advance without the model.
        for a in &mut self.active {
            if let Work::Masked { state, .. } = &mut a.work {
                if !state.needs_forward() {
                    state.advance();
                }
            }
        }
        let mut groups: BTreeMap<GroupKey, Vec<(usize, usize)>> = BTreeMap::new();
        for (ai, a) in self.active.iter().enumerate() {
            let key = Self::key(a);
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
        let mut failed: BTreeMap<usize, WorkerError> = BTreeMap::new();
        for (key, rows) in groups {
            for chunk in rows.chunks(self.cfg.max_batch.max(1)) {
                let t0 = Instant::now();
                let kind = match key {
                    GroupKey::Generate { .. } => "generate",
                    GroupKey::Masked { .. } => "masked",
                };
                let res = match key {
                    GroupKey::Generate { .. } => self.forward_generate(chunk),
                    GroupKey::Masked { .. } => self.forward_masked(chunk),
                };
                match res {
                    Ok(()) => {
                        hooks.step(kind, chunk.len(), t0.elapsed().as_secs_f64());
                        for &(ai, _) in chunk {
                            let a = &mut self.active[ai];
                            a.batch_max = a.batch_max.max(chunk.len() as u32);
                        }
                    }
                    Err(e) => {
                        for &(ai, _) in chunk {
                            failed
                                .entry(ai)
                                .or_insert_with(|| WorkerError::runtime("batch forward", &e));
                        }
                    }
                }
            }
        }
        // Results: failures, then finished jobs; progress for the rest.
        let mut keep = Vec::with_capacity(self.active.len());
        let active = std::mem::take(&mut self.active);
        for (ai, a) in active.into_iter().enumerate() {
            if let Some(e) = failed.remove(&ai) {
                let r = self.failed(&a.job_id, Some(a.task), Status::Failed, Some(&e));
                hooks.result(r);
                continue;
            }
            let done = match &a.work {
                Work::Generate { states, .. } => states.iter().all(FlowState::done),
                Work::Masked { state, .. } => state.done(),
            };
            if done {
                let r = self.finish(a, sink);
                hooks.result(r);
            } else {
                let (step, total) = a.progress();
                hooks.progress(&a.job_id, step, total);
                keep.push(a);
            }
        }
        self.active = keep;
    }

    fn forward_generate(&mut self, rows: &[(usize, usize)]) -> Result<()> {
        let n = rows.len();
        let mut latents = Vec::with_capacity(2 * n);
        let mut ctx_rows = Vec::with_capacity(2 * n);
        let mut ts = Vec::with_capacity(2 * n);
        // Batched as [uncond rows..., cond rows...]; rows are borrowed, copied once by `cat`.
        for half in 0..2 {
            for &(ai, si) in rows {
                let Work::Generate {
                    states, context, ..
                } = &self.active[ai].work
                else {
                    return Err(WorkerError::Internal("mixed batch".into()));
                };
                latents.push(&states[si].latents);
                ctx_rows.push(&context[half]);
                ts.push(states[si].timestep());
            }
        }
        let lat = Tensor::cat(&latents)?;
        let ctx = Tensor::cat(&ctx_rows)?;
        let v = self.engine.velocity(&lat, &ctx, &ts)?;
        let m = v.row_len();
        for (k, &(ai, si)) in rows.iter().enumerate() {
            if let Work::Generate { states, .. } = &mut self.active[ai].work {
                states[si].apply(
                    &v.data[k * m..(k + 1) * m],
                    &v.data[(n + k) * m..(n + k + 1) * m],
                );
            }
        }
        Ok(())
    }

    fn forward_masked(&mut self, rows: &[(usize, usize)]) -> Result<()> {
        let mut toks = Vec::with_capacity(rows.len());
        let mut tembs = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
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
        }
        let x = Tensor::cat(&toks)?;
        let t = Tensor::cat(&tembs)?;
        let logits = self.engine.logits(&x, &t, &ids)?;
        let m = logits.row_len();
        for (k, &(ai, _)) in rows.iter().enumerate() {
            if let Work::Masked { state, .. } = &mut self.active[ai].work {
                state.set_logits(&logits.data[k * m..(k + 1) * m]);
                state.advance();
            }
        }
        Ok(())
    }

    fn finish(&mut self, a: Active, sink: &mut dyn ImageSink) -> JobResult {
        let provider = self.engine.provider().to_string();
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
            Ok((outputs, text)) => JobResult {
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
                model: self.model_ref(),
                finished_at: now_rfc3339(),
            },
            Err(e) => self.failed(&a.job_id, Some(a.task), Status::Failed, Some(&e)),
        }
    }

    fn decode_images(
        &mut self,
        job_id: &str,
        states: &[FlowState],
        plan: &GeneratePlan,
        sink: &mut dyn ImageSink,
    ) -> Result<Vec<Output>> {
        let vae = self.engine.manifest.values.vae.clone();
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let mut outputs = Vec::with_capacity(states.len());
        for (i, s) in states.iter().enumerate() {
            let mut z = s.latents.clone();
            z.data.iter_mut().for_each(|x| *x = *x / scale + shift);
            let img = self.engine.vae_decode(&z)?;
            let rgb = image_io::to_rgb(&img)?;
            let png = image_io::encode_png(&rgb)?;
            let seed = plan.seed.wrapping_add(i as u64);
            let uri = sink.put(job_id, i as u32, &png, seed)?;
            let sha256 = Sha256::digest(&png)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            outputs.push(Output {
                uri,
                width: rgb.width(),
                height: rgb.height(),
                sha256,
                seed,
            });
        }
        Ok(outputs)
    }
}
