//! Phase 2–4: map checkpoint tensors by name onto graphs of ONNX operators, one graph per
//! segment. Every weight is shape-checked against the config when it is taken.

pub mod t5;
pub mod transformer;
pub mod vae;

use std::collections::HashMap;

use ddit_schemas::Precision;

use crate::checkpoint::{TensorRef, WeightStore};
use crate::error::Result;
use crate::onnx::{Attr, DType, Graph, Value, WeightData};

/// How the weights of an fp32 segment are stored in the ONNX files (a half-precision segment keeps
/// its weights in its own type: [`Form::precision`]). Graph I/O and arithmetic stay f32; f16 storage
/// halves the package and is cast up at load (execution providers may then fold or fuse it).
/// `Int8` keeps f32 everywhere except the linear layers of the segments that take it (the joint
/// blocks and T5): those become ONNX Runtime `MatMulIntegerToFloat`, with int8 weights and one
/// f32 scale per output channel (symmetric), the activations quantized at run time with one scale
/// per row ([`Ctx::quantize_rows`]) and multiplied in integers, so a row's result never depends on
/// the other rows of its batch. (`MatMulNBits` with 8-bit blocks of 32 at accuracy level 4
/// measured 1.7× slower here: docs/performance.md.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    Int8,
}

impl StoreDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreDtype::F32 => "f32",
            StoreDtype::F16 => "f16",
            StoreDtype::Int8 => "int8",
        }
    }

    /// The storage for a segment that keeps its linear layers in floating point.
    pub fn unquantized(self) -> Self {
        match self {
            StoreDtype::Int8 => StoreDtype::F32,
            s => s,
        }
    }
}

/// Which execution provider's parser the graphs are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// ONNX Runtime's CPU (and CUDA) providers: opset 23, attention as one `Attention` op.
    #[default]
    Cpu,
    /// TensorRT 10.13's ONNX parser: opset 22 and only the operators it accepts
    /// ([`crate::onnx::tensorrt`]); attention written out as MatMul, Softmax, MatMul.
    TensorRt,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::TensorRt => "tensorrt",
        }
    }

    /// The ONNX opset the graphs import.
    pub fn opset(self) -> u32 {
        match self {
            Target::Cpu => crate::onnx::write::OPSET,
            Target::TensorRt => crate::onnx::tensorrt::OPSET,
        }
    }
}

/// How one segment is written: its weights' storage, what it computes in, and for which
/// provider's parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    pub store: StoreDtype,
    pub target: Target,
    /// A half-precision segment keeps its weights in that type (no `Cast`; `store` then only
    /// matters for int8, which the exporter refuses with half precision), declares its float
    /// I/O in it, and computes normalisation statistics and softmax in f32.
    pub precision: Precision,
}

impl Form {
    /// The graph element type of `precision`.
    pub fn float(&self) -> DType {
        match self.precision {
            Precision::Fp32 => DType::F32,
            Precision::Fp16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// A graph being built from one checkpoint component.
pub struct Ctx<'a> {
    pub g: Graph,
    pub w: &'a WeightStore,
    pub store: StoreDtype,
    pub target: Target,
    /// int8 activations already quantized: input value -> [`Quantized`], so the linear layers
    /// that read one input (Q, K, V; the modulations) quantize it once.
    quantized: HashMap<Value, Quantized>,
}

/// ONNX's code for uint8 (the int8 path's quantized activations).
const U8: i64 = 2;

/// Activations quantized per row ([`Ctx::quantize_rows`]).
#[derive(Clone)]
struct Quantized {
    /// uint8, shaped as the input.
    q: Value,
    /// One f32 scale per row, `[..., 1]`: its largest magnitude.
    scale: Value,
    /// The uint8 scalar 128.
    zero: Value,
}

fn transpose2(vals: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; vals.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = vals[r * cols + c];
        }
    }
    out
}

/// One scale per output channel of a torch `[out, inp]` weight: `max|w| / 127` (1 for a zero
/// channel).
pub fn int8_scales(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    w.chunks_exact(inp)
        .take(out)
        .map(|row| {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax > 0.0 {
                amax / 127.0
            } else {
                1.0
            }
        })
        .collect()
}

