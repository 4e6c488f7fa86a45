//! The engine: a verified model package and one ONNX Runtime session per segment.
//!
//! Sessions need `&mut self` to run, so an engine belongs to one inference thread; a worker with
//! several inference threads holds several engines. Every method is batch-first.

mod cached;
pub mod dtype;
pub mod package;
pub mod placement;
pub mod profiles;
pub mod providers;
pub mod session;

use ddit_schemas::{Manifest, Role};

use dtype::to_host;
pub use package::Package;
pub use placement::Placement;
pub use providers::{
    parse_bytes, parse_providers, ArenaExtend, ConvSearch, CudaOptions, EngineConfig, Provider,
    TensorRtOptions,
};
use session::{Bound, Input, Segment};

use crate::error::{Result, WorkerError};
use crate::runner::{BlockCache, CacheUpdate, Model};
use crate::tensor::Tensor;

/// One of the joint blocks' two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Image,
    Text,
}

pub struct Engine {
    pub manifest: Manifest,
    /// Where the nodes run, read from the sessions ([`Placement::label`]).
    provider: String,
    placement: Placement,
    /// T5, in one piece or split by layers (each piece reads the previous one's output).
    text_encoder: Vec<Segment>,
    context_embedder: Segment,
    timestep_embed: Segment,
    patch_embed: Segment,
    /// Every joint block but the last.
    joint_blocks: Vec<Segment>,
    /// The last joint block, computing only the image stream / only the text stream.
    image_tail: Segment,
    text_tail: Segment,
    image_head: Segment,
    text_head: Segment,
    vae_encoder: Segment,
    vae_decoder: Segment,
    /// The device memory steps stay in, when they run through I/O bindings.
    bound: Option<ort::memory::MemoryInfo<'static>>,
    pub tokenizer_path: std::path::PathBuf,
}

fn take(v: &mut Vec<Tensor>, what: &str) -> Result<Tensor> {
    if v.is_empty() {
        return Err(WorkerError::Internal(format!("{what}: missing output")));
    }
    Ok(v.remove(0))
}

impl Engine {
    /// Creates every session of an already verified package ([`Package::open`], once per
    /// process). Fails before serving when a graph disagrees with its manifest entry.
    pub fn load(pkg: &Package, cfg: &EngineConfig) -> Result<Self> {
        let dir = &pkg.dir;
        pkg.check_providers(&cfg.providers)?;
        let env = session::environment(cfg)?;
        let load_role = |role: Role| -> Result<Segment> {
            let spec = pkg
                .manifest
                .by_role(role)
                .next()
                .ok_or_else(|| WorkerError::Package {
                    path: dir.display().to_string(),
                    message: format!("no {role} segment"),
                })?;
            Segment::load(env, cfg, &pkg.path_of(spec), spec, &pkg.manifest)
        };
        let load_all = |role: Role| {
            pkg.manifest
                .by_role(role)
                .map(|s| Segment::load(env, cfg, &pkg.path_of(s), s, &pkg.manifest))
                .collect::<Result<Vec<_>>>()
        };
        let joint_blocks = load_all(Role::JointBlocks)?;
        // One or more T5 pieces: the manifest's rules (`Manifest::validate`) make sure.
        let text_encoder = load_all(Role::TextEncoder)?;
        let mut e = Self {
            text_encoder,
            context_embedder: load_role(Role::ContextEmbedder)?,
            timestep_embed: load_role(Role::TimestepEmbed)?,
            patch_embed: load_role(Role::PatchEmbed)?,
            image_tail: load_role(Role::ImageTail)?,
            text_tail: load_role(Role::TextTail)?,
            image_head: load_role(Role::ImageHead)?,
            text_head: load_role(Role::TextHead)?,
            vae_encoder: load_role(Role::VaeEncoder)?,
            vae_decoder: load_role(Role::VaeDecoder)?,
            joint_blocks,
            bound: cfg.io_binding.then(|| cfg.device_memory()).transpose()?,
            provider: String::new(),
            placement: Placement::default(),
            tokenizer_path: pkg.tokenizer_path(),
            manifest: pkg.manifest.clone(),
        };
        let mut all = Placement::default();
        for seg in e.segments() {
            all.merge(&seg.placement);
        }
        e.placement = all;
        e.provider = e.placement.label();
        placement::observe(&e.provider);
        Ok(e)
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        let fixed = [
            &self.context_embedder,
            &self.timestep_embed,
            &self.patch_embed,
            &self.image_tail,
            &self.text_tail,
            &self.image_head,
            &self.text_head,
            &self.vae_encoder,
            &self.vae_decoder,
        ];
        self.text_encoder
            .iter()
            .chain(&self.joint_blocks)
            .chain(fixed)
    }

