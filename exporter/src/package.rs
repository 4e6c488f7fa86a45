//! Writing a model package: ONNX segments, tokenizer and `manifest.json`.

use std::path::{Path, PathBuf};

use ddit_schemas::{
    package_hash, sha256_file, Dim as SDim, FileEntry, Manifest, ModelInfo, ModelValues, Precision,
    Role, SchedulerValues, SegmentSpec, TensorDtype, TensorSpec, TextLengths, TokenIds, VaeValues,
    MANIFEST_FILE, MANIFEST_FORMAT_VERSION,
};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::graph::Io;
use crate::onnx::tensorrt;
use crate::onnx::write::{model_bytes, size_bound, Weights};
use crate::onnx::{DType, Dim, Graph};
use crate::segments::transformer::{self, Keep};
use crate::segments::{t5, vae, Form, StoreDtype, Target};

/// Protobuf files cannot exceed 2 GiB; segments whose weights pass this many bytes use
/// external data. Kept below 2^31 to leave room for the graph itself.
pub const DEFAULT_EXTERNAL_THRESHOLD: u64 = 2_000_000_000;

/// No segment's files (the `.onnx` and its external data together) pass this many bytes by
/// default: TensorRT's parser reads a model through protobuf, whose messages stop at 2 GiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 2_000_000_000;

/// Canvas lengths given on the command line; `None` takes the checkpoint's (its
/// `model_index.json` `text_lengths`, else the published D-DiT's 256 / 128 / 128).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LengthOverrides {
    pub prompt: Option<u64>,
    pub caption: Option<u64>,
    pub vqa: Option<u64>,
}

impl LengthOverrides {
    fn apply(&self, base: &TextLengths) -> TextLengths {
        TextLengths {
            prompt: self.prompt.unwrap_or(base.prompt),
            caption: self.caption.unwrap_or(base.caption),
            vqa: self.vqa.unwrap_or(base.vqa),
        }
    }
}

/// Everything `ddit-export convert` takes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub dtype: StoreDtype,
    /// What the transformer's segments (but the timestep embedding) and the VAE compute in;
    /// T5 and the timestep embedding stay fp32 (T5 overflows in fp16).
    pub precision: Precision,
    /// Joint blocks per ONNX file; `None` puts all blocks in one file.
    pub blocks_per_segment: Option<usize>,
    pub external_data_threshold: u64,
    /// Most bytes of one segment's files together: joint blocks and T5 layers are split into
    /// as many files as it takes ([`DEFAULT_MAX_FILE_BYTES`]).
    pub max_file_bytes: u64,
    /// The execution provider the graphs are written for.
    pub target: Target,
    pub mask_token: Option<String>,
    pub name: Option<String>,
    pub text_lengths: LengthOverrides,
    /// Default caption prompt prefix: `None` takes the checkpoint's (`model_index.json`
    /// `caption_prompt`), `Some("")` records none.
    pub caption_prompt: Option<String>,
    /// Replace an existing package in `out`.
    pub force: bool,
}

impl ExportOptions {
    pub fn new(checkpoint: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            out: out.into(),
            dtype: StoreDtype::F32,
            precision: Precision::Fp32,
            blocks_per_segment: None,
            external_data_threshold: DEFAULT_EXTERNAL_THRESHOLD,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            target: Target::Cpu,
            mask_token: None,
            name: None,
            text_lengths: LengthOverrides::default(),
            caption_prompt: None,
            force: false,
        }
    }
}

fn file_entry(dir: &Path, name: &str) -> Result<FileEntry> {
    let (sha256, bytes) = sha256_file(&dir.join(name))?;
    Ok(FileEntry {
        path: name.to_string(),
        sha256,
        bytes,
    })
}

fn spec(io: &Io) -> TensorSpec {
    TensorSpec {
        name: io.name.clone(),
        dtype: match io.dtype {
            // Graph I/O is never int8 (only weights are).
            DType::F32 | DType::I8 => TensorDtype::F32,
            DType::F16 => TensorDtype::F16,
            DType::BF16 => TensorDtype::Bf16,
            DType::I64 => TensorDtype::I64,
        },
        shape: io
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => SDim::Fixed(*v as u64),
                Dim::Sym(s) => SDim::Sym((*s).to_string()),
            })
            .collect(),
    }
}

