//! The component configs of a D-DiT checkpoint, read with errors that name the file and key.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{ExportError, Result};

/// A parsed JSON config that remembers its path for error messages.
pub struct ConfigFile {
    pub path: PathBuf,
    value: Value,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ExportError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ExportError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        if !value.is_object() {
            return Err(ExportError::Config {
                path: path.to_path_buf(),
                key: "(root)".into(),
                message: "expected a JSON object".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            value,
        })
    }

    fn err(&self, key: &str, message: impl Into<String>) -> ExportError {
        ExportError::Config {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        v.as_u64()
            .filter(|&n| n > 0 && n < (1 << 40))
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, format!("expected a positive integer, found {v}")))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list, found {v}")))?;
        arr.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&n| n > 0 && n < (1 << 30))
                    .map(|n| n as usize)
                    .ok_or_else(|| self.err(key, format!("expected positive integers, found {x}")))
            })
            .collect()
    }

    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list, found {v}")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(key, format!("expected strings, found {x}")))
            })
            .collect()
    }

    fn unsupported(&self, key: &str, value: &Value, expected: &str) -> ExportError {
        ExportError::UnsupportedConfig {
            path: self.path.clone(),
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// `transformer/config.json`.
#[derive(Debug, Clone)]
pub struct TransformerConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub joint_attention_dim: usize,
    pub pos_embed_max_size: usize,
    /// From the config's `vocab_size`, or else from `text_proj_out.weight`.
    pub vocab_size: Option<usize>,
}

impl TransformerConfig {
    pub fn from_file(c: &ConfigFile) -> Result<Self> {
        if let Some(v) = c.get("qk_norm") {
            return Err(c.unsupported("qk_norm", v, "D-DiT has no qk-norm: null"));
        }
        if let Some(v) = c.get("dual_attention_layers") {
            if v.as_array().map(|a| !a.is_empty()).unwrap_or(true) {
                return Err(c.unsupported("dual_attention_layers", v, "D-DiT uses none: []"));
            }
        }
        let num_heads = c.usize("num_attention_heads")?;
        let head_dim = c.usize("attention_head_dim")?;
        let hidden = num_heads * head_dim;
        if let Some(v) = c.get("caption_projection_dim") {
            if v.as_u64() != Some(hidden as u64) {
                return Err(c.unsupported(
                    "caption_projection_dim",
                    v,
                    &format!("must equal num_attention_heads x attention_head_dim = {hidden}"),
                ));
            }
        }
        let in_channels = c.usize("in_channels")?;
        Ok(Self {
            sample_size: c.usize("sample_size")?,
            patch_size: c.usize("patch_size")?,
            in_channels,
            out_channels: c.usize_or("out_channels", in_channels)?,
            num_layers: c.usize("num_layers")?,
            num_heads,
            head_dim,
            hidden,
            joint_attention_dim: c.usize("joint_attention_dim")?,
            pos_embed_max_size: c.usize("pos_embed_max_size")?,
            vocab_size: if c.get("vocab_size").is_some() {
                Some(c.usize("vocab_size")?)
            } else {
                None
            },
        })
    }
}

/// Feed-forward activation of the T5 encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Act {
    GeluTanh,
    GeluErf,
    Relu,
}

/// `text_encoder/config.json` (transformers `T5Config`).
#[derive(Debug, Clone)]
pub struct T5Config {
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f32,
    pub act: T5Act,
    pub gated: bool,
    pub vocab_size: usize,
}

impl T5Config {
    pub fn from_file(c: &ConfigFile) -> Result<Self> {
        let ffp = c.str_or("feed_forward_proj", "relu")?;
        let gated = ffp.starts_with("gated-");
        let act_name = c.str_or("dense_act_fn", ffp.trim_start_matches("gated-"))?;
        let act = match act_name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => T5Act::GeluTanh,
            "gelu" => {
                if gated && c.get("dense_act_fn").is_none() {
                    // transformers maps "gated-gelu" to gelu_new.
                    T5Act::GeluTanh
                } else {
                    T5Act::GeluErf
                }
            }
            "relu" => T5Act::Relu,
            other => {
                return Err(c.unsupported(
                    "dense_act_fn",
                    &Value::String(other.into()),
                    "one of gelu_new, gelu_pytorch_tanh, gelu, relu",
                ))
            }
        };
        let num_buckets = c.usize_or("relative_attention_num_buckets", 32)?;
        if num_buckets < 4 {
            return Err(c.err("relative_attention_num_buckets", "must be at least 4"));
        }
        Ok(Self {
            d_model: c.usize("d_model")?,
            d_kv: c.usize("d_kv")?,
            d_ff: c.usize("d_ff")?,
            num_layers: c.usize("num_layers")?,
            num_heads: c.usize("num_heads")?,
            num_buckets,
            max_distance: c.usize_or("relative_attention_max_distance", 128)?,
            eps: c.f64_or("layer_norm_epsilon", 1e-6)? as f32,
            act,
            gated: c.bool_or("is_gated_act", gated)?,
            vocab_size: c.usize("vocab_size")?,
        })
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_attention: bool,
}

impl VaeConfig {
    pub fn from_file(c: &ConfigFile) -> Result<Self> {
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if c.get(key).is_some() {
                for t in c.str_list(key)? {
                    if t != want {
                        return Err(c.unsupported(key, &Value::String(t), &format!("only {want}")));
                    }
                }
            }
        }
        let act = c.str_or("act_fn", "silu")?;
        if act != "silu" {
            return Err(c.unsupported("act_fn", &Value::String(act.into()), "silu"));
        }
        let block_out_channels = c.usize_list("block_out_channels")?;
        let groups = c.usize_or("norm_num_groups", 32)?;
        for &ch in &block_out_channels {
            if ch % groups != 0 {
                return Err(c.err(
                    "norm_num_groups",
                    format!("{groups} does not divide block channel count {ch}"),
                ));
            }
        }
        if block_out_channels.is_empty() {
            return Err(c.err("block_out_channels", "must not be empty"));
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", 3)?,
            out_channels: c.usize_or("out_channels", 3)?,
            latent_channels: c.usize("latent_channels")?,
            block_out_channels,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            groups,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            shift_factor: c.f64_or("shift_factor", 0.0)?,
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
            mid_attention: c.bool_or("mid_block_add_attention", true)?,
        })
    }

    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `scheduler/scheduler_config.json` (`FlowMatchEulerDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub shift: f64,
    pub num_train_timesteps: usize,
}

impl SchedulerConfig {
    pub fn from_file(c: &ConfigFile) -> Result<Self> {
        let class = c.str_or("_class_name", "FlowMatchEulerDiscreteScheduler")?;
        if class != "FlowMatchEulerDiscreteScheduler" {
            return Err(c.unsupported(
                "_class_name",
                &Value::String(class.into()),
                "FlowMatchEulerDiscreteScheduler",
            ));
        }
        if c.bool_or("use_dynamic_shifting", false)? {
            return Err(c.unsupported(
                "use_dynamic_shifting",
                &Value::Bool(true),
                "false (static shift)",
            ));
        }
        let shift = c.f64_or("shift", 1.0)?;
        if shift <= 0.0 || !shift.is_finite() {
            return Err(c.err("shift", format!("must be positive, found {shift}")));
        }
        Ok(Self {
            shift,
            num_train_timesteps: c.usize_or("num_train_timesteps", 1000)?,
        })
    }
}
