//! An admitted job's sampler state, and how a plan becomes one (prompt encoding for generation,
//! batched in `pending.rs`; image encoding and the canvas for captioning and VQA).

use std::time::Instant;

use super::pending::{Admitted, Input};
use super::{BlockCache, LatentMode, Model, Runner};
use crate::error::{Result, WorkerError};
use crate::image_io;
use crate::sampler::flow::{FlowState, Sampling};
use crate::sampler::masked::MaskedState;
use crate::sampler::rng::JobRng;
use crate::tasks::{self, CaptionPlan, GeneratePlan, Plan, VqaPlan};
use crate::tensor::Tensor;

pub(super) enum Work {
    Generate {
        states: Vec<FlowState>,
        /// Text streams `[1, L, D]` of the negative and the positive prompt, encoded once per job.
        context: [Tensor; 2],
        /// Each image's [unconditional, conditional] block cache; empty when the job has none.
        caches: Vec<[BlockCache; 2]>,
        plan: GeneratePlan,
    },
    Masked {
        state: Box<MaskedState>,
        image_tokens: Tensor,
        temb: Tensor,
        answer_from: usize,
    },
}

impl Work {
    /// Rows this job adds to a forward pass.
    pub(super) fn rows(&self) -> usize {
        match self {
            Work::Generate { states, .. } => states.len(),
            Work::Masked { .. } => 1,
        }
    }

    pub(super) fn done(&self) -> bool {
        match self {
            Work::Generate { states, .. } => states.iter().all(FlowState::done),
            Work::Masked { state, .. } => state.done(),
        }
    }

    /// (steps taken, total steps; 0 when the total is not known in advance).
    pub(super) fn progress(&self) -> (usize, usize) {
        match self {
            Work::Generate { states, .. } => (
                states.iter().map(FlowState::steps_taken).sum(),
                states.iter().map(FlowState::total_steps).sum(),
            ),
            Work::Masked { state, .. } => (state.steps_taken(), 0),
        }
    }

