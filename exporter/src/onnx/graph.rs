//! A small ONNX graph IR: named values, nodes, initializers (possibly lazy) and typed I/O.

use crate::error::Result;

/// A value name in the graph.
pub type Value = String;

/// Element types used by the exporter (ONNX `TensorProto.DataType` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32 = 1,
    /// Only for initializers (int8 weights).
    I8 = 3,
    I64 = 7,
    F16 = 10,
    BF16 = 16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::I8 => 1,
            DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Little-endian bytes of `vals` in this floating-point type (rounded to nearest even);
    /// f32 for any other type.
    pub fn encode(self, vals: &[f32]) -> Vec<u8> {
        match self {
            DType::F16 => vals
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => vals
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// A graph I/O dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Sym(&'static str),
}

/// Node attributes.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

/// Initializer bytes: owned, or produced on demand when the segment is written (checkpoint
/// tensors: converted and transposed one at a time, so a large segment never sits in memory whole).
pub enum WeightData {
    Bytes(Vec<u8>),
    Lazy(Box<dyn Fn() -> Result<Vec<u8>>>),
}

pub struct Initializer {
    pub name: String,
    pub dims: Vec<i64>,
    pub dtype: DType,
    pub data: WeightData,
    /// Counted as a model parameter (false for index tables and shape constants).
    pub is_param: bool,
}

impl Initializer {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<i64>() as usize
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// The domain of ONNX Runtime's contrib ops (`MatMulIntegerToFloat`, ...), imported at version 1
/// by every segment.
pub const MS_DOMAIN: &str = "com.microsoft";

pub struct Node {
    pub op: &'static str,
    /// The operator set: "" (ONNX) or [`MS_DOMAIN`] (ONNX Runtime's contrib ops).
    pub domain: &'static str,
    pub name: String,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    pub attrs: Vec<(&'static str, Attr)>,
}

pub struct Io {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// A graph under construction.
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Initializer>,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    /// The ONNX opset the model imports ([`super::write::OPSET`] unless a target asks otherwise).
    pub opset: u32,
    /// The floating-point type the graph computes in (F32, F16 or BF16): its float I/O, weights
    /// and the constants of [`Graph::scalar`] and [`Graph::const_float`].
    pub float: DType,
    counter: usize,
    scope: Vec<String>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            opset: super::write::OPSET,
            float: DType::F32,
            counter: 0,
            scope: Vec::new(),
        }
    }

    /// Names created until the matching [`Graph::pop_scope`] carry `scope` as a prefix.
    pub fn push_scope(&mut self, scope: &str) {
        self.scope.push(scope.to_string());
    }

    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        let mut s = self.scope.join("/");
        if !s.is_empty() {
            s.push('/');
        }
        format!("{s}{hint}_{}", self.counter)
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) -> Value {
        self.inputs.push(Io {
            name: name.to_string(),
            dtype,
            shape,
        });
        name.to_string()
    }

    /// Declares `value` as the graph output `name` (through an Identity so names are free).
    pub fn output(&mut self, value: &str, name: &str, dtype: DType, shape: Vec<Dim>) {
        self.nodes.push(Node {
            op: "Identity",
            domain: "",
            name: format!("output/{name}"),
            inputs: vec![value.to_string()],
            outputs: vec![name.to_string()],
            attrs: vec![],
        });
        self.outputs.push(Io {
            name: name.to_string(),
            dtype,
            shape,
        });
    }

    pub fn op_n(
        &mut self,
        op: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
        n: usize,
    ) -> Vec<Value> {
        let name = self.fresh(op);
        let outputs: Vec<Value> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.nodes.push(Node {
            op,
            domain: "",
            name,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.clone(),
            attrs,
        });
        outputs
    }

    /// One ONNX Runtime contrib op (domain [`MS_DOMAIN`]) with one output.
    pub fn ms_op(
        &mut self,
        op: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
    ) -> Value {
        let out = self.op(op, inputs, attrs);
        if let Some(n) = self.nodes.last_mut() {
            n.domain = MS_DOMAIN;
        }
        out
    }

    pub fn op(
        &mut self,
        op: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
    ) -> Value {
        self.op_n(op, inputs, attrs, 1).remove(0)
    }

    pub fn initializer(
        &mut self,
        hint: &str,
        dims: Vec<i64>,
        dtype: DType,
        data: WeightData,
        is_param: bool,
    ) -> Value {
        let name = self.fresh(hint);
        self.initializers.push(Initializer {
            name: name.clone(),
            dims,
            dtype,
            data,
            is_param,
        });
        name
    }

    pub fn const_i64(&mut self, vals: &[i64]) -> Value {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(
            "const_i64",
            vec![vals.len() as i64],
            DType::I64,
            WeightData::Bytes(bytes),
            false,
        )
    }

    pub fn const_f32(&mut self, vals: &[f32], dims: Vec<i64>) -> Value {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(
            "const_f32",
            dims,
            DType::F32,
            WeightData::Bytes(bytes),
            false,
        )
    }

    pub fn scalar_f32(&mut self, v: f32) -> Value {
        self.const_f32(&[v], vec![])
    }

    /// A constant in the graph's float type ([`Graph::float`]).
    pub fn const_float(&mut self, vals: &[f32], dims: Vec<i64>) -> Value {
        let dtype = self.float;
        let bytes = dtype.encode(vals);
        self.initializer("const_f32", dims, dtype, WeightData::Bytes(bytes), false)
    }

    /// A scalar in the graph's float type.
    pub fn scalar(&mut self, v: f32) -> Value {
        self.const_float(&[v], vec![])
    }

    /// Whether the graph computes in half precision (f16 or bf16).
    pub fn is_half(&self) -> bool {
        self.float != DType::F32
    }

    /// `x` cast to `to`.
    pub fn cast(&mut self, x: &str, to: DType) -> Value {
        self.op("Cast", &[x], vec![("to", Attr::Int(to as i64))])
    }

    pub fn param_count(&self) -> u64 {
        self.initializers
            .iter()
            .filter(|i| i.is_param)
            .map(|i| i.numel() as u64)
            .sum()
    }

    pub fn weight_bytes(&self) -> u64 {
        self.initializers.iter().map(|i| i.nbytes() as u64).sum()
    }

    // ---- common operator shorthands ------------------------------------------------------

    pub fn add(&mut self, a: &str, b: &str) -> Value {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &str, b: &str) -> Value {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &str, b: &str) -> Value {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &str, b: &str) -> Value {
        self.op("Div", &[a, b], vec![])
    }
    pub fn matmul(&mut self, a: &str, b: &str) -> Value {
        self.op("MatMul", &[a, b], vec![])
    }
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> Value {
        let s = self.const_i64(shape);
        self.op("Reshape", &[x, &s], vec![])
    }
    pub fn reshape_to(&mut self, x: &str, shape: &str) -> Value {
        self.op("Reshape", &[x, shape], vec![])
    }
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> Value {
        self.op("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> Value {
        let a = self.const_i64(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }
    pub fn concat(&mut self, xs: &[&str], axis: i64) -> Value {
        self.op("Concat", xs, vec![("axis", Attr::Int(axis))])
    }
    pub fn shape(&mut self, x: &str) -> Value {
        self.op("Shape", &[x], vec![])
    }
    /// `Shape(x)[start..end]` as a 1-D int64 tensor.
    pub fn shape_slice(&mut self, x: &str, start: i64, end: i64) -> Value {
        self.op(
            "Shape",
            &[x],
            vec![("start", Attr::Int(start)), ("end", Attr::Int(end))],
        )
    }
    pub fn sigmoid(&mut self, x: &str) -> Value {
        self.op("Sigmoid", &[x], vec![])
    }
    pub fn silu(&mut self, x: &str) -> Value {
        let s = self.sigmoid(x);
        self.mul(x, &s)
    }
    pub fn softmax(&mut self, x: &str, axis: i64) -> Value {
        self.op("Softmax", &[x], vec![("axis", Attr::Int(axis))])
    }
    /// Split along `axis` into `n` equal parts.
    pub fn split_equal(&mut self, x: &str, axis: i64, n: usize) -> Vec<Value> {
        self.op_n(
            "Split",
            &[x],
            vec![
                ("axis", Attr::Int(axis)),
                ("num_outputs", Attr::Int(n as i64)),
            ],
            n,
        )
    }
    /// GELU with the tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written
    /// out with x³ as `Pow(x, 3)`: the form ONNX Runtime's FastGelu fusion rewrites into one op
    /// (every other execution provider runs it as written).
    pub fn gelu_tanh(&mut self, x: &str) -> Value {
        let c = self.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
        let k = self.scalar(0.044715);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let three = self.scalar(3.0);
        let x3 = self.op("Pow", &[x, &three], vec![]);
        let kx3 = self.mul(&k, &x3);
        let inner = self.add(x, &kx3);
        let scaled = self.mul(&c, &inner);
        let t = self.op("Tanh", &[&scaled], vec![]);
        let onep = self.add(&one, &t);
        let hx = self.mul(&half, x);
        self.mul(&hx, &onep)
    }
    /// GELU with erf: 0.5·x·(1 + erf(x/√2)).
    pub fn gelu_erf(&mut self, x: &str) -> Value {
        let inv = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let xs = self.mul(x, &inv);
        let e = self.op("Erf", &[&xs], vec![]);
        let onep = self.add(&one, &e);
        let hx = self.mul(&half, x);
        self.mul(&hx, &onep)
    }
}