    /// Where the execution providers run the graphs' nodes, read from the sessions: `cpu`,
    /// `cuda`, `tensorrt`, or several joined by `+` ([`Placement::label`]).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Every segment's nodes by the execution provider that runs them.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Token ids `[B][L]` (equal lengths) -> text stream `[B, L, D]` (T5 then context embedder).
    pub fn encode_text(&mut self, ids: &[Vec<i64>]) -> Result<Tensor> {
        let l = ids.first().map(Vec::len).unwrap_or(0);
        if ids.iter().any(|r| r.len() != l) || l == 0 {
            return Err(WorkerError::Internal(
                "encode_text needs equal, non-zero lengths".into(),
            ));
        }
        let data: Vec<i64> = ids.iter().flatten().copied().collect();
        let mut pieces = self.text_encoder.iter_mut();
        let first = pieces
            .next()
            .ok_or_else(|| WorkerError::Internal("text_encoder: no segment".into()))?;
        let mut h = take(
            &mut first.run(vec![Input::I64 {
                shape: vec![ids.len(), l],
                data,
            }])?,
            "text_encoder",
        )?;
        for piece in pieces {
            h = take(&mut piece.run(vec![Input::F32(&h)])?, "text_encoder")?;
        }
        take(
            &mut self.context_embedder.run(vec![Input::F32(&h)])?,
            "context_embedder",
        )
    }

    /// Timesteps (0..num_train_timesteps scale) -> temb `[B, D]`.
    pub fn time_embed(&mut self, t: &[f32]) -> Result<Tensor> {
        let t = Tensor::new(vec![t.len()], t.to_vec())?;
        take(
            &mut self.timestep_embed.run(vec![Input::F32(&t)])?,
            "timestep_embed",
        )
    }

    /// Latents `[B, C, h, w]` (model space) -> image stream `[B, tokens, D]`.
    pub fn patch_embed(&mut self, latents: &Tensor) -> Result<Tensor> {
        take(
            &mut self.patch_embed.run(vec![Input::F32(latents)])?,
            "patch_embed",
        )
    }

    /// Every joint block, across all block files; returns the stream `keep` names, which is
    /// the only one the last block computes.
    pub fn blocks(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        temb: &Tensor,
        keep: Stream,
    ) -> Result<Tensor> {
        self.blocks_from(0, x, y, temb, keep)
    }

    /// [`Engine::blocks`] from block file `from` on (its inputs are the streams before it).
    fn blocks_from(
        &mut self,
        from: usize,
        x: &Tensor,
        y: &Tensor,
        temb: &Tensor,
        keep: Stream,
    ) -> Result<Tensor> {
        let mut state: Option<(Tensor, Tensor)> = None;
        for seg in self.joint_blocks.iter_mut().skip(from) {
            let (xi, yi) = state.as_ref().map_or((x, y), |(a, b)| (a, b));
            let inputs = vec![Input::F32(xi), Input::F32(yi), Input::F32(temb)];
            let mut out = seg.run(inputs)?;
            let nx = take(&mut out, "joint_blocks")?;
            state = Some((nx, take(&mut out, "joint_blocks")?));
        }
        let (xi, yi) = state.as_ref().map_or((x, y), |(a, b)| (a, b));
        let (tail, what) = match keep {
            Stream::Image => (&mut self.image_tail, "image_tail"),
            Stream::Text => (&mut self.text_tail, "text_tail"),
        };
        let inputs = vec![Input::F32(xi), Input::F32(yi), Input::F32(temb)];
        take(&mut tail.run(inputs)?, what)
    }

    /// Image stream -> velocity `[B, C, h, w]` of the shape of `latents` (read for their
    /// shape only).
    pub fn image_head(&mut self, x: &Tensor, temb: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let inputs = vec![Input::F32(x), Input::F32(temb), Input::F32(latents)];
        take(&mut self.image_head.run(inputs)?, "image_head")
    }