/// Writes segments one at a time into the package folder, collecting their manifest entries.
struct SegmentWriter<'a> {
    out: &'a Path,
    threshold: u64,
    limit: u64,
    target: Target,
    segments: Vec<SegmentSpec>,
}

impl SegmentWriter<'_> {
    /// Whether `g`'s weights go to an external-data file.
    fn external(&self, g: &Graph) -> bool {
        g.weight_bytes() > self.threshold
    }

    /// Whether `g`'s files would stay within `--max-file-bytes`.
    fn fits(&self, g: &Graph) -> bool {
        size_bound(g, self.external(g)) <= self.limit
    }

    fn too_large(&self, what: &str, bytes: u64) -> ExportError {
        ExportError::Argument {
            name: "max-file-bytes".into(),
            message: format!(
                "{what} takes {bytes} bytes, over the limit of {} per segment (one layer is \
                 the smallest piece)",
                self.limit
            ),
        }
    }

    fn write(&mut self, mut g: Graph, role: Role, blocks: Option<[u64; 2]>) -> Result<()> {
        g.opset = self.target.opset();
        if self.target == Target::TensorRt {
            tensorrt::check(&g)?;
        }
        let external = self.external(&g);
        let bound = size_bound(&g, external);
        if bound > self.limit {
            return Err(self.too_large(&format!("segment {}", g.name), bound));
        }
        let out = self.out;
        let name = g.name.clone();
        let onnx_name = format!("{name}.onnx");
        let data_name = format!("{name}.onnx.data");
        let doc = format!("ddit segment `{name}` (role {role})");
        let weights = if external {
            Weights::External {
                data_path: &out.join(&data_name),
                location: &data_name,
            }
        } else {
            Weights::Inline
        };
        let bytes = model_bytes(&g, weights, &doc)?;
        let path = out.join(&onnx_name);
        std::fs::write(&path, &bytes).map_err(|e| ExportError::io(&path, e))?;
        let mut files = vec![file_entry(out, &onnx_name)?];
        if external {
            files.push(file_entry(out, &data_name)?);
        }
        let total: u64 = files.iter().map(|f| f.bytes).sum();
        if total > self.limit {
            return Err(self.too_large(&format!("segment {name} as written"), total));
        }
        self.segments.push(SegmentSpec {
            name,
            role,
            blocks,
            files,
            parameters: g.param_count(),
            precision: match g.float {
                DType::F16 => Precision::Fp16,
                DType::BF16 => Precision::Bf16,
                _ => Precision::Fp32,
            },
            inputs: g.inputs.iter().map(spec).collect(),
            outputs: g.outputs.iter().map(spec).collect(),
        });
        Ok(())
    }

    /// Splits each of `ranges` (layers `[start, end)`) into consecutive pieces whose graph
    /// (`build`) fits the limit, each as long as it may be; writes each as `role`. Returns how
    /// many pieces were written.
    fn write_layers(
        &mut self,
        ranges: Vec<(usize, usize)>,
        role: Role,
        build: impl Fn(usize, usize) -> Result<Graph>,
    ) -> Result<usize> {
        let mut pieces = Vec::new();
        for (start, end) in ranges {
            let mut s = start;
            while s < end {
                let mut e = s + 1;
                let first = build(s, e)?;
                if !self.fits(&first) {
                    let bytes = size_bound(&first, self.external(&first));
                    return Err(self.too_large(&format!("{role} layer {s}"), bytes));
                }
                while e < end && self.fits(&build(s, e + 1)?) {
                    e += 1;
                }
                pieces.push((s, e));
                s = e;
            }
        }
        let whole = pieces.len() == 1;
        for &(s, e) in &pieces {
            // One piece covering every layer keeps the unsplit manifest (no range) for T5.
            let blocks = (role == Role::JointBlocks || !whole).then_some([s as u64, e as u64]);
            self.write(build(s, e)?, role, blocks)?;
        }
        Ok(pieces.len())
    }
}

