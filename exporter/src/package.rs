//! Writing a model package: ONNX segments, tokenizer and `manifest.json`.

use std::path::{Path, PathBuf};

use ddit_schemas::{
    package_hash, sha256_file, Dim as SDim, FileEntry, Manifest, ModelInfo, ModelValues, Role,
    SchedulerValues, SegmentSpec, TensorDtype, TensorSpec, TextLengths, TokenIds, VaeValues,
    MANIFEST_FILE, MANIFEST_FORMAT_VERSION,
};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::graph::Io;
use crate::onnx::write::{model_bytes, Weights, OPSET};
use crate::onnx::{DType, Dim, Graph};
use crate::segments::transformer::{self, Keep};
use crate::segments::{t5, vae, StoreDtype};

/// Protobuf files cannot exceed 2 GiB; segments whose weights pass this many bytes use
/// external data. Kept below 2^31 to leave room for the graph itself.
pub const DEFAULT_EXTERNAL_THRESHOLD: u64 = 2_000_000_000;

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
    /// Joint blocks per ONNX file; `None` puts all blocks in one file.
    pub blocks_per_segment: Option<usize>,
    pub external_data_threshold: u64,
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
            blocks_per_segment: None,
            external_data_threshold: DEFAULT_EXTERNAL_THRESHOLD,
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
    segments: Vec<SegmentSpec>,
}

impl SegmentWriter<'_> {
    fn write(&mut self, g: &Graph, role: Role, blocks: Option<[u64; 2]>) -> Result<()> {
        let out = self.out;
        let name = g.name.clone();
        let onnx_name = format!("{name}.onnx");
        let data_name = format!("{name}.onnx.data");
        let external = g.weight_bytes() > self.threshold;
        let doc = format!("ddit segment `{name}` (role {role})");
        let weights = if external {
            Weights::External {
                data_path: &out.join(&data_name),
                location: &data_name,
            }
        } else {
            Weights::Inline
        };
        let bytes = model_bytes(g, weights, &doc)?;
        let path = out.join(&onnx_name);
        std::fs::write(&path, &bytes).map_err(|e| ExportError::io(&path, e))?;
        let mut files = vec![file_entry(out, &onnx_name)?];
        if external {
            files.push(file_entry(out, &data_name)?);
        }
        self.segments.push(SegmentSpec {
            name,
            role,
            blocks,
            files,
            parameters: g.param_count(),
            inputs: g.inputs.iter().map(spec).collect(),
            outputs: g.outputs.iter().map(spec).collect(),
        });
        Ok(())
    }
}

/// Block ranges `[start, end)` of `k` blocks each (the last may be shorter).
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
    Ok((0..num_layers)
        .step_by(k.max(1))
        .map(|s| (s, (s + k).min(num_layers)))
        .collect())
}

/// Builds and writes every segment, one graph at a time (bounded memory). Returns the manifest
/// entries and the number of tokens `null_image_embd` stands in with.
fn write_segments(ck: &Checkpoint, opts: &ExportOptions) -> Result<(Vec<SegmentSpec>, usize)> {
    // int8 applies to the joint blocks and T5 (most of the FLOPs); the rest stays float.
    let (tc, tw, quantized) = (&ck.transformer, &ck.transformer_weights, opts.dtype);
    let store = quantized.unquantized();
    let mut w = SegmentWriter {
        out: &opts.out,
        threshold: opts.external_data_threshold,
        segments: Vec::new(),
    };
    w.write(
        &t5::encoder(&ck.t5, &ck.t5_weights, quantized)?,
        Role::TextEncoder,
        None,
    )?;
    let ctx = transformer::context_embedder(tc, tw, store)?;
    w.write(&ctx, Role::ContextEmbedder, None)?;
    let temb = transformer::timestep_embed(tc, tw, store)?;
    w.write(&temb, Role::TimestepEmbed, None)?;
    w.write(
        &transformer::patch_embed(tc, tw, store)?,
        Role::PatchEmbed,
        None,
    )?;
    let (null_graph, null_tokens) = transformer::null_image(tc, tw, store)?;
    w.write(&null_graph, Role::NullImage, None)?;
    // Every block but the last, K per file; the last twice, each copy computing one stream.
    let last = tc.num_layers.checked_sub(1).ok_or(ExportError::Argument {
        name: "num_layers".into(),
        message: "the transformer has no joint blocks".into(),
    })?;
    let tails = [(Keep::Image, Role::ImageTail), (Keep::Text, Role::TextTail)];
    let ranges = block_ranges(last, opts.blocks_per_segment)?;
    let ranges = ranges
        .into_iter()
        .map(|r| (r, Keep::Both, Role::JointBlocks));
    let tails = tails.map(|(k, role)| ((last, last + 1), k, role));
    for ((s, e), keep, role) in ranges.chain(tails) {
        let g = transformer::joint_blocks(tc, tw, quantized, (s, e), keep)?;
        w.write(&g, role, Some([s as u64, e as u64]))?;
    }
    w.write(
        &transformer::image_head(tc, tw, store)?,
        Role::ImageHead,
        None,
    )?;
    let head = transformer::text_head(tc, tw, store, ck.vocab_size)?;
    w.write(&head, Role::TextHead, None)?;
    w.write(
        &vae::encoder(&ck.vae, &ck.vae_weights, store)?,
        Role::VaeEncoder,
        None,
    )?;
    w.write(
        &vae::decoder(&ck.vae, &ck.vae_weights, store)?,
        Role::VaeDecoder,
        None,
    )?;
    Ok((w.segments, null_tokens))
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
            opset: OPSET,
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
