//! The MM-DiT transformer's segments: timestep embedding, patch embedding, context embedder,
//! joint blocks, image head, text head and the null image.

use crate::checkpoint::{TransformerConfig, WeightStore};
use crate::error::Result;
use crate::onnx::{Attr, Dim, Graph, Value};

use super::{Ctx, Form};

const LN_EPS: f32 = 1e-6;
/// Channels of the sinusoidal timestep projection.
const TIME_PROJ: usize = 256;

fn hidden_dims(last: Dim) -> Vec<Dim> {
    vec![Dim::Sym("batch"), Dim::Sym("image_tokens"), last]
}

/// The 128 frequencies of diffusers' `get_timestep_embedding` (max_period 10000, shift 0),
/// computed in f32 as torch does.
pub fn timestep_freqs() -> Vec<f32> {
    let half = TIME_PROJ / 2;
    let neg_log = -(10000f64.ln()) as f32;
    (0..half)
        .map(|i| ((neg_log * i as f32) / half as f32).exp())
        .collect()
}

/// `timestep [batch] -> temb [batch, D]`: sinusoid (cos first) -> Linear -> SiLU -> Linear.
pub fn timestep_embed(cfg: &TransformerConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let d = cfg.hidden;
    let mut c = Ctx::new("timestep_embed", w, form);
    let t = c.g.input("timestep", c.g.float, vec![Dim::Sym("batch")]);
    let freqs = timestep_freqs();
    let f = c.g.const_float(&freqs, vec![1, freqs.len() as i64]);
    let t2 = c.g.unsqueeze(&t, &[1]);
    let arg = c.g.mul(&t2, &f);
    let cos = c.g.op("Cos", &[&arg], vec![]);
    let sin = c.g.op("Sin", &[&arg], vec![]);
    let emb = c.g.concat(&[&cos, &sin], 1);
    let p = "time_text_embed.timestep_embedder";
    let h = c.linear(&emb, &format!("{p}.linear_1"), TIME_PROJ, d, true)?;
    let h = c.g.silu(&h);
    let out = c.linear(&h, &format!("{p}.linear_2"), d, d, true)?;
    c.g.output(
        &out,
        "temb",
        c.g.float,
        vec![Dim::Sym("batch"), Dim::Fixed(d as i64)],
    );
    Ok(c.g)
}

/// `latents [batch, C, h, w] -> image tokens [batch, (h/p)(w/p), D]` with the centre-cropped
/// sin-cos position table.
pub fn patch_embed(cfg: &TransformerConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let (d, p, ch, m) = (
        cfg.hidden,
        cfg.patch_size,
        cfg.in_channels,
        cfg.pos_embed_max_size,
    );
    let mut c = Ctx::new("patch_embed", w, form);
    let x = c.g.input(
        "latents",
        c.g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Fixed(ch as i64),
            Dim::Sym("latent_height"),
            Dim::Sym("latent_width"),
        ],
    );
    let y = c.conv(&x, "pos_embed.proj", (ch, d), p, p, 0)?;
    let mi = m as i64;
    let table = c.param_as(
        "pos_embed.pos_embed",
        &[1, m * m, d],
        &[1, mi, mi, d as i64],
    )?;
    let g = &mut c.g;
    let hw = g.shape_slice(&y, 2, 4);
    let mm = g.const_i64(&[mi, mi]);
    let two = g.const_i64(&[2]);
    let rest = g.sub(&mm, &hw);
    let start = g.div(&rest, &two);
    let end = g.add(&start, &hw);
    let axes = g.const_i64(&[1, 2]);
    let crop = g.op("Slice", &[&table, &start, &end, &axes], vec![]);
    let crop = g.reshape(&crop, &[1, -1, d as i64]);
    let flat = g.reshape(&y, &[0, 0, -1]);
    let tokens = g.transpose(&flat, &[0, 2, 1]);
    let out = g.add(&tokens, &crop);
    g.output(
        &out,
        "image_tokens",
        g.float,
        hidden_dims(Dim::Fixed(d as i64)),
    );
    Ok(c.g)
}

