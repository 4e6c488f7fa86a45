//! The frozen T5 encoder (transformers `T5EncoderModel`): token ids -> hidden states.
//!
//! RMS-style layer norm, relative position bias from the first layer shared by all layers,
//! unscaled attention, (gated) GELU feed-forward, no attention mask.

use crate::checkpoint::{T5Act, T5Config, WeightStore};
use crate::error::Result;
use crate::onnx::{DType, Dim, Graph, Value, WeightData};

use super::{Ctx, Form};

/// The bucket of every relative position `k - q` in `[-max_distance, max_distance]` (bidirectional),
/// computed in f32 exactly as transformers' `T5Attention._relative_position_bucket`. Positions
/// further apart saturate at the last bucket, so the graph clamps into this table.
pub fn bucket_table(num_buckets: usize, max_distance: usize) -> Vec<i64> {
    let nb = (num_buckets / 2) as i64;
    let max_exact = nb / 2;
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    (-(max_distance as i64)..=max_distance as i64)
        .map(|rel| {
            let mut ret = if rel > 0 { nb } else { 0 };
            let n = rel.abs();
            if n < max_exact {
                ret += n;
            } else {
                let v = (n as f32 / max_exact as f32).ln() / log_ratio * (nb - max_exact) as f32;
                ret += (max_exact + v as i64).min(nb - 1);
            }
            ret
        })
        .collect()
}

/// T5's RMSNorm, `x / sqrt(mean(x²) + eps) · w`, in the form ONNX Runtime fuses into one
/// `SimplifiedLayerNormalization` (`Pow(x, 2)`, then `Div`).
fn rms_norm(c: &mut Ctx<'_>, x: &str, key: &str, d: usize, eps: f32) -> Result<Value> {
    let w = c.param(key, &[d])?;
    let g = &mut c.g;
    let two = g.scalar(2.0);
    let sq = g.op("Pow", &[x, &two], vec![]);
    let axes = g.const_i64(&[-1]);
    let var = g.op(
        "ReduceMean",
        &[&sq, &axes],
        vec![("keepdims", crate::onnx::Attr::Int(1))],
    );
    let e = g.scalar(eps);
    let ve = g.add(&var, &e);
    let r = g.op("Sqrt", &[&ve], vec![]);
    let n = g.div(x, &r);
    Ok(g.mul(&n, &w))
}

