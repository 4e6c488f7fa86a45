//! The fake model the runner's tests step: row-wise deterministic functions of the inputs, so
//! batching cannot change a row's output; it records the passes it serves.

use std::cell::RefCell;
use std::rc::Rc;

use ddit_schemas::Manifest;

use super::super::{BlockCache, CacheUpdate};

use super::super::Model;
use crate::error::{Result, WorkerError};
use crate::tensor::Tensor;
use crate::text::TextCodec;

pub const VOCAB: usize = 47;
pub const MASK: i64 = 46;

pub fn manifest() -> Manifest {
    let file = serde_json::json!({"path": "tokenizer.json", "sha256": "00", "bytes": 0});
    serde_json::from_value(serde_json::json!({
        "format_version": 2,
        "model": {"name": "fake", "hash": "feed", "weights_dtype": "f32",
                  "exporter_version": "0", "opset": 17},
        "values": {
            "hidden_size": 4, "num_layers": 1, "num_heads": 1, "patch_size": 2,
            "latent_channels": 4, "pos_embed_max_size": 8, "sample_size": 8,
            "vocab_size": VOCAB, "text_hidden_size": 4, "null_image_tokens": 8,
            "tokens": {"mask_id": MASK, "mask_token": "<extra_id_0>", "pad_id": 0, "eos_id": 1},
            "vae": {"scaling_factor": 1.5, "shift_factor": 0.1, "downsample_factor": 2,
                    "image_channels": 3},
            "scheduler": {"shift": 3.0, "num_train_timesteps": 1000},
            "text_lengths": {"prompt": 8, "caption": 8, "vqa": 48}
        },
        "tokenizer": file,
        // Block 0 in a file of its own, as the exporter writes it (the block cache checks).
        "segments": [{"name": "joint_blocks_0_1", "role": "joint_blocks", "blocks": [0, 1],
                      "files": [], "parameters": 0, "inputs": [], "outputs": []}]
    }))
    .unwrap()
}

pub fn codec() -> TextCodec {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny-f32/checkpoint/tokenizer/tokenizer.json"
    );
    TextCodec::load(std::path::Path::new(path), manifest().values.tokens).unwrap()
}

/// One forward pass the fake model served.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub kind: &'static str,
    pub rows: usize,
    pub shape: Vec<usize>,
}

/// Row-wise deterministic functions of the inputs, so batching cannot change a row's output.
pub struct Fake {
    manifest: Manifest,
    pub calls: Rc<RefCell<Vec<Call>>>,
    /// Text-encoder and VAE-decoder passes (`encode_text`, `vae_decode`).
    pub stages: Rc<RefCell<Vec<Call>>>,
    /// The forward pass (0-based, velocity and logits counted together) that fails.
    pub fail_call: Option<usize>,
    /// Image tokens whose row mean is above this make the text forward panic (a bright image).
    pub poison: Option<f32>,
}

impl Fake {
    pub fn new() -> Self {
        Self {
            manifest: manifest(),
            calls: Rc::default(),
            stages: Rc::default(),
            fail_call: None,
            poison: None,
        }
    }

    fn record(&mut self, kind: &'static str, t: &Tensor) -> Result<()> {
        let mut calls = self.calls.borrow_mut();
        let index = calls.len();
        calls.push(Call {
            kind,
            rows: t.batch(),
            shape: t.shape.clone(),
        });
        if self.fail_call == Some(index) {
            return Err(WorkerError::runtime("fake", "injected failure"));
        }
        Ok(())
    }
}

fn velocity(latents: &Tensor, context: &Tensor, ts: &[f32]) -> Result<Tensor> {
    let n = latents.row_len();
    let data = latents
        .data
        .iter()
        .enumerate()
        .map(|(k, x)| x * 0.5 + row_mean(context, k / n) * 0.1 + ts[k / n] * 1e-3)
        .collect();
    Tensor::new(latents.shape.clone(), data)
}

fn row_mean(t: &Tensor, i: usize) -> f32 {
    let n = t.row_len();
    t.data[i * n..(i + 1) * n].iter().sum::<f32>() / n as f32
}