/// Block ranges `[start, end)`: block 0 alone, then `k` blocks each (the last may be shorter;
/// all the others when `None`).
pub fn block_ranges(num_layers: usize, k: Option<usize>) -> Result<Vec<(usize, usize)>> {
    let k = match k {
        None => num_layers,
        Some(0) => {
            return Err(ExportError::Argument {
                name: "blocks-per-segment".into(),
                message: "must be at least 1".into(),
            })
        }
        Some(k) => k.min(num_layers),
    };
    let first = (num_layers > 0).then_some((0, 1));
    Ok(first
        .into_iter()
        .chain(
            (1..num_layers)
                .step_by(k.max(1))
                .map(|s| (s, (s + k).min(num_layers))),
        )
        .collect())
}

/// Builds and writes every segment, one graph at a time (bounded memory). Returns the manifest
/// entries and the number of tokens `null_image_embd` stands in with.
fn write_segments(ck: &Checkpoint, opts: &ExportOptions) -> Result<(Vec<SegmentSpec>, usize)> {
    // int8 applies to the joint blocks and T5 (most of the FLOPs); the rest stays float.
    let (tc, tw, quantized) = (&ck.transformer, &ck.transformer_weights, opts.dtype);
    let target = opts.target;
    check_options(opts)?;
    // T5 and the timestep embedding in fp32; the rest in `--precision`.
    let f32_form = |store| Form {
        store,
        target,
        precision: Precision::Fp32,
    };
    let form = |store| Form {
        store,
        target,
        precision: opts.precision,
    };
    let plain = form(quantized.unquantized());
    let mut w = SegmentWriter {
        out: &opts.out,
        threshold: opts.external_data_threshold,
        limit: opts.max_file_bytes,
        target,
        segments: Vec::new(),
    };
    let (t5c, t5w) = (&ck.t5, &ck.t5_weights);
    w.write_layers(vec![(0, t5c.num_layers)], Role::TextEncoder, |s, e| {
        t5::encoder(t5c, t5w, f32_form(quantized), (s, e))
    })?;
    w.write(
        transformer::context_embedder(tc, tw, plain)?,
        Role::ContextEmbedder,
        None,
    )?;
    w.write(
        transformer::timestep_embed(tc, tw, f32_form(quantized.unquantized()))?,
        Role::TimestepEmbed,
        None,
    )?;
    w.write(
        transformer::patch_embed(tc, tw, plain)?,
        Role::PatchEmbed,
        None,
    )?;
    let (null_graph, null_tokens) = transformer::null_image(tc, tw, plain)?;
    w.write(null_graph, Role::NullImage, None)?;
    // Every block but the last: block 0 in a file of its own (the block cache's probe: the
    // worker runs it alone to decide whether to run the others), then K per file at most; the
    // last twice, each copy computing one stream.
    let last = tc.num_layers.checked_sub(1).ok_or(ExportError::Argument {
        name: "num_layers".into(),
        message: "the transformer has no joint blocks".into(),
    })?;
    let blocks = |r, keep| transformer::joint_blocks(tc, tw, form(quantized), r, keep);
    w.write_layers(
        block_ranges(last, opts.blocks_per_segment)?,
        Role::JointBlocks,
        |s, e| blocks((s, e), Keep::Both),
    )?;
    for (keep, role) in [(Keep::Image, Role::ImageTail), (Keep::Text, Role::TextTail)] {
        let b = Some([last as u64, last as u64 + 1]);
        w.write(blocks((last, last + 1), keep)?, role, b)?;
    }
    w.write(
        transformer::image_head(tc, tw, plain)?,
        Role::ImageHead,
        None,
    )?;
    let head = transformer::text_head(tc, tw, plain, ck.vocab_size)?;
    w.write(head, Role::TextHead, None)?;
    let (vc, vw) = (&ck.vae, &ck.vae_weights);
    w.write(vae::encoder(vc, vw, plain)?, Role::VaeEncoder, None)?;
    w.write(vae::decoder(vc, vw, plain)?, Role::VaeDecoder, None)?;
    Ok((w.segments, null_tokens))
}

/// The combinations of options no package can be written for.
fn check_options(opts: &ExportOptions) -> Result<()> {
    let int8 = opts.dtype == StoreDtype::Int8;
    if opts.target == Target::TensorRt && int8 {
        return Err(ExportError::Argument {
            name: "target".into(),
            message: "int8 weights use ONNX Runtime's CPU contrib operators (com.microsoft), \
                      which TensorRT cannot parse: export f32 or f16 weights for --target \
                      tensorrt"
                .into(),
        });
    }
    if opts.precision != Precision::Fp32 && int8 {
        return Err(ExportError::Argument {
            name: "precision".into(),
            message: format!(
                "int8 weights compute in f32 (MatMulIntegerToFloat): --weights int8 needs \
                 --precision fp32, not {}",
                opts.precision
            ),
        });
    }
    Ok(())
}