/// Encoder layers `[start, end)` of `cfg.num_layers`: the first piece reads `input_ids
/// [batch, text_len]` (through the embedding), the others the previous piece's
/// `hidden_states_in [batch, text_len, d_model]`; the last applies the final norm. Every piece
/// computes the shared position bias for its own length from block 0's table (a copy of that
/// small table in each). The whole range is named `text_encoder`, a piece
/// `text_encoder_{start}_{end}`.
pub fn encoder(
    cfg: &T5Config,
    w: &WeightStore,
    form: Form,
    (start, end): (usize, usize),
) -> Result<Graph> {
    let d = cfg.d_model;
    let name = if (start, end) == (0, cfg.num_layers) {
        "text_encoder".to_string()
    } else {
        format!("text_encoder_{start}_{end}")
    };
    let mut c = Ctx::new(&name, w, form);
    let text_dims = vec![
        Dim::Sym("batch"),
        Dim::Sym("text_len"),
        Dim::Fixed(d as i64),
    ];
    let mut x = if start == 0 {
        let ids = c.g.input(
            "input_ids",
            DType::I64,
            vec![Dim::Sym("batch"), Dim::Sym("text_len")],
        );
        let emb_key = if w.contains("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let table = c.param(emb_key, &[cfg.vocab_size, d])?;
        c.g.op(
            "Gather",
            &[&table, &ids],
            vec![("axis", crate::onnx::Attr::Int(0))],
        )
    } else {
        c.g.input("hidden_states_in", c.g.float, text_dims.clone())
    };
    let bias = position_bias(&mut c, cfg, &x)?;
    for i in start..end {
        x = block(&mut c, cfg, &x, &bias, i)?;
    }
    let out = if end == cfg.num_layers {
        rms_norm(&mut c, &x, "encoder.final_layer_norm.weight", d, cfg.eps)?
    } else {
        x
    };
    c.g.output(&out, "hidden_states", c.g.float, text_dims);
    Ok(c.g)
}

fn act(c: &mut Ctx<'_>, x: &str, a: T5Act) -> Value {
    match a {
        T5Act::GeluTanh => c.g.gelu_tanh(x),
        T5Act::GeluErf => c.g.gelu_erf(x),
        T5Act::Relu => c.g.op("Relu", &[x], vec![]),
    }
}

/// Relative position bias `[1, H, L, L]` from block 0's table, for the length `L` of axis 1 of
/// `x` (the ids or the hidden states).
fn position_bias(c: &mut Ctx<'_>, cfg: &T5Config, x: &Value) -> Result<Value> {
    let h = cfg.num_heads;
    let rel_w = c.param(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        &[cfg.num_buckets, h],
    )?;
    let buckets = bucket_table(cfg.num_buckets, cfg.max_distance);
    let md = cfg.max_distance as i64;
    let g = &mut c.g;
    let table_bytes: Vec<u8> = buckets.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bt = g.initializer(
        "t5_buckets",
        vec![buckets.len() as i64],
        DType::I64,
        WeightData::Bytes(table_bytes),
        false,
    );
    let len = g.shape_slice(x, 1, 2);
    let zero_axis = g.const_i64(&[0]);
    let len_s = g.op("Squeeze", &[&len, &zero_axis], vec![]);
    let zero = g.const_i64(&[0]);
    let zero_s = g.op("Squeeze", &[&zero, &zero_axis], vec![]);
    let one = g.const_i64(&[1]);
    let one_s = g.op("Squeeze", &[&one, &zero_axis], vec![]);
    let pos = g.op("Range", &[&zero_s, &len_s, &one_s], vec![]);
    let kpos = g.unsqueeze(&pos, &[0]);
    let qpos = g.unsqueeze(&pos, &[1]);
    let rel = g.sub(&kpos, &qpos);
    let lo = g.const_i64(&[-md]);
    let hi = g.const_i64(&[md]);
    let rel = g.op("Max", &[&rel, &lo], vec![]);
    let rel = g.op("Min", &[&rel, &hi], vec![]);
    let idx = g.add(&rel, &hi);
    let bucket = g.op(
        "Gather",
        &[&bt, &idx],
        vec![("axis", crate::onnx::Attr::Int(0))],
    );
    let bias = g.op(
        "Gather",
        &[&rel_w, &bucket],
        vec![("axis", crate::onnx::Attr::Int(0))],
    );
    let bias = g.transpose(&bias, &[2, 0, 1]);

    Ok(g.unsqueeze(&bias, &[0]))
}

/// Encoder block `i`: pre-norm self-attention with the shared bias, then the (gated) MLP.
fn block(c: &mut Ctx<'_>, cfg: &T5Config, x: &Value, bias: &Value, i: usize) -> Result<Value> {
    let (d, h, dk) = (cfg.d_model, cfg.num_heads, cfg.d_kv);
    let inner = h * dk;
    let mut x = x.clone();
    c.g.push_scope(&format!("block{i}"));
    let p = format!("encoder.block.{i}.layer");
    let n = rms_norm(c, &x, &format!("{p}.0.layer_norm.weight"), d, cfg.eps)?;
    let a = format!("{p}.0.SelfAttention");
    let q = c.linear(&n, &format!("{a}.q"), d, inner, false)?;
    let k = c.linear(&n, &format!("{a}.k"), d, inner, false)?;
    let v = c.linear(&n, &format!("{a}.v"), d, inner, false)?;
    let o = c.attention(&q, &k, &v, h, None, Some(bias));
    let o = c.linear(&o, &format!("{a}.o"), inner, d, false)?;
    x = c.g.add(&x, &o);
    let n = rms_norm(c, &x, &format!("{p}.1.layer_norm.weight"), d, cfg.eps)?;
    let f = format!("{p}.1.DenseReluDense");
    let hidden = if cfg.gated {
        let a0 = c.linear(&n, &format!("{f}.wi_0"), d, cfg.d_ff, false)?;
        let a0 = act(c, &a0, cfg.act);
        let a1 = c.linear(&n, &format!("{f}.wi_1"), d, cfg.d_ff, false)?;
        c.g.mul(&a0, &a1)
    } else {
        let a0 = c.linear(&n, &format!("{f}.wi"), d, cfg.d_ff, false)?;
        act(c, &a0, cfg.act)
    };
    let o = c.linear(&hidden, &format!("{f}.wo"), cfg.d_ff, d, false)?;
    x = c.g.add(&x, &o);
    c.g.pop_scope();
    Ok(x)
}
