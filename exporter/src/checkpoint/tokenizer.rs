//! The tokenizer of a checkpoint: `tokenizer.json` and the special-token ids the samplers need.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{ExportError, Result};

/// Special tokens found in the tokenizer files.
#[derive(Debug, Clone)]
pub struct TokenizerInfo {
    pub path: PathBuf,
    pub mask_token: String,
    pub mask_id: u32,
    pub pad_id: u32,
    pub eos_id: u32,
    /// `len(tokenizer)`: base vocabulary plus added tokens.
    pub len: usize,
}

fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ExportError::Json {
            path: path.to_path_buf(),
            source: e,
        })
}

impl TokenizerInfo {
    /// Reads `dir/tokenizer.json` and the special tokens named by `tokenizer_config.json` or
    /// `special_tokens_map.json` (defaults: `<pad>`, `</s>`, and `<extra_id_0>` as the mask token).
    pub fn read(dir: &Path, mask_override: Option<&str>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            let what = if dir.join("spiece.model").exists() {
                "only spiece.model is present; convert it to tokenizer.json first \
                 (transformers: T5TokenizerFast.from_pretrained(dir).save_pretrained(dir))"
            } else {
                "the tokenizer must be a tokenizers-format tokenizer.json"
            };
            return Err(ExportError::MissingFile {
                path,
                what: what.into(),
            });
        }
        let tok = read_json(&path)?.unwrap_or(Value::Null);
        let err = |message: String| ExportError::Tokenizer {
            path: path.clone(),
            message,
        };
        let mut vocab: HashMap<String, u32> = HashMap::new();
        match tok.pointer("/model/vocab") {
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let id = v
                        .as_u64()
                        .ok_or_else(|| err(format!("vocab entry `{k}` has a non-integer id")))?;
                    vocab.insert(k.clone(), id as u32);
                }
            }
            // Unigram (T5's sentencepiece model): a list of [piece, score].
            Some(Value::Array(a)) => {
                for (i, e) in a.iter().enumerate() {
                    let piece = e
                        .get(0)
                        .and_then(|p| p.as_str())
                        .ok_or_else(|| err(format!("vocab entry {i} is malformed")))?;
                    vocab.insert(piece.to_string(), i as u32);
                }
            }
            _ => return Err(err("no model.vocab".into())),
        }
        if let Some(Value::Array(added)) = tok.get("added_tokens") {
            for t in added {
                if let (Some(id), Some(content)) = (
                    t.get("id").and_then(|v| v.as_u64()),
                    t.get("content").and_then(|v| v.as_str()),
                ) {
                    vocab.insert(content.to_string(), id as u32);
                }
            }
        }
        let len = vocab.values().map(|&v| v as usize + 1).max().unwrap_or(0);
        let cfg = read_json(&dir.join("tokenizer_config.json"))?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let special = |key: &str, default: &str| -> String {
            token_name(cfg.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_name(map.as_ref().and_then(|c| c.get(key))))
                .unwrap_or_else(|| default.to_string())
        };
        let id_of = |name: &str, role: &str| -> Result<u32> {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| err(format!("{role} token `{name}` is not in the vocabulary")))
        };
        let mask_token = match mask_override {
            Some(m) => m.to_string(),
            None => special("mask_token", "<extra_id_0>"),
        };
        let pad = special("pad_token", "<pad>");
        let eos = special("eos_token", "</s>");
        Ok(Self {
            mask_id: id_of(&mask_token, "mask")?,
            pad_id: id_of(&pad, "pad")?,
            eos_id: id_of(&eos, "eos")?,
            mask_token,
            len,
            path,
        })
    }
}
