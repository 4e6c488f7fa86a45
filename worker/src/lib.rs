//! `ddit-worker`: runs D-DiT's three jobs from a model package.
//!
//! [`engine`] owns the ONNX Runtime sessions, wired only through the package manifest.
//! [`sampler`] holds the flow-matching and masked-diffusion samplers over plain [`tensor`]s.
//! [`tasks`] validates job parameters and turns jobs into plans; [`runner`] steps many jobs
//! together (cross-job batching) through its `Model` trait, which the engine implements.
//! [`adapters`] connect the runner to the world: `local` (JSONL in, a folder and JSONL out) and,
//! with the default `service` feature, `amqp`, `s3` and `redis`. [`service`] is the queue
//! worker, [`gateway`] its HTTP front door, and [`client`] the commands that talk to a fleet (bulk submit, model packages in S3,
//! probes). [`eval`] runs ShapesEval (crate `ddit-shapes-eval`) through the same runner.

pub mod adapters;
pub mod client;
pub mod clock;
pub mod engine;
pub mod error;
pub mod eval;
#[cfg(feature = "service")]
pub mod gateway;
pub mod image_io;
pub mod runner;
pub mod sampler;
#[cfg(feature = "service")]
pub mod service;
pub mod tasks;
pub mod tensor;
pub mod text;

pub use error::{Result, WorkerError};
