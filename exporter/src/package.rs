//! Writing and verifying a model package: ONNX segments, tokenizer and `manifest.json`.

use std::io::Read;
use std::path::{Path, PathBuf};

use ddit_schemas::{
    Dim as SDim, FileEntry, Manifest, ModelInfo, ModelValues, Role, SchedulerValues, SegmentSpec,
    TensorDtype, TensorSpec, TextLengths, TokenIds, VaeValues, MANIFEST_FORMAT_VERSION,
};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::graph::Io;
use crate::onnx::write::{model_bytes, Weights, OPSET};
use crate::onnx::{DType, Dim, Graph};
use crate::segments::{t5, transformer, vae, StoreDtype};

/// Protobuf files cannot exceed 2 GiB; segments whose weights pass this many bytes use
/// external data. Kept below 2^31 to leave room for the graph itself.
pub const DEFAULT_EXTERNAL_THRESHOLD: u64 = 2_000_000_000;

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
    pub text_lengths: TextLengths,
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
            text_lengths: TextLengths {
                prompt: 256,
                caption: 128,
                vqa: 128,
            },
            caption_prompt: None,
            force: false,
        }
    }
}

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| ExportError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| ExportError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_entry(dir: &Path, name: &str) -> Result<FileEntry> {
    let (sha256, bytes) = sha256_file(&dir.join(name))?;
    Ok(FileEntry {
        path: name.to_string(),
        sha256,
        bytes,
    })
}

/// The package identity: sha256 over the sorted `path sha256` lines of its files.
pub fn package_hash<'a>(files: impl Iterator<Item = &'a FileEntry>) -> String {
    let mut lines: Vec<String> = files
        .map(|f| format!("{} {}\n", f.path, f.sha256))
        .collect();
    lines.sort();
    let mut h = Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
    }
    hex(&h.finalize())
}

