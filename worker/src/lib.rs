//! `ddit-worker`: runs D-DiT's three jobs from a model package.
//!
//! [`engine`] owns the ONNX Runtime sessions, wired only through the package manifest.
//! [`sampler`] holds the flow-matching and masked-diffusion samplers, which see the model only
//! through two small traits. [`tasks`] validates job parameters and turns jobs into sampler
//! states; [`runner`] steps many states together (cross-job batching). [`local`] is the
//! embedded mode: JSONL in, a folder and JSONL out. [`service`] is the queue worker and
//! [`client`] the commands that talk to a fleet (bulk submit, model packages in S3, probes).

pub mod client;
pub mod engine;
pub mod error;
pub mod eval;
pub mod image_io;
pub mod local;
pub mod runner;
pub mod sampler;
pub mod service;
pub mod tasks;
pub mod text;

pub use error::{Result, WorkerError};