/// `T5 hidden [batch, text_len, J] -> text stream [batch, text_len, D]`.
pub fn context_embedder(cfg: &TransformerConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let (d, j) = (cfg.hidden, cfg.joint_attention_dim);
    let mut c = Ctx::new("context_embedder", w, form);
    let x = c.g.input(
        "hidden_states",
        c.g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Sym("text_len"),
            Dim::Fixed(j as i64),
        ],
    );
    let y = c.linear(&x, "context_embedder", j, d, true)?;
    c.g.output(
        &y,
        "context",
        c.g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Sym("text_len"),
            Dim::Fixed(d as i64),
        ],
    );
    Ok(c.g)
}

/// `temb [batch, D] -> null_image_embd repeated [batch, 8, D]`.
pub fn null_image(cfg: &TransformerConfig, w: &WeightStore, form: Form) -> Result<(Graph, usize)> {
    let d = cfg.hidden;
    let tokens = w
        .shape_of("null_image_embd")
        .map(|s| if s.len() == 3 { s[1] } else { 8 })
        .unwrap_or(8);
    let mut c = Ctx::new("null_image", w, form);
    let t = c.g.input(
        "temb",
        c.g.float,
        vec![Dim::Sym("batch"), Dim::Fixed(d as i64)],
    );
    let e = c.param("null_image_embd", &[1, tokens, d])?;
    let g = &mut c.g;
    let b = g.shape_slice(&t, 0, 1);
    let rest = g.const_i64(&[tokens as i64, d as i64]);
    let shape = g.concat(&[&b, &rest], 0);
    let out = g.op("Expand", &[&e, &shape], vec![]);
    g.output(
        &out,
        "image_tokens",
        g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Fixed(tokens as i64),
            Dim::Fixed(d as i64),
        ],
    );
    Ok((c.g, tokens))
}

/// AdaLN modulation: `Linear(SiLU(temb))` split into `n` chunks of `[batch, 1, D]`.
fn modulation(
    c: &mut Ctx<'_>,
    silu_temb: &str,
    prefix: &str,
    d: usize,
    n: usize,
) -> Result<Vec<Value>> {
    let m = c.linear(silu_temb, prefix, d, n * d, true)?;
    let m = c.g.unsqueeze(&m, &[1]);
    Ok(c.g.split_equal(&m, 2, n))
}

/// `LN(x)·(1+scale)+shift`.
fn modulate(c: &mut Ctx<'_>, x: &str, d: usize, shift: &str, scale: &str) -> Value {
    let n = c.layer_norm(x, d, LN_EPS);
    let one = c.g.scalar(1.0);
    let s1 = c.g.add(&one, scale);
    let y = c.g.mul(&n, &s1);
    c.g.add(&y, shift)
}

fn feed_forward(c: &mut Ctx<'_>, x: &str, prefix: &str, d: usize) -> Result<Value> {
    let h = c.linear(x, &format!("{prefix}.net.0.proj"), d, 4 * d, true)?;
    let h = c.g.gelu_tanh(&h);
    c.linear(&h, &format!("{prefix}.net.2"), 4 * d, d, true)
}

/// Which of a joint block's two streams a graph computes to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Both,
    Image,
    Text,
}

