//! `ddit-export`: a D-DiT diffusers checkpoint becomes ONNX segments plus a manifest.
//!
//! Phases: [`checkpoint`] (configs, safetensors, tokenizer) → [`segments`] (name map and graph
//! building, with every weight shape-checked) → [`onnx`] (IR and protobuf) → [`package`] (files,
//! hashes, manifest). The exporter knows nothing of queues.

pub mod checkpoint;
pub mod error;
pub mod onnx;
pub mod package;
pub mod segments;

pub use error::{ExportError, Result};
pub use package::{convert, summary, verify, ExportOptions, DEFAULT_EXTERNAL_THRESHOLD};
pub use segments::StoreDtype;