impl Model for Fake {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn provider(&self) -> &str {
        "fake"
    }
    fn encode_text(&mut self, ids: &[Vec<i64>]) -> Result<Tensor> {
        let l = ids[0].len();
        self.stages.borrow_mut().push(Call {
            kind: "encode_text",
            rows: ids.len(),
            shape: vec![ids.len(), l],
        });
        let data = ids
            .iter()
            .flat_map(|r| {
                r.iter()
                    .flat_map(|&t| (0..4).map(move |d| t as f32 * 0.01 + d as f32))
            })
            .collect();
        Tensor::new(vec![ids.len(), l, 4], data)
    }
    fn vae_encode(&mut self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = image.batch();
        let (h, w) = (image.shape[2] / 2, image.shape[3] / 2);
        let mean = (0..b)
            .flat_map(|i| std::iter::repeat_n(row_mean(image, i), 4 * h * w))
            .collect();
        Ok((
            Tensor::new(vec![b, 4, h, w], mean)?,
            Tensor::new(vec![b, 4, h, w], vec![-2.0; b * 4 * h * w])?,
        ))
    }
    fn encode_image(&mut self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = latents.batch();
        let tok = (0..b)
            .flat_map(|i| std::iter::repeat_n(row_mean(latents, i), 16 * 4))
            .collect();
        Ok((Tensor::new(vec![b, 16, 4], tok)?, Tensor::zeros(vec![b, 4])))
    }
    fn vae_decode(&mut self, z: &Tensor) -> Result<Tensor> {
        let (b, h, w) = (z.batch(), z.shape[2] * 2, z.shape[3] * 2);
        self.stages.borrow_mut().push(Call {
            kind: "vae_decode",
            rows: b,
            shape: z.shape.clone(),
        });
        let mut data = Vec::with_capacity(b * 3 * h * w);
        for i in 0..b {
            let m = row_mean(z, i);
            data.extend((0..3 * h * w).map(|k| ((k as f32 * 0.01).sin() + m).tanh()));
        }
        Tensor::new(vec![b, 3, h, w], data)
    }
    fn velocity(&mut self, latents: &Tensor, context: &Tensor, ts: &[f32]) -> Result<Tensor> {
        self.record("velocity", latents)?;
        velocity(latents, context, ts)
    }
    /// The latents stand in for the first block's residual and the velocity for the rest's.
    fn velocity_cached(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        ts: &[f32],
        caches: &[&BlockCache],
    ) -> Result<(Tensor, Vec<CacheUpdate>)> {
        let mut v = velocity(latents, context, ts)?;
        let n = latents.row_len();
        let mut updates = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter().enumerate() {
            let (probe, row) = (&latents.data[i * n..(i + 1) * n], i * n..(i + 1) * n);
            updates.push(match cache.hit(probe) {
                Some(rest) => {
                    v.data[row].copy_from_slice(rest);
                    CacheUpdate::Skipped
                }
                None => CacheUpdate::Store {
                    probe: probe.to_vec(),
                    rest: v.data[row].to_vec(),
                },
            });
        }
        // Recorded last: an injected failure comes after the cache decisions were made, the
        // worst place for a retry.
        self.record("velocity", latents)?;
        Ok((v, updates))
    }
    fn logits(
        &mut self,
        image_tokens: &Tensor,
        _temb: &Tensor,
        _ids: &[Vec<i64>],
        positions: &[Vec<usize>],
    ) -> Result<Tensor> {
        self.record("logits", image_tokens)?;
        if let Some(p) = self.poison {
            let rows = image_tokens.batch();
            assert!(
                (0..rows).all(|b| row_mean(image_tokens, b) <= p),
                "poisoned row"
            );
        }
        let m: usize = positions.iter().map(Vec::len).sum();
        let mut data = vec![0f32; m * VOCAB];
        let mut row = 0;
        for (b, ps) in positions.iter().enumerate() {
            let img = (row_mean(image_tokens, b) * 100.0).abs() as usize;
            for &p in ps {
                let peak = (img + p * 7) % (VOCAB - 1);
                data[row * VOCAB + peak] = 8.0;
                row += 1;
            }
        }
        Tensor::new(vec![1, m, VOCAB], data)
    }
}