/// One joint block; returns the new (image, text) streams, each only where `keep` asks for it.
/// The attention always reads both streams; what follows it is per stream, so a stream nobody
/// reads after the last block is not computed at all.
fn joint_block(
    c: &mut Ctx<'_>,
    cfg: &TransformerConfig,
    i: usize,
    (x, y, silu_temb): (&str, &str, &str),
    keep: Keep,
) -> Result<(Option<Value>, Option<Value>)> {
    let d = cfg.hidden;
    let p = format!("transformer_blocks.{i}");
    let mx = modulation(c, silu_temb, &format!("{p}.norm1.linear"), d, 6)?;
    let my = modulation(c, silu_temb, &format!("{p}.norm1_context.linear"), d, 6)?;
    // Chunk order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    let xn = modulate(c, x, d, &mx[0], &mx[1]);
    let yn = modulate(c, y, d, &my[0], &my[1]);
    // Queries only for the streams computed to the end: a tail's attention is the other
    // stream's cross-attention over both streams' keys, with no output to split off and drop.
    let q = match keep {
        Keep::Text => None,
        _ => Some(c.linear(&xn, &format!("{p}.attn.to_q"), d, d, true)?),
    };
    let k = c.linear(&xn, &format!("{p}.attn.to_k"), d, d, true)?;
    let v = c.linear(&xn, &format!("{p}.attn.to_v"), d, d, true)?;
    let qc = match keep {
        Keep::Image => None,
        _ => Some(c.linear(&yn, &format!("{p}.attn.add_q_proj"), d, d, true)?),
    };
    let kc = c.linear(&yn, &format!("{p}.attn.add_k_proj"), d, d, true)?;
    let vc = c.linear(&yn, &format!("{p}.attn.add_v_proj"), d, d, true)?;
    // Sequence order [image tokens, text tokens]; no mask.
    let ka = c.g.concat(&[&k, &kc], 1);
    let va = c.g.concat(&[&v, &vc], 1);
    let scale = Some(1.0 / (cfg.head_dim as f32).sqrt());
    let heads = cfg.num_heads;
    let (ox, oy) = match (q, qc) {
        (Some(q), Some(qc)) => {
            let qa = c.g.concat(&[&q, &qc], 1);
            let o = c.attention(&qa, &ka, &va, heads, scale, None);
            let nx = c.g.shape_slice(x, 1, 2);
            let ny = c.g.shape_slice(y, 1, 2);
            let sizes = c.g.concat(&[&nx, &ny], 0);
            let parts =
                c.g.op_n("Split", &[&o, &sizes], vec![("axis", Attr::Int(1))], 2);
            let mut parts = parts.into_iter();
            (parts.next(), parts.next())
        }
        (q, qc) => (
            q.map(|q| c.attention(&q, &ka, &va, heads, scale, None)),
            qc.map(|qc| c.attention(&qc, &ka, &va, heads, scale, None)),
        ),
    };

    let stream = |c: &mut Ctx<'_>, h: &str, a: &str, m: &[Value], [out, ff]: [&str; 2]| {
        let a = c.linear(a, &format!("{p}.attn.{out}"), d, d, true)?;
        let ga = c.g.mul(&m[2], &a);
        let h = c.g.add(h, &ga);
        let hn = modulate(c, &h, d, &m[3], &m[4]);
        let f = feed_forward(c, &hn, &format!("{p}.{ff}"), d)?;
        let gf = c.g.mul(&m[5], &f);
        Ok::<_, crate::error::ExportError>(c.g.add(&h, &gf))
    };
    let x2 = ox.map(|a| stream(c, x, &a, &mx, ["to_out.0", "ff"]));
    let x2 = x2.transpose()?;
    let y2 = oy.map(|a| stream(c, y, &a, &my, ["to_add_out", "ff_context"]));
    Ok((x2, y2.transpose()?))
}

/// Joint blocks `[start, end)`: (image, text, temb) -> the streams `keep` names. Every block
/// but the last is computed whole; `keep` prunes the last.
pub fn joint_blocks(
    cfg: &TransformerConfig,
    w: &WeightStore,
    form: Form,
    (start, end): (usize, usize),
    keep: Keep,
) -> Result<Graph> {
    let d = cfg.hidden as i64;
    let name = match keep {
        Keep::Both => format!("joint_blocks_{start}_{end}"),
        Keep::Image => format!("image_tail_{start}_{end}"),
        Keep::Text => format!("text_tail_{start}_{end}"),
    };
    let mut c = Ctx::new(&name, w, form);
    let x =
        c.g.input("image_tokens", c.g.float, hidden_dims(Dim::Fixed(d)));
    let text_dims = vec![Dim::Sym("batch"), Dim::Sym("text_len"), Dim::Fixed(d)];
    let y = c.g.input("text_tokens", c.g.float, text_dims.clone());
    let t =
        c.g.input("temb", c.g.float, vec![Dim::Sym("batch"), Dim::Fixed(d)]);
    let st = c.g.silu(&t);
    let mut streams = (Some(x), Some(y));
    for i in start..end {
        let (Some(xi), Some(yi)) = &streams else {
            break;
        };
        let k = if i + 1 == end { keep } else { Keep::Both };
        c.g.push_scope(&format!("block{i}"));
        let res = joint_block(&mut c, cfg, i, (xi, yi, &st), k);
        c.g.pop_scope();
        streams = res?;
    }
    let (x, y) = streams;
    if let Some(x) = x {
        c.g.output(
            &x,
            "image_tokens_out",
            c.g.float,
            hidden_dims(Dim::Fixed(d)),
        );
    }
    if let Some(y) = y {
        c.g.output(&y, "text_tokens_out", c.g.float, text_dims);
    }
    Ok(c.g)
}