/// A torch `[out, inp]` weight as int8 `[inp, out]` (the `MatMul` layout) with one scale per
/// output channel ([`int8_scales`]): `w ≈ q · scale`.
pub fn quantize_int8(w: &[f32], out: usize, inp: usize) -> (Vec<i8>, Vec<f32>) {
    let scales = int8_scales(w, out, inp);
    let mut q = vec![0i8; out * inp];
    for (n, (row, s)) in w.chunks_exact(inp).zip(&scales).enumerate() {
        for (k, v) in row.iter().enumerate() {
            q[k * out + n] = (v / s).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (q, scales)
}

impl<'a> Ctx<'a> {
    pub fn new(name: &str, w: &'a WeightStore, form: Form) -> Self {
        let mut g = Graph::new(name);
        g.float = form.float();
        Self {
            g,
            w,
            store: form.store,
            target: form.target,
            quantized: HashMap::new(),
        }
    }

    /// A checkpoint tensor as an initializer of the graph's float type, or, in an f32 graph,
    /// stored per `--weights` (f16 storage cast back to f32 at load).
    fn lazy(&mut self, t: TensorRef, dims: Vec<i64>, transpose: Option<(usize, usize)>) -> Value {
        let dtype = match (self.g.float, self.store) {
            (DType::F32, StoreDtype::F16) => DType::F16,
            (float, _) => float,
        };
        let hint = t.key.clone();
        let data = WeightData::Lazy(Box::new(move || {
            let v = t.to_f32()?;
            let v = match transpose {
                Some((r, c)) => transpose2(&v, r, c),
                None => v,
            };
            Ok(dtype.encode(&v))
        }));
        let name = self.g.initializer(&hint, dims, dtype, data, true);
        if dtype == self.g.float {
            name
        } else {
            self.g.cast(&name, self.g.float)
        }
    }

    /// Checkpoint tensor `key` with `shape`, stored as `dims` (same element count).
    pub fn param_as(&mut self, key: &str, shape: &[usize], dims: &[i64]) -> Result<Value> {
        let t = self.w.get(key, shape)?;
        Ok(self.lazy(t, dims.to_vec(), None))
    }

    pub fn param(&mut self, key: &str, shape: &[usize]) -> Result<Value> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.param_as(key, shape, &dims)
    }

    /// A `[out, in]` checkpoint matrix, stored transposed as `[in, out]` for `MatMul`.
    pub fn param_t(&mut self, key: &str, out: usize, inp: usize) -> Result<Value> {
        let t = self.w.get(key, &[out, inp])?;
        Ok(self.lazy(t, vec![inp as i64, out as i64], Some((out, inp))))
    }

    /// `x @ W^T (+ b)` for torch `Linear(inp, out)` at `prefix`.
    pub fn linear(
        &mut self,
        x: &str,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Value> {
        let y = if self.store == StoreDtype::Int8 {
            self.linear_int8(x, &format!("{prefix}.weight"), inp, out)?
        } else {
            let w = self.param_t(&format!("{prefix}.weight"), out, inp)?;
            self.g.matmul(x, &w)
        };
        if bias {
            let b = self.param(&format!("{prefix}.bias"), &[out])?;
            Ok(self.g.add(&y, &b))
        } else {
            Ok(y)
        }
    }

    /// `x @ W^T` with the `[out, in]` checkpoint matrix `key` quantized to int8 (see
    /// [`StoreDtype::Int8`] and [`quantize_int8`]): `x`'s rows in uint8 ([`Ctx::quantize_rows`])
    /// times the int8 weights, accumulated in int32, then scaled per row and per output channel.
    fn linear_int8(&mut self, x: &str, key: &str, inp: usize, out: usize) -> Result<Value> {
        let t = self.w.get(key, &[out, inp])?;
        let weights = {
            let t = t.clone();
            WeightData::Lazy(Box::new(move || {
                let q = quantize_int8(&t.to_f32()?, out, inp).0;
                Ok(q.into_iter().map(|v| v as u8).collect())
            }))
        };
        // The activations' 1/127 ([`Ctx::quantize_rows`]) folded in.
        let scales = WeightData::Lazy(Box::new(move || {
            let s = int8_scales(&t.to_f32()?, out, inp);
            Ok(s.iter().flat_map(|v| (v / 127.0).to_le_bytes()).collect())
        }));
        let dims = vec![inp as i64, out as i64];
        let weights = self
            .g
            .initializer(&format!("{key}.int8"), dims, DType::I8, weights, true);
        let scales = self.g.initializer(
            &format!("{key}.scale"),
            vec![out as i64],
            DType::F32,
            scales,
            false,
        );
        let a = self.quantize_rows(x);
        Ok(self.g.ms_op(
            "MatMulIntegerToFloat",
            &[&a.q, &weights, &a.scale, &scales, &a.zero],
            vec![],
        ))
    }

    /// `x` (`[..., in]`, f32) quantized per row (the last axis), symmetric: with `m = max|row|`,
    /// `q = round(127 · x / m) + 128` in uint8, and the row's scale `m` (`[..., 1]`; the weights'
    /// scales carry the 1/127). Each row's values depend on that row alone, unlike ONNX Runtime's
    /// `DynamicQuantizeMatMul`, which takes one scale over the whole tensor (every job of a batch).
    fn quantize_rows(&mut self, x: &str) -> Quantized {
        if let Some(q) = self.quantized.get(x) {
            return q.clone();
        }
        let g = &mut self.g;
        let c = g.scalar_f32(128.0);
        // A constant, folded by ONNX Runtime.
        let zero = g.op("Cast", &[&c], vec![("to", Attr::Int(U8))]);
        let abs = g.op("Abs", &[x], vec![]);
        let last = g.const_i64(&[-1]);
        let amax = g.op(
            "ReduceMax",
            &[&abs, &last],
            vec![("keepdims", Attr::Int(1))],
        );
        // x / max|row| in [-1, 1], then one per-tensor QuantizeLinear of scale 1/127 rounds (half
        // to even), shifts and saturates. A zero row divides 0 by 0: whatever bytes it gets, its
        // scale 0 makes its product exactly 0.
        let unit = g.div(x, &amax);
        let step = g.scalar_f32(1.0 / 127.0);
        let q = g.op("QuantizeLinear", &[&unit, &step, &zero], vec![]);
        let a = Quantized {
            q,
            scale: amax,
            zero,
        };
        self.quantized.insert(x.to_string(), a.clone());
        a
    }

    /// LayerNorm over the last axis without affine parameters. In a half-precision graph the
    /// mean and variance are f32 (`stash_type` 1, also ONNX's default, written out so that no
    /// reader has to know it).
    pub fn layer_norm(&mut self, x: &str, dim: usize, eps: f32) -> Value {
        let ones = self.g.const_float(&vec![1.0; dim], vec![dim as i64]);
        let zeros = self.g.const_float(&vec![0.0; dim], vec![dim as i64]);
        let mut attrs = vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))];
        if self.g.is_half() {
            attrs.push(("stash_type", Attr::Int(DType::F32 as i64)));
        }
        self.g.op("LayerNormalization", &[x, &ones, &zeros], attrs)
    }

    /// torch `GroupNorm(groups, channels, eps)` on `[B, C, H, W]`, affine from `prefix`: one
    /// `InstanceNormalization` over `[B, groups, C/groups·H·W]` (unit scale, zero bias), then the
    /// per-channel affine.
    pub fn group_norm(
        &mut self,
        x: &str,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f32,
    ) -> Result<Value> {
        let g = &mut self.g;
        let orig = g.shape(x);
        let mut grouped = g.reshape(x, &[0, groups as i64, -1]);
        // Half precision: the statistics over C/groups·H·W values in f32, the affine in half.
        let half = g.is_half().then_some(g.float);
        if half.is_some() {
            grouped = g.cast(&grouped, DType::F32);
        }
        let ones = g.const_f32(&vec![1.0; groups], vec![groups as i64]);
        let zeros = g.const_f32(&vec![0.0; groups], vec![groups as i64]);
        let mut normed = g.op(
            "InstanceNormalization",
            &[&grouped, &ones, &zeros],
            vec![("epsilon", Attr::Float(eps))],
        );
        if let Some(float) = half {
            normed = g.cast(&normed, float);
        }
        let back = g.reshape_to(&normed, &orig);
        let c = channels as i64;
        let gamma = self.param_as(&format!("{prefix}.weight"), &[channels], &[c, 1, 1])?;
        let beta = self.param_as(&format!("{prefix}.bias"), &[channels], &[c, 1, 1])?;
        let scaled = self.g.mul(&back, &gamma);
        Ok(self.g.add(&scaled, &beta))
    }

    /// torch `Conv2d(cin, cout, k, stride, padding)`, channels given as `(cin, cout)` at `prefix`, with bias.
    pub fn conv(
        &mut self,
        x: &str,
        prefix: &str,
        (cin, cout): (usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Value> {
        let w = self.param(&format!("{prefix}.weight"), &[cout, cin, k, k])?;
        let b = self.param(&format!("{prefix}.bias"), &[cout])?;
        let (k, s, p) = (k as i64, stride as i64, pad as i64);
        Ok(self.g.op(
            "Conv",
            &[x, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
            ],
        ))
    }

    /// Softmax attention over `[B, S, H*dh]` projections with `heads` heads; returns
    /// `[B, S, H*dh]`. Scores are scaled by `scale` (1 when `None`); `bias` (`[1 or B, H, S, S]`)
    /// is added before the softmax. For the CPU target, one ONNX `Attention` op (opset 23), which
    /// ONNX Runtime's CPU kernel runs faster than its contrib `MultiHeadAttention` on narrow
    /// models (docs/performance.md); for TensorRT, [`Ctx::attention_unfused`].
    pub fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        heads: usize,
        scale: Option<f32>,
        bias: Option<&str>,
    ) -> Value {
        if self.target == Target::TensorRt {
            return self.attention_unfused(q, k, v, heads, scale, bias);
        }
        let mut inputs = vec![q, k, v];
        inputs.extend(bias);
        let heads = Attr::Int(heads as i64);
        let mut attrs = vec![
            ("q_num_heads", heads.clone()),
            ("kv_num_heads", heads),
            ("scale", Attr::Float(scale.unwrap_or(1.0))),
        ];
        if self.g.is_half() {
            // The softmax in f32 (the scores' exponentials and their sum).
            attrs.push(("softmax_precision", Attr::Int(DType::F32 as i64)));
        }
        self.g.op("Attention", &inputs, attrs)
    }

    /// [`Ctx::attention`] in operators every TensorRT parser accepts: heads split off by
    /// Reshape/Transpose, `softmax(scale · Q·Kᵀ + bias)·V` (the softmax in f32; in half precision
    /// `(scale · Q)·Kᵀ`), heads merged back.
    fn attention_unfused(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        heads: usize,
        scale: Option<f32>,
        bias: Option<&str>,
    ) -> Value {
        let g = &mut self.g;
        let h = heads as i64;
        let split = |g: &mut Graph, x: &str, perm: &[i64]| {
            let x4 = g.reshape(x, &[0, 0, h, -1]);
            g.transpose(&x4, perm)
        };
        let scale = scale.filter(|s| *s != 1.0);
        // Half precision: Q scaled before Q·Kᵀ, so the scores are never √d times larger than
        // they end up (about 22 times for the VAE's one 512-channel head), which could overflow
        // fp16 before the scale. fp32 graphs scale the scores after, as they always did (their
        // files stay byte-identical).
        let pre = scale.filter(|_| g.is_half()).map(|s| g.scalar(s));
        let q = match &pre {
            Some(c) => g.mul(q, c),
            None => q.to_string(),
        };
        let q4 = split(g, &q, &[0, 2, 1, 3]);
        let kt = split(g, k, &[0, 2, 3, 1]);
        let v4 = split(g, v, &[0, 2, 1, 3]);
        let mut s = g.matmul(&q4, &kt);
        if let Some(scale) = scale.filter(|_| pre.is_none()) {
            let c = g.scalar(scale);
            s = g.mul(&s, &c);
        }
        if let Some(b) = bias {
            s = g.add(&s, b);
        }
        // Half precision: the softmax in f32, its probabilities back in half for the MatMul.
        let p = match g.is_half().then_some(g.float) {
            Some(float) => {
                let s32 = g.cast(&s, DType::F32);
                let p = g.softmax(&s32, -1);
                g.cast(&p, float)
            }
            None => g.softmax(&s, -1),
        };
        let o = g.matmul(&p, &v4);
        let o = g.transpose(&o, &[0, 2, 1, 3]);
        g.reshape(&o, &[0, 0, -1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_weights_round_trip_within_half_a_step_per_channel() {
        // Three output channels of five inputs, transposed; one channel all zero.
        let (out, inp) = (3, 5);
        let mut w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        w[inp..2 * inp].iter_mut().for_each(|v| *v = 0.0);
        let (q, scales) = quantize_int8(&w, out, inp);
        assert_eq!((q.len(), scales.len()), (out * inp, out));
        for n in 0..out {
            for k in 0..inp {
                let back = f32::from(q[k * out + n]) * scales[n];
                assert!(
                    (back - w[n * inp + k]).abs() <= scales[n] / 2.0 + 1e-7,
                    "{n},{k}"
                );
            }
        }
        // A channel's largest magnitude takes the full range; a zero channel stays zero.
        assert!((0..inp).any(|k| q[k * out].abs() == 127));
        assert_eq!(scales[1], 1.0);
        assert!((0..inp).all(|k| q[k * out + 1] == 0));
    }
}
