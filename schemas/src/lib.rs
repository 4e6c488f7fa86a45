//! The contracts between ddit's parts, as plain serde types.
//!
//! The JSON Schema files beside this crate (`*.schema.json`) are the source of truth for clients
//! in any language; the types here mirror them, and `tests/schemas_agree.rs` proves they agree.
//! Its only I/O is reading a package folder to verify it ([`package::verify_package`]).

pub mod job;
pub mod manifest;
pub mod package;
pub mod progress;
pub mod result;

pub use job::{CaptionParams, GenerateParams, Job, Solver, Speed, TaskParams, VqaParams};
pub use manifest::{
    Dim, FileEntry, Manifest, ModelInfo, ModelValues, Precision, Role, SchedulerValues,
    SegmentSpec, TensorDtype, TensorSpec, TextLengths, TokenIds, VaeValues,
    MANIFEST_FORMAT_VERSION,
};
pub use package::{
    hex, package_hash, sha256_file, sha256_stream, verify_file, verify_package, PackageError,
    MANIFEST_FILE,
};
pub use progress::Progress;
pub use result::{ErrorInfo, ErrorKind, JobResult, Metrics, ModelRef, Output, Status};

/// The JSON Schema of `manifest.json`, embedded so that tools can validate without the repository.
pub const MANIFEST_SCHEMA: &str = include_str!("../manifest.schema.json");

/// The JSON Schema of a job.
pub const JOB_SCHEMA: &str = include_str!("../job.schema.json");

/// The JSON Schema of a result.
pub const RESULT_SCHEMA: &str = include_str!("../result.schema.json");

/// The JSON Schema of a progress event.
pub const PROGRESS_SCHEMA: &str = include_str!("../progress.schema.json");