    /// Jobs with equal keys can share a forward pass.
    pub(super) fn key(&self) -> GroupKey {
        match self {
            Work::Generate {
                states,
                context,
                caches,
                ..
            } => GroupKey::Generate {
                latent: states
                    .first()
                    .map(|s| s.latents.shape.clone())
                    .unwrap_or_default(),
                text: context[0].shape.clone(),
                cached: !caches.is_empty(),
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
}

pub(super) struct Active {
    /// Who it is, its times and its span (as admitted).
    pub job: Admitted,
    pub batch_max: u32,
    pub work: Work,
    /// When its progress was last reported.
    pub reported: Option<Instant>,
}

impl Active {
    pub(super) fn rows(&self) -> usize {
        self.work.rows()
    }

    /// Its (step, total) when a progress report is due: first, last, or `every` since the last.
    pub(super) fn progress_due(
        &mut self,
        every: std::time::Duration,
        now: Instant,
    ) -> Option<(usize, usize)> {
        let (step, total) = self.work.progress();
        let due = step + 1 >= total || self.reported.is_none_or(|t| now - t >= every);
        due.then(|| {
            self.reported = Some(now);
            (step, total)
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum GroupKey {
    Generate {
        latent: Vec<usize>,
        text: Vec<usize>,
        /// Jobs with a block cache share passes only with each other: the others keep the
        /// plain (and, under `--io-binding`, device-resident) path.
        cached: bool,
    },
    Masked {
        tokens: Vec<usize>,
        canvas: usize,
    },
}

impl<M: Model> Runner<'_, M> {
    /// A caption or VQA job's work, from its input image's bytes (`input`, read at admission).
    pub(super) fn prepare(&mut self, plan: Plan, input: Input) -> Result<Work> {
        let bytes = match input {
            Input::Read(bytes) => bytes,
            Input::None | Input::Reading(_) => Err(WorkerError::Internal(
                "preparing a job whose input was not read".into(),
            )),
        };
        match plan {
            Plan::Generate(_) => Err(WorkerError::Internal(
                "generation is prepared with its batch's text encoding".into(),
            )),
            Plan::Caption(p) => self.prepare_caption(p, bytes),
            Plan::Vqa(p) => self.prepare_vqa(p, bytes),
        }
    }

    /// The token ids of the negative and the positive prompt, padded to the prompt length.
    pub(super) fn prompt_ids(&self, p: &GeneratePlan) -> Result<[Vec<i64>; 2]> {
        let len = self.model.manifest().values.text_lengths.prompt as usize;
        let neg = self
            .codec
            .encode_padded(&p.negative_prompt, len, "params.negative_prompt")?;
        let pos = self.codec.encode_padded(&p.prompt, len, "params.prompt")?;
        Ok([neg, pos])
    }

    /// A generate job's work from its [uncond, cond] text streams `[1, L, D]` (kept as rows for
    /// batching).
    pub(super) fn generate_work(&self, p: GeneratePlan, context: [Tensor; 2]) -> Work {
        let v = &self.model.manifest().values;
        let f = v.vae.downsample_factor as usize;
        let shape = [
            v.latent_channels as usize,
            p.height as usize / f,
            p.width as usize / f,
        ];
        let sampling = Sampling {
            shift: v.scheduler.shift,
            num_train_timesteps: v.scheduler.num_train_timesteps as usize,
            guidance: p.guidance,
            solver: p.speed.solver,
            guidance_interval: p.speed.guidance_interval,
        };
        let states = (0..p.num_images)
            .map(|i| {
                let mut rng = JobRng::new(p.seed.wrapping_add(u64::from(i)));
                FlowState::new(shape, &mut rng, p.steps as usize, &sampling)
            })
            .collect();
        let cache = BlockCache::new(p.speed.block_cache);
        let caches = match p.speed.caches() {
            true => vec![[cache.clone(), cache]; p.num_images as usize],
            false => vec![],
        };
        Work::Generate {
            states,
            context,
            caches,
            plan: p,
        }
    }

    /// Image bytes (read from `uri`) -> (image tokens, temb at timestep 0), drawing the posterior
    /// noise from `rng`.
    fn encode_image(
        &mut self,
        bytes: &[u8],
        uri: &str,
        rng: &mut JobRng,
    ) -> Result<(Tensor, Tensor)> {
        let img = image_io::decode(bytes, uri, self.cfg.image_limits)?;
        let native = tasks::Geometry::of(self.model.manifest()).native;
        let pixels = image_io::preprocess(&img, native);
        let (mean, logvar) = self.model.vae_encode(&pixels)?;
        let vae = &self.model.manifest().values.vae;
        let (scale, shift) = (vae.scaling_factor as f32, vae.shift_factor as f32);
        let mut z = mean;
        if self.cfg.caption_latent == LatentMode::Sample {
            for (zi, lv) in z.data.iter_mut().zip(&logvar.data) {
                *zi += (0.5 * lv).exp() * rng.normal();
            }
        }
        z.data.iter_mut().for_each(|x| *x = (*x - shift) * scale);
        self.model.encode_image(&z)
    }

    fn masked_work(
        &mut self,
        (image, bytes): (&str, Result<Vec<u8>>),
        prefix: Vec<i64>,
        length: usize,
        steps: u32,
        seed: u64,
    ) -> Result<Work> {
        let mut rng = JobRng::new(seed);
        let (image_tokens, temb) = self.encode_image(&bytes?, image, &mut rng)?;
        let v = &self.model.manifest().values;
        // The answer (or caption) is the text written after the prefix.
        let answer_from = prefix.len();
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

    fn prepare_caption(&mut self, p: CaptionPlan, bytes: Result<Vec<u8>>) -> Result<Work> {
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
        let input = (p.image.as_str(), bytes);
        self.masked_work(input, prefix, p.length as usize, p.steps, p.seed)
    }

    fn prepare_vqa(&mut self, p: VqaPlan, bytes: Result<Vec<u8>>) -> Result<Work> {
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
        let input = (p.image.as_str(), bytes);
        self.masked_work(input, prefix, p.length as usize, p.steps, p.seed)
    }
}