/// `(image tokens, temb, latents) -> velocity [batch, C, h·p, w·p]`: AdaLN (scale, shift),
/// Linear, unpatchify `nhwpqc -> nchpwq`. Only the latents' shape is read (the grid of
/// patches), so every input is an ordinary tensor with dynamic dimensions (no shape values).
pub fn image_head(cfg: &TransformerConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let (d, p, co, ci) = (
        cfg.hidden,
        cfg.patch_size,
        cfg.out_channels,
        cfg.in_channels,
    );
    let mut c = Ctx::new("image_head", w, form);
    let x =
        c.g.input("image_tokens", c.g.float, hidden_dims(Dim::Fixed(d as i64)));
    let t = c.g.input(
        "temb",
        c.g.float,
        vec![Dim::Sym("batch"), Dim::Fixed(d as i64)],
    );
    let latent_dims = |ch: usize| {
        vec![
            Dim::Sym("batch"),
            Dim::Fixed(ch as i64),
            Dim::Sym("latent_height"),
            Dim::Sym("latent_width"),
        ]
    };
    let latents = c.g.input("latents", c.g.float, latent_dims(ci));
    let st = c.g.silu(&t);
    let m = modulation(&mut c, &st, "image_norm_out.linear", d, 2)?;
    // AdaLayerNormContinuous chunks are (scale, shift).
    let xn = modulate(&mut c, &x, d, &m[1], &m[0]);
    let o = c.linear(&xn, "image_proj_out", d, p * p * co, true)?;
    let g = &mut c.g;
    let b = g.shape_slice(&o, 0, 1);
    let hw = g.shape_slice(&latents, 2, 4);
    let pc = g.const_i64(&[p as i64]);
    let grid = g.div(&hw, &pc);
    let ppc = g.const_i64(&[p as i64, p as i64, co as i64]);
    let s6 = g.concat(&[&b, &grid, &ppc], 0);
    let o6 = g.reshape_to(&o, &s6);
    let img = g.transpose(&o6, &[0, 5, 1, 3, 2, 4]);
    let cc = g.const_i64(&[co as i64]);
    let s4 = g.concat(&[&b, &cc, &hw], 0);
    let out = g.reshape_to(&img, &s4);
    g.output(&out, "velocity", g.float, latent_dims(co));
    Ok(c.g)
}

/// `text stream -> logits [batch, text_len, V]`: LayerNorm (no affine) then Linear.
pub fn text_head(
    cfg: &TransformerConfig,
    w: &WeightStore,
    form: Form,
    vocab: usize,
) -> Result<Graph> {
    let d = cfg.hidden;
    let mut c = Ctx::new("text_head", w, form);
    let y = c.g.input(
        "text_tokens",
        c.g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Sym("text_len"),
            Dim::Fixed(d as i64),
        ],
    );
    let yn = c.layer_norm(&y, d, LN_EPS);
    let l = c.linear(&yn, "text_proj_out", d, vocab, true)?;
    c.g.output(
        &l,
        "logits",
        c.g.float,
        vec![
            Dim::Sym("batch"),
            Dim::Sym("text_len"),
            Dim::Fixed(vocab as i64),
        ],
    );
    Ok(c.g)
}
