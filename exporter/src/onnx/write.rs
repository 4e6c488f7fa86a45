//! Phase 5: serialise a [`Graph`] as an ONNX `ModelProto`, with weights inline or as external data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::graph::{Attr, DType, Dim, Graph, Io, Node, WeightData};
use super::proto::{field as f, Msg};
use crate::error::{ExportError, Result};

pub const OPSET: u32 = 23;
const IR_VERSION: i64 = 8;
/// External-data offsets are aligned so that runtimes may map them directly.
const ALIGN: u64 = 4096;

/// Where a segment's weights go.
pub enum Weights<'a> {
    Inline,
    /// Into `data_path`, referenced from the model as `location`.
    External {
        data_path: &'a Path,
        location: &'a str,
    },
}

fn dtype_code(d: DType) -> i64 {
    d as i64
}

fn io_msg(io: &Io) -> Msg {
    let mut shape = Msg::new();
    for d in &io.shape {
        let mut dim = Msg::new();
        match d {
            Dim::Fixed(v) => dim.int(f::shape::DIM_VALUE, *v),
            Dim::Sym(s) => dim.string(f::shape::DIM_PARAM, s),
        };
        shape.msg(f::shape::DIM, dim);
    }
    let mut tensor = Msg::new();
    tensor
        .int(f::type_proto::ELEM_TYPE, dtype_code(io.dtype))
        .msg(f::type_proto::SHAPE, shape);
    let mut ty = Msg::new();
    ty.msg(f::type_proto::TENSOR_TYPE, tensor);
    let mut vi = Msg::new();
    vi.string(f::value_info::NAME, &io.name)
        .msg(f::value_info::TYPE, ty);
    vi
}

fn attr_msg(name: &str, a: &Attr) -> Msg {
    let mut m = Msg::new();
    m.string(f::attr::NAME, name);
    match a {
        Attr::Int(v) => {
            m.int(f::attr::I, *v).int(f::attr::TYPE, f::attr::TYPE_INT);
        }
        Attr::Ints(vs) => {
            m.packed_ints(f::attr::INTS, vs)
                .int(f::attr::TYPE, f::attr::TYPE_INTS);
        }
        Attr::Float(v) => {
            m.float(f::attr::F, *v)
                .int(f::attr::TYPE, f::attr::TYPE_FLOAT);
        }
        Attr::Str(s) => {
            m.string(f::attr::S, s)
                .int(f::attr::TYPE, f::attr::TYPE_STRING);
        }
    }
    m
}

/// Serialises `g`; with external weights, writes the data file as it goes (one tensor in memory
/// at a time). Returns the model bytes.
pub fn model_bytes(g: &Graph, weights: Weights<'_>, doc: &str) -> Result<Vec<u8>> {
    let mut graph = Msg::new();
    for n in &g.nodes {
        graph.msg(f::graph::NODE, node_msg(n));
    }
    graph.string(f::graph::NAME, &g.name);

    let mut ext = match &weights {
        Weights::Inline => None,
        Weights::External {
            data_path,
            location,
        } => {
            let file = File::create(data_path).map_err(|e| ExportError::io(*data_path, e))?;
            Some((
                BufWriter::with_capacity(1 << 20, file),
                0u64,
                *data_path,
                *location,
            ))
        }
    };
    for init in &g.initializers {
        let bytes = match &init.data {
            WeightData::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
            WeightData::Lazy(f) => std::borrow::Cow::Owned(f()?),
        };
        if bytes.len() != init.nbytes() {
            return Err(ExportError::Package {
                path: g.name.clone().into(),
                message: format!(
                    "initializer {} has {} bytes, expected {} (internal error)",
                    init.name,
                    bytes.len(),
                    init.nbytes()
                ),
            });
        }
        let mut t = Msg::new();
        t.packed_ints(f::tensor::DIMS, &init.dims)
            .int(f::tensor::DATA_TYPE, dtype_code(init.dtype))
            .string(f::tensor::NAME, &init.name);
        // Small constants stay inline even in external-data models.
        match ext.as_mut() {
            Some((w, offset, data_path, location)) if init.is_param => {
                let pad = (ALIGN - *offset % ALIGN) % ALIGN;
                w.write_all(&vec![0u8; pad as usize])
                    .map_err(|e| ExportError::io(*data_path, e))?;
                *offset += pad;
                w.write_all(&bytes)
                    .map_err(|e| ExportError::io(*data_path, e))?;
                for (k, v) in [
                    ("location", location.to_string()),
                    ("offset", offset.to_string()),
                    ("length", bytes.len().to_string()),
                ] {
                    let mut e = Msg::new();
                    e.string(f::entry::KEY, k).string(f::entry::VALUE, &v);
                    t.msg(f::tensor::EXTERNAL_DATA, e);
                }
                t.int(f::tensor::DATA_LOCATION, f::tensor::LOCATION_EXTERNAL);
                *offset += bytes.len() as u64;
            }
            _ => {
                t.bytes(f::tensor::RAW_DATA, &bytes);
            }
        }
        graph.msg(f::graph::INITIALIZER, t);
    }
    if let Some((mut w, _, data_path, _)) = ext {
        w.flush().map_err(|e| ExportError::io(data_path, e))?;
    }
    for io in &g.inputs {
        graph.msg(f::graph::INPUT, io_msg(io));
    }
    for io in &g.outputs {
        graph.msg(f::graph::OUTPUT, io_msg(io));
    }
    let contrib = g.nodes.iter().any(|n| n.domain == super::graph::MS_DOMAIN);
    Ok(model_msg(graph, doc, g, contrib).into_bytes())
}

