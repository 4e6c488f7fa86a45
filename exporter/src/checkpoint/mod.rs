//! Phase 1: read a diffusers D-DiT pipeline folder (configs, safetensors, tokenizer).

pub mod config;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{ConfigFile, SchedulerConfig, T5Act, T5Config, TransformerConfig, VaeConfig};
pub use tokenizer::TokenizerInfo;
pub use weights::{TensorRef, WeightStore};

use ddit_schemas::TextLengths;

use crate::error::{ExportError, Result};

/// An opened checkpoint: every config parsed, every weight file mapped and validated.
pub struct Checkpoint {
    pub root: PathBuf,
    pub transformer: TransformerConfig,
    pub t5: T5Config,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer: TokenizerInfo,
    pub transformer_weights: WeightStore,
    pub t5_weights: WeightStore,
    pub vae_weights: WeightStore,
    /// Vocabulary size of the text head (`text_proj_out` rows).
    pub vocab_size: usize,
    /// `model_index.json`'s `caption_prompt`: the prefix the model writes captions after (not part
    /// of the published D-DiT pipelines; the bundled demo model has one).
    pub caption_prompt: Option<String>,
    /// `model_index.json`'s `text_lengths` (`prompt`, `caption`, `vqa`): the canvas lengths the
    /// model was trained at. Missing keys take the published D-DiT's 256 / 128 / 128.
    pub text_lengths: TextLengths,
}

/// The pipeline components `model_index.json` must name.
const COMPONENTS: [&str; 5] = [
    "transformer",
    "text_encoder",
    "vae",
    "tokenizer",
    "scheduler",
];

/// The published D-DiT's canvas lengths: prompt 256, caption 128, VQA 128 tokens.
pub const DDIT_TEXT_LENGTHS: TextLengths = TextLengths {
    prompt: 256,
    caption: 128,
    vqa: 128,
};

/// The text head's rows: the config's `vocab_size`, else the rows of `text_proj_out.weight`.
fn vocab_size(root: &Path, tc: &TransformerConfig, w: &WeightStore) -> Result<usize> {
    let head_rows = w.shape_of("text_proj_out.weight").map(|s| s[0]);
    tc.vocab_size
        .or(head_rows)
        .ok_or_else(|| ExportError::MissingTensor {
            component: "transformer".into(),
            key: "text_proj_out.weight".into(),
            files: root.join("transformer").display().to_string(),
        })
}

/// Reads `caption_prompt` from `model_index.json`: absent, or a non-empty string.
fn caption_prompt(index: &ConfigFile) -> Result<Option<String>> {
    match index.get("caption_prompt") {
        None => Ok(None),
        Some(v) => match v.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(Some(s.to_string())),
            _ => Err(ExportError::Config {
                path: index.path.clone(),
                key: "caption_prompt".into(),
                message: format!("expected a non-empty string, found {v}"),
            }),
        },
    }
}

/// Reads `text_lengths` from `model_index.json`, each key a positive integer.
fn text_lengths(index: &ConfigFile) -> Result<TextLengths> {
    let mut t = DDIT_TEXT_LENGTHS;
    let Some(v) = index.get("text_lengths") else {
        return Ok(t);
    };
    let bad = |key: String, message: String| ExportError::Config {
        path: index.path.clone(),
        key,
        message,
    };
    let obj = v.as_object().ok_or_else(|| {
        bad(
            "text_lengths".into(),
            format!("expected an object, found {v}"),
        )
    })?;
    for (k, val) in obj {
        let slot = match k.as_str() {
            "prompt" => &mut t.prompt,
            "caption" => &mut t.caption,
            "vqa" => &mut t.vqa,
            _ => return Err(bad(format!("text_lengths.{k}"), "unknown canvas".into())),
        };
        *slot = val
            .as_u64()
            .filter(|n| (1..=4096).contains(n))
            .ok_or_else(|| {
                bad(
                    format!("text_lengths.{k}"),
                    format!("expected a token count in 1..=4096, found {val}"),
                )
            })?;
    }
    Ok(t)
}

impl Checkpoint {
    pub fn open(root: &Path, mask_token: Option<&str>) -> Result<Self> {
        if !root.is_dir() {
            return Err(ExportError::MissingFile {
                path: root.to_path_buf(),
                what: "checkpoint folder".into(),
            });
        }
        let index = ConfigFile::read(&root.join("model_index.json"))?;
        for component in COMPONENTS {
            if index.get(component).is_none() {
                return Err(ExportError::Config {
                    path: index.path.clone(),
                    key: component.into(),
                    message: "component missing from the pipeline".into(),
                });
            }
        }
        let caption_prompt = caption_prompt(&index)?;
        let text_lengths = text_lengths(&index)?;
        let transformer = TransformerConfig::from_file(&ConfigFile::read(
            &root.join("transformer/config.json"),
        )?)?;
        let t5 = T5Config::from_file(&ConfigFile::read(&root.join("text_encoder/config.json"))?)?;
        let vae = VaeConfig::from_file(&ConfigFile::read(&root.join("vae/config.json"))?)?;
        let scheduler = SchedulerConfig::from_file(&ConfigFile::read(
            &root.join("scheduler/scheduler_config.json"),
        )?)?;
        let tokenizer = TokenizerInfo::read(&root.join("tokenizer"), mask_token)?;
        let transformer_weights =
            WeightStore::open(&root.join("transformer"), "diffusion_pytorch_model")?;
        let t5_weights = WeightStore::open(&root.join("text_encoder"), "model")?;
        let vae_weights = WeightStore::open(&root.join("vae"), "diffusion_pytorch_model")?;

        let tpath = root.join("transformer/config.json");
        if t5.d_model != transformer.joint_attention_dim {
            return Err(ExportError::Config {
                path: tpath,
                key: "joint_attention_dim".into(),
                message: format!(
                    "is {} but the text encoder's d_model is {}",
                    transformer.joint_attention_dim, t5.d_model
                ),
            });
        }
        let vocab_size = vocab_size(root, &transformer, &transformer_weights)?;
        if tokenizer.mask_id as usize >= vocab_size {
            return Err(ExportError::Tokenizer {
                path: tokenizer.path.clone(),
                message: format!(
                    "mask token `{}` has id {} but the text head has only {vocab_size} rows",
                    tokenizer.mask_token, tokenizer.mask_id
                ),
            });
        }
        if vae.latent_channels != transformer.in_channels {
            return Err(ExportError::Config {
                path: root.join("vae/config.json"),
                key: "latent_channels".into(),
                message: format!(
                    "is {} but the transformer takes {} channels",
                    vae.latent_channels, transformer.in_channels
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            transformer,
            t5,
            vae,
            scheduler,
            tokenizer,
            transformer_weights,
            t5_weights,
            vae_weights,
            vocab_size,
            caption_prompt,
            text_lengths,
        })
    }
}