    /// [`Model::velocity`] through I/O bindings: temb and both streams stay in `device` memory
    /// from segment to segment (on a GPU, they never cross to the host); only the latents and
    /// the context go in, and only the velocity comes back.
    pub fn velocity_bound(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        device: &ort::memory::MemoryInfo,
    ) -> Result<Tensor> {
        let first = |v: Vec<ort::value::DynValue>, what: &str| {
            v.into_iter()
                .next()
                .ok_or_else(|| WorkerError::Internal(format!("{what}: missing output")))
        };
        let t = Tensor::new(vec![timesteps.len()], timesteps.to_vec())?;
        let host = |t| Bound::Host(Input::F32(t));
        let temb = self.timestep_embed.run_bound(vec![host(&t)], device)?;
        let temb = first(temb, "timestep_embed")?;
        let x = self.patch_embed.run_bound(vec![host(latents)], device)?;
        let mut x = first(x, "patch_embed")?;
        let mut y: Option<ort::value::DynValue> = None;
        for seg in &mut self.joint_blocks {
            let text = y.as_ref().map_or(host(context), Bound::Device);
            let inputs = vec![Bound::Device(&x), text, Bound::Device(&temb)];
            let mut out = seg.run_bound(inputs, device)?.into_iter();
            let (Some(nx), ny) = (out.next(), out.next()) else {
                return Err(WorkerError::Internal("joint_blocks: missing output".into()));
            };
            (x, y) = (nx, ny);
        }
        let text = y.as_ref().map_or(host(context), Bound::Device);
        let inputs = vec![Bound::Device(&x), text, Bound::Device(&temb)];
        let x = first(self.image_tail.run_bound(inputs, device)?, "image_tail")?;
        let inputs = vec![Bound::Device(&x), Bound::Device(&temb), host(latents)];
        let v = self.image_head.run_bound(inputs, device)?;
        to_host(&first(v, "image_head")?, "image_head")
    }

    /// Text stream -> logits `[B, L, V]`.
    pub fn text_head(&mut self, y: &Tensor) -> Result<Tensor> {
        take(&mut self.text_head.run(vec![Input::F32(y)])?, "text_head")
    }

    /// Image in [-1, 1] `[B, 3, H, W]` -> (posterior mean, logvar), VAE space.
    pub fn vae_encode(&mut self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut out = self.vae_encoder.run(vec![Input::F32(image)])?;
        Ok((
            take(&mut out, "vae_encoder")?,
            take(&mut out, "vae_encoder")?,
        ))
    }

    /// VAE-space latent -> image in [-1, 1].
    pub fn vae_decode(&mut self, z: &Tensor) -> Result<Tensor> {
        take(
            &mut self.vae_decoder.run(vec![Input::F32(z)])?,
            "vae_decoder",
        )
    }
}

impl Model for Engine {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn provider(&self) -> &str {
        &self.provider
    }

    fn encode_text(&mut self, ids: &[Vec<i64>]) -> Result<Tensor> {
        Engine::encode_text(self, ids)
    }

    fn encode_image(&mut self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let tokens = self.patch_embed(latents)?;
        let temb = self.time_embed(&[0.0])?;
        Ok((tokens, temb))
    }

    fn vae_encode(&mut self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        Engine::vae_encode(self, image)
    }

    fn vae_decode(&mut self, z: &Tensor) -> Result<Tensor> {
        Engine::vae_decode(self, z)
    }

    fn velocity(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
    ) -> Result<Tensor> {
        if let Some(device) = self.bound.take() {
            let v = self.velocity_bound(latents, context, timesteps, &device);
            self.bound = Some(device);
            return v;
        }
        let temb = self.time_embed(timesteps)?;
        let x = self.patch_embed(latents)?;
        let x = self.blocks(&x, context, &temb, Stream::Image)?;
        self.image_head(&x, &temb, latents)
    }

    /// On the host even under `--io-binding`: the cache is compared and kept in host memory.
    fn velocity_cached(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        caches: &[&BlockCache],
    ) -> Result<(Tensor, Vec<CacheUpdate>)> {
        self.velocity_cached_host(latents, context, timesteps, caches)
    }

    fn logits(
        &mut self,
        image_tokens: &Tensor,
        temb: &Tensor,
        ids: &[Vec<i64>],
        positions: &[Vec<usize>],
    ) -> Result<Tensor> {
        let y = Engine::encode_text(self, ids)?;
        let y = self.blocks(image_tokens, &y, temb, Stream::Text)?;
        // The head is per token: only the wanted positions go through its `D x V` projection.
        let (l, d) = (y.shape[1], y.shape[2]);
        let mut rows = Vec::with_capacity(positions.iter().map(Vec::len).sum::<usize>() * d);
        for (b, ps) in positions.iter().enumerate() {
            for &p in ps {
                let at = (b * l + p) * d;
                let row = y.data.get(at..at + d).ok_or_else(|| {
                    WorkerError::Internal(format!("text position {p} of row {b} out of range"))
                })?;
                rows.extend_from_slice(row);
            }
        }
        let m = rows.len() / d.max(1);
        self.text_head(&Tensor::new(vec![1, m, d], rows)?)
    }
}
