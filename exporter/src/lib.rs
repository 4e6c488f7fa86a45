//! `ddit-export`: a D-DiT diffusers checkpoint becomes ONNX segments plus a manifest.
//!
//! Phases: [`checkpoint`] (configs, safetensors, tokenizer) → [`segments`] (name map and graph
//! building, with every weight shape-checked) → [`onnx`] (IR and protobuf) → [`package`] (files,
//! hashes, manifest) and [`inspect`] (the shared verifier, a summary). The exporter knows nothing of queues.

pub mod checkpoint;
pub mod error;
pub mod inspect;
pub mod onnx;
pub mod package;
pub mod segments;

pub use ddit_schemas::Precision;
pub use error::{ExportError, Result};
pub use inspect::{summary, verify};
pub use package::{
    convert, ExportOptions, LengthOverrides, DEFAULT_EXTERNAL_THRESHOLD, DEFAULT_MAX_FILE_BYTES,
};
pub use segments::{Form, StoreDtype, Target};