fn spec(io: &Io) -> TensorSpec {
    TensorSpec {
        name: io.name.clone(),
        dtype: match io.dtype {
            DType::F32 => TensorDtype::F32,
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

/// Writes one segment and returns its manifest entry.
fn write_segment(
    out: &Path,
    g: &Graph,
    role: Role,
    blocks: Option<[u64; 2]>,
    threshold: u64,
) -> Result<SegmentSpec> {
    let name = g.name.clone();
    let onnx_name = format!("{name}.onnx");
    let data_name = format!("{name}.onnx.data");
    let external = g.weight_bytes() > threshold;
    let doc = format!("ddit segment `{name}` (role {role})");
    let bytes = if external {
        model_bytes(
            g,
            Weights::External {
                data_path: &out.join(&data_name),
                location: &data_name,
            },
            &doc,
        )?
    } else {
        model_bytes(g, Weights::Inline, &doc)?
    };
    let path = out.join(&onnx_name);
    std::fs::write(&path, &bytes).map_err(|e| ExportError::io(&path, e))?;
    let mut files = vec![file_entry(out, &onnx_name)?];
    if external {
        files.push(file_entry(out, &data_name)?);
    }
    Ok(SegmentSpec {
        name,
        role,
        blocks,
        files,
        parameters: g.param_count(),
        inputs: g.inputs.iter().map(spec).collect(),
        outputs: g.outputs.iter().map(spec).collect(),
    })
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
        .step_by(k)
        .map(|s| (s, (s + k).min(num_layers)))
        .collect())
}

/// Converts a checkpoint into a model package. Returns the manifest written.
pub fn convert(opts: &ExportOptions) -> Result<Manifest> {
    let ck = Checkpoint::open(&opts.checkpoint, opts.mask_token.as_deref())?;
    let out = &opts.out;
    if out.join("manifest.json").exists() && !opts.force {
        return Err(ExportError::Argument {
            name: "out".into(),
            message: format!(
                "{} already holds a package (pass --force to replace it)",
                out.display()
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| ExportError::io(out, e))?;
    let store = opts.dtype;
    let tc = &ck.transformer;
    let tw = &ck.transformer_weights;
    let thr = opts.external_data_threshold;

    // Build one graph at a time and write it before building the next (bounded memory).
    let mut segments = vec![write_segment(
        out,
        &t5::encoder(&ck.t5, &ck.t5_weights, store)?,
        Role::TextEncoder,
        None,
        thr,
    )?];
    segments.push(write_segment(
        out,
        &transformer::context_embedder(tc, tw, store)?,
        Role::ContextEmbedder,
        None,
        thr,
    )?);
    segments.push(write_segment(
        out,
        &transformer::timestep_embed(tc, tw, store)?,
        Role::TimestepEmbed,
        None,
        thr,
    )?);
    segments.push(write_segment(
        out,
        &transformer::patch_embed(tc, tw, store)?,
        Role::PatchEmbed,
        None,
        thr,
    )?);
    let (null_graph, null_tokens) = transformer::null_image(tc, tw, store)?;
    segments.push(write_segment(out, &null_graph, Role::NullImage, None, thr)?);
    for (s, e) in block_ranges(tc.num_layers, opts.blocks_per_segment)? {
        let g = transformer::joint_blocks(tc, tw, store, s, e)?;
        segments.push(write_segment(
            out,
            &g,
            Role::JointBlocks,
            Some([s as u64, e as u64]),
            thr,
        )?);
    }
    segments.push(write_segment(
        out,
        &transformer::image_head(tc, tw, store)?,
        Role::ImageHead,
        None,
        thr,
    )?);
    segments.push(write_segment(
        out,
        &transformer::text_head(tc, tw, store, ck.vocab_size)?,
        Role::TextHead,
        None,
        thr,
    )?);
    segments.push(write_segment(
        out,
        &vae::encoder(&ck.vae, &ck.vae_weights, store)?,
        Role::VaeEncoder,
        None,
        thr,
    )?);
    segments.push(write_segment(
        out,
        &vae::decoder(&ck.vae, &ck.vae_weights, store)?,
        Role::VaeDecoder,
        None,
        thr,
    )?);

    let tok_dst = out.join("tokenizer.json");
    std::fs::copy(&ck.tokenizer.path, &tok_dst)
        .map_err(|e| ExportError::io(&ck.tokenizer.path, e))?;
    let tokenizer = file_entry(out, "tokenizer.json")?;

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
            weights_dtype: store.as_str().into(),
            exporter_version: env!("CARGO_PKG_VERSION").into(),
            opset: OPSET,
        },
        values: ModelValues {
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
            text_lengths: opts.text_lengths.clone(),
            caption_prompt: opts
                .caption_prompt
                .clone()
                .or_else(|| ck.caption_prompt.clone())
                .filter(|s| !s.trim().is_empty()),
        },
        tokenizer,
        segments,
    };
    manifest.model.hash = package_hash(manifest.files());
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ExportError::Package {
        path: out.join("manifest.json"),
        message: e.to_string(),
    })?;
    let mpath = out.join("manifest.json");
    std::fs::write(&mpath, text + "\n").map_err(|e| ExportError::io(&mpath, e))?;
    Ok(manifest)
}

/// Reads `pkg/manifest.json`, checks its version and every file's size and sha256.
pub fn verify(pkg: &Path) -> Result<Manifest> {
    let mpath = pkg.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|e| ExportError::io(&mpath, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| ExportError::Json {
        path: mpath.clone(),
        source: e,
    })?;
    let version = raw.get("format_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(MANIFEST_FORMAT_VERSION)) {
        return Err(ExportError::Package {
            path: mpath,
            message: format!(
                "format_version: expected {MANIFEST_FORMAT_VERSION}, found {version:?}"
            ),
        });
    }
    let m: Manifest = serde_json::from_value(raw).map_err(|e| ExportError::Json {
        path: mpath.clone(),
        source: e,
    })?;
    for f in m.files() {
        if f.path.contains('/') || f.path.contains("..") {
            return Err(ExportError::Package {
                path: mpath,
                message: format!("file path `{}` leaves the package", f.path),
            });
        }
        let p = pkg.join(&f.path);
        let (sha, bytes) = sha256_file(&p)?;
        if bytes != f.bytes || sha != f.sha256 {
            return Err(ExportError::HashMismatch {
                path: p,
                expected: f.sha256.clone(),
                actual: sha,
            });
        }
    }
    let h = package_hash(m.files());
    if h != m.model.hash {
        return Err(ExportError::HashMismatch {
            path: mpath,
            expected: m.model.hash.clone(),
            actual: h,
        });
    }
    Ok(m)
}

/// A printable summary of a verified package (`ddit-export inspect`).
pub fn summary(m: &Manifest) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} ({} weights, opset {}), hash {}",
        m.model.name, m.model.weights_dtype, m.model.opset, m.model.hash
    );
    let v = &m.values;
    let _ = writeln!(
        s,
        "hidden {} x {} layers, {} heads, patch {}, {} latent channels, vocab {}, mask id {} ({}), pad {}, eos {}",
        v.hidden_size, v.num_layers, v.num_heads, v.patch_size, v.latent_channels, v.vocab_size,
        v.tokens.mask_id, v.tokens.mask_token, v.tokens.pad_id, v.tokens.eos_id
    );
    let _ = writeln!(
        s,
        "text canvases: prompt {}, caption {}, vqa {} tokens; caption prompt {}",
        v.text_lengths.prompt,
        v.text_lengths.caption,
        v.text_lengths.vqa,
        v.caption_prompt
            .as_deref()
            .map_or("none".to_string(), |p| format!("{p:?}"))
    );
    let _ = writeln!(
        s,
        "{:<24} {:<16} {:>14} {:>14}  files",
        "segment", "role", "parameters", "bytes"
    );
    let (mut tp, mut tb) = (0u64, 0u64);
    for seg in &m.segments {
        let bytes: u64 = seg.files.iter().map(|f| f.bytes).sum();
        tp += seg.parameters;
        tb += bytes;
        let files: Vec<&str> = seg.files.iter().map(|f| f.path.as_str()).collect();
        let _ = writeln!(
            s,
            "{:<24} {:<16} {:>14} {:>14}  {}",
            seg.name,
            seg.role.as_str(),
            seg.parameters,
            bytes,
            files.join(" + ")
        );
    }
    let _ = writeln!(
        s,
        "{:<24} {:<16} {:>14} {:>14}",
        "total",
        "",
        tp,
        tb + m.tokenizer.bytes
    );
    let _ = writeln!(s, "all {} file hashes verified", m.files().count());
    s
}
