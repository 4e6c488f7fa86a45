//! Phases 3 and 5: a small graph IR and its protobuf serialisation.

pub mod graph;
pub mod proto;
pub mod tensorrt;
pub mod write;

pub use graph::{Attr, DType, Dim, Graph, Value, WeightData};
