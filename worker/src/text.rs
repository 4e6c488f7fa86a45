//! Tokenisation with the package's `tokenizer.json` (the `tokenizers` crate).

use std::path::Path;

use ddit_schemas::{ModelValues, TokenIds};
use tokenizers::Tokenizer;

use crate::error::{Result, WorkerError};

pub struct TextCodec {
    tok: Tokenizer,
    pub ids: TokenIds,
}

impl TextCodec {
    pub fn load(path: &Path, ids: TokenIds) -> Result<Self> {
        let tok = Tokenizer::from_file(path).map_err(|e| WorkerError::Package {
            path: path.display().to_string(),
            message: format!("tokenizer: {e}"),
        })?;
        Ok(Self { tok, ids })
    }

    /// The codec of a package (its `tokenizer.json` and manifest values), checked against the
    /// manifest: a default caption prompt must leave room on the default caption canvas.
    pub fn for_package(path: &Path, values: &ModelValues) -> Result<Self> {
        let codec = Self::load(path, values.tokens.clone())?;
        if let Some(prompt) = &values.caption_prompt {
            let n = codec.encode_prefix(prompt, "caption_prompt")?.len() as u64;
            if n >= values.text_lengths.caption {
                return Err(WorkerError::Package {
                    path: path.with_file_name("manifest.json").display().to_string(),
                    message: format!(
                        "values.caption_prompt is {n} tokens and leaves no room on the {}-token \
                         caption canvas (values.text_lengths.caption)",
                        values.text_lengths.caption
                    ),
                });
            }
        }
        Ok(codec)
    }

    /// Token ids of `text`, with the tokenizer's post-processing (T5 appends `</s>`).
    pub fn encode(&self, text: &str, field: &str) -> Result<Vec<i64>> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| WorkerError::invalid(field, format!("cannot tokenise: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Token ids without a trailing `</s>` (prompt prefixes and VQA prompts).
    pub fn encode_prefix(&self, text: &str, field: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode(text, field)?;
        if ids.last() == Some(&i64::from(self.ids.eos_id)) {
            ids.pop();
        }
        Ok(ids)
    }

    /// `text` tokenised and padded with the pad token (or cut) to exactly `len` tokens.
    pub fn encode_padded(&self, text: &str, len: usize, field: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode(text, field)?;
        ids.truncate(len);
        ids.resize(len, i64::from(self.ids.pad_id));
        Ok(ids)
    }

    /// Decodes generated tokens: drops padding and mask tokens, and cuts at the first `</s>` that
    /// follows generated text (a `</s>` before any text is skipped).
    pub fn decode_generated(&self, ids: &[i64]) -> Result<String> {
        let (pad, eos, mask) = (
            i64::from(self.ids.pad_id),
            i64::from(self.ids.eos_id),
            i64::from(self.ids.mask_id),
        );
        let mut keep: Vec<u32> = Vec::new();
        for &t in ids {
            if t == eos {
                if keep.is_empty() {
                    continue;
                }
                break;
            }
            if t == pad || t == mask || t < 0 {
                continue;
            }
            keep.push(t as u32);
        }
        let text = self
            .tok
            .decode(&keep, true)
            .map_err(|e| WorkerError::Internal(format!("decode: {e}")))?;
        Ok(text.trim().to_string())
    }
}