/// Every model value the worker needs, from the checkpoint and the options.
fn model_values(ck: &Checkpoint, opts: &ExportOptions, null_tokens: usize) -> ModelValues {
    let tc = &ck.transformer;
    ModelValues {
        hidden_size: tc.hidden as u64,
        num_layers: tc.num_layers as u64,
        num_heads: tc.num_heads as u64,
        patch_size: tc.patch_size as u64,
        latent_channels: tc.in_channels as u64,
        pos_embed_max_size: tc.pos_embed_max_size as u64,
        sample_size: tc.sample_size as u64,
        vocab_size: ck.vocab_size as u64,
        text_hidden_size: ck.t5.d_model as u64,
        null_image_tokens: null_tokens as u64,
        tokens: TokenIds {
            mask_id: ck.tokenizer.mask_id,
            mask_token: ck.tokenizer.mask_token.clone(),
            pad_id: ck.tokenizer.pad_id,
            eos_id: ck.tokenizer.eos_id,
        },
        vae: VaeValues {
            scaling_factor: ck.vae.scaling_factor,
            shift_factor: ck.vae.shift_factor,
            downsample_factor: ck.vae.downsample_factor() as u64,
            image_channels: ck.vae.in_channels as u64,
        },
        scheduler: SchedulerValues {
            shift: ck.scheduler.shift,
            num_train_timesteps: ck.scheduler.num_train_timesteps as u64,
        },
        text_lengths: opts.text_lengths.apply(&ck.text_lengths),
        caption_prompt: opts
            .caption_prompt
            .clone()
            .or_else(|| ck.caption_prompt.clone())
            .filter(|s| !s.trim().is_empty()),
    }
}

/// Converts a checkpoint into a model package. Returns the manifest written.
pub fn convert(opts: &ExportOptions) -> Result<Manifest> {
    let ck = Checkpoint::open(&opts.checkpoint, opts.mask_token.as_deref())?;
    let out = &opts.out;
    if out.join(MANIFEST_FILE).exists() && !opts.force {
        return Err(ExportError::Argument {
            name: "out".into(),
            message: format!(
                "{} already holds a package (pass --force to replace it)",
                out.display()
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| ExportError::io(out, e))?;
    let (segments, null_tokens) = write_segments(&ck, opts)?;
    let tok_dst = out.join("tokenizer.json");
    std::fs::copy(&ck.tokenizer.path, &tok_dst)
        .map_err(|e| ExportError::io(&ck.tokenizer.path, e))?;
    let name = opts.name.clone().unwrap_or_else(|| {
        ck.root
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "ddit".into())
    });
    let mut manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        model: ModelInfo {
            name,
            hash: String::new(),
            weights_dtype: opts.dtype.as_str().into(),
            exporter_version: env!("CARGO_PKG_VERSION").into(),
            opset: opts.target.opset(),
        },
        values: model_values(&ck, opts, null_tokens),
        tokenizer: file_entry(out, "tokenizer.json")?,
        segments,
    };
    manifest.model.hash = package_hash(manifest.files());
    let mpath = out.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ExportError::Package {
        path: mpath.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&mpath, text + "\n").map_err(|e| ExportError::io(&mpath, e))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::block_ranges;

    #[test]
    fn block_0_is_alone_then_k_per_file() {
        let r = |n, k| block_ranges(n, k).ok();
        assert_eq!(r(0, None), Some(vec![]));
        assert_eq!(r(1, None), Some(vec![(0, 1)]));
        assert_eq!(r(2, None), Some(vec![(0, 1), (1, 2)]));
        assert_eq!(r(5, None), Some(vec![(0, 1), (1, 5)]));
        assert_eq!(
            r(5, Some(1)),
            Some(vec![(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)])
        );
        assert_eq!(r(6, Some(2)), Some(vec![(0, 1), (1, 3), (3, 5), (5, 6)]));
        assert_eq!(r(3, Some(9)), Some(vec![(0, 1), (1, 3)]));
        assert_eq!(r(3, Some(0)), None);
    }
}