/// An upper bound of what [`model_bytes`] writes for `g`, the model file and (with `external`
/// weights) its data file together, found without producing any weight.
pub fn size_bound(g: &Graph, external: bool) -> u64 {
    let len = |m: Msg| m.into_bytes().len() as u64 + 16;
    let nodes: u64 = g.nodes.iter().map(|n| len(node_msg(n))).sum();
    let io: u64 = g
        .inputs
        .iter()
        .chain(&g.outputs)
        .map(|i| len(io_msg(i)))
        .sum();
    let inits: u64 = g
        .initializers
        .iter()
        .map(|i| {
            let header = 64 + i.name.len() as u64 + 11 * i.dims.len() as u64;
            // Alignment padding and the location / offset / length entries.
            let ext = if external && i.is_param {
                ALIGN + 192 + 2 * g.name.len() as u64
            } else {
                0
            };
            header + ext + i.nbytes() as u64
        })
        .sum();
    nodes + io + inits + 4096 + 4 * g.name.len() as u64
}

fn node_msg(n: &Node) -> Msg {
    let mut node = Msg::new();
    for i in &n.inputs {
        node.string(f::node::INPUT, i);
    }
    for o in &n.outputs {
        node.string(f::node::OUTPUT, o);
    }
    node.string(f::node::NAME, &n.name)
        .string(f::node::OP_TYPE, n.op);
    if !n.domain.is_empty() {
        node.string(f::node::DOMAIN, n.domain);
    }
    for (name, a) in &n.attrs {
        node.msg(f::node::ATTRIBUTE, attr_msg(name, a));
    }
    node
}

/// The model around a graph: IR version, producer, opset (and ONNX Runtime's contrib domain
/// when a node uses it), and the segment name as metadata.
fn model_msg(graph: Msg, doc: &str, g: &Graph, contrib: bool) -> Msg {
    let mut opset = Msg::new();
    opset
        .string(f::opset::DOMAIN, "")
        .int(f::opset::VERSION, i64::from(g.opset));
    let mut model = Msg::new();
    model
        .int(f::model::IR_VERSION, IR_VERSION)
        .string(f::model::PRODUCER_NAME, "ddit-export")
        .string(f::model::PRODUCER_VERSION, env!("CARGO_PKG_VERSION"))
        .string(f::model::DOC_STRING, doc)
        .msg(f::model::GRAPH, graph)
        .msg(f::model::OPSET_IMPORT, opset);
    if contrib {
        let mut ms = Msg::new();
        ms.string(f::opset::DOMAIN, super::graph::MS_DOMAIN)
            .int(f::opset::VERSION, 1);
        model.msg(f::model::OPSET_IMPORT, ms);
    }
    let mut meta = Msg::new();
    meta.string(f::entry::KEY, "ddit.segment")
        .string(f::entry::VALUE, &g.name);
    model.msg(f::model::METADATA_PROPS, meta);
    model
}
