//! Worker errors. Every error maps to one [`ErrorKind`], which drives the failed result,
//! ack / retry / dead-letter under the service, and metric labels.

use ddit_schemas::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A job field is missing, malformed or out of range.
    #[error("invalid job: `{field}`: {message}")]
    InvalidJob { field: String, message: String },

    /// The input image cannot be read or decoded, or is too large.
    #[error("invalid input image {source_ref}: {message}")]
    InvalidInput { source_ref: String, message: String },

    /// The input image does not exist.
    #[error("input not found: {source_ref}")]
    InputNotFound { source_ref: String },

    /// The model package is missing, corrupt or does not match the worker's contract.
    #[error("model package {path}: {message}")]
    Package { path: String, message: String },

    /// ONNX Runtime failed (loading a library, creating a session, running a segment).
    #[error("onnx runtime: {context}: {message}")]
    Runtime { context: String, message: String },

    /// ONNX Runtime could not allocate memory for a job's segment: the job is too large for this
    /// worker. Final, never retried (a batched step that fails is retried row by row first, so
    /// the row failed alone). Made by [`WorkerError::runtime`] from an allocation failure.
    #[error(
        "too large for this worker: out of memory in {context} ({message}); ask for fewer pixels \
         or images, or run it on a worker with more memory"
    )]
    TooLarge { context: String, message: String },

    /// The device failed under a segment: CUDA, cuDNN, cuBLAS or the driver reported a fault that
    /// says the GPU, not the job, is broken (an illegal address, a launch failure, an ECC error,
    /// a device-side assert, a device that is gone). Not final: the job is retried, and the
    /// service's circuit breaker counts it. Made by [`WorkerError::runtime`]; an allocation that
    /// failed stays [`WorkerError::TooLarge`]. See `docs/operations.md#circuit-breaker`.
    #[error("device failure: {context}: {message}")]
    Device { context: String, message: String },

    /// A requested execution provider could not be registered.
    #[error("execution provider `{provider}` could not be registered: {message}")]
    Provider { provider: String, message: String },

    /// Configuration (flags, environment) is invalid.
    #[error("invalid configuration `{name}`: {message}")]
    Config { name: String, message: String },

    /// A dependency (S3, Redis, broker, an HTTP endpoint) is unavailable; a retry may succeed.
    /// Made by [`WorkerError::unavailable`] alone; `message` is the whole cause chain.
    #[error("unavailable: {what}: {message}")]
    Unavailable {
        what: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// Any error, kept as the `source` of [`WorkerError::Unavailable`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources as one line, without repeating a cause already in the text.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl WorkerError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::InvalidJob {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The one constructor every adapter uses for a dependency that failed: `what` names the
    /// operation (`s3 put s3://b/k`, `redis`, `amqp connect`), `cause` is the error or a message.
    pub fn unavailable(what: impl Into<String>, cause: impl Into<BoxError>) -> Self {
        let source = cause.into();
        WorkerError::Unavailable {
            what: what.into(),
            message: chain(source.as_ref()),
            source: Some(source),
        }
    }

    /// An ONNX Runtime error; an allocation that failed is [`WorkerError::TooLarge`], a device
    /// fault [`WorkerError::Device`].
    pub fn runtime(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        let (context, message) = (context.into(), e.to_string());
        if out_of_memory(&message) {
            WorkerError::TooLarge { context, message }
        } else if device_fault(&message) {
            WorkerError::Device { context, message }
        } else {
            WorkerError::Runtime { context, message }
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WorkerError::Io {
            context: context.into(),
            source,
        }
    }

    /// The fixed kind reported in results and metrics, and with [`ErrorKind::retryable`] the one
    /// place that says what is transient: a dependency that did not answer and an I/O error; the
    /// rest is the job's or the model's and is final. An allocation that failed is the job's: it
    /// is too large for this worker, and another attempt here would only fail the same way.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::InvalidJob { .. } | WorkerError::TooLarge { .. } => ErrorKind::InvalidJob,
            WorkerError::Runtime { message, .. } if out_of_memory(message) => ErrorKind::InvalidJob,
            WorkerError::InvalidInput { .. } => ErrorKind::InvalidInput,
            WorkerError::InputNotFound { .. } => ErrorKind::InputNotFound,
            WorkerError::Package { .. }
            | WorkerError::Runtime { .. }
            | WorkerError::Provider { .. } => ErrorKind::ModelError,
            WorkerError::Unavailable { .. }
            | WorkerError::Io { .. }
            | WorkerError::Device { .. } => ErrorKind::Unavailable,
            WorkerError::Config { .. } | WorkerError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// ONNX Runtime's and CUDA's words for an allocation that failed.
fn out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "failed to allocate",
        "out of memory",
        "bad_alloc",
        "smaller than requested bytes",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// CUDA's, cuDNN's, cuBLAS's and the driver's words for a fault of the device itself (most are
/// sticky: every later call in the process fails too). Not here: out of memory (the job's, see
/// [`out_of_memory`]) and TensorRT's own errors (a bad engine or profile is a configuration).
fn device_fault(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "illegal memory access",
        "illegal address",
        "unspecified launch failure",
        "launch timed out",
        "ecc error",
        "device-side assert",
        "misaligned address",
        "illegal instruction",
        "hardware stack error",
        "uncorrectable nvlink",
        "fallen off the bus",
        "devices are busy or unavailable",
        "no cuda-capable device",
        "cuda failure 999",
        "status_execution_failed",
    ]
    .iter()
    .any(|p| m.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_allocation_is_a_final_too_large_job_and_other_runtime_errors_are_final() {
        let rt = |message: &str| WorkerError::runtime("joint_blocks", message);
        let oom = rt("BFCArena::AllocateRawInternal Available memory of 0 is smaller than requested bytes of 4096");
        assert!(matches!(oom, WorkerError::TooLarge { .. }), "{oom:?}");
        assert_eq!(oom.kind(), ErrorKind::InvalidJob);
        assert!(!oom.kind().retryable());
        let text = oom.to_string();
        assert!(
            text.starts_with("too large for this worker: out of memory in joint_blocks"),
            "{text}"
        );
        assert!(!rt("CUDA failure 2: out of memory").kind().retryable());
        // One made without the constructor is classified the same way.
        let raw = WorkerError::Runtime {
            context: "vae_decoder".into(),
            message: "std::bad_alloc".into(),
        };
        assert_eq!(raw.kind(), ErrorKind::InvalidJob);
        let shape = rt("Got invalid dimensions for input: timestep");
        assert_eq!(shape.kind(), ErrorKind::ModelError);
        assert!(!shape.kind().retryable());
        assert!(!WorkerError::invalid("steps", "0").kind().retryable());
    }

    #[test]
    fn a_device_fault_is_retryable_and_distinct_from_a_jobs_out_of_memory() {
        let rt = |message: &str| WorkerError::runtime("joint_blocks", message);
        for m in [
            "CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; expr=cudaMemcpyAsync",
            "CUDA failure 719: unspecified launch failure ; GPU=0",
            "CUDA failure 214: uncorrectable ECC error encountered",
            "CUDA failure 710: device-side assert triggered",
            "CUBLAS failure 13: CUBLAS_STATUS_EXECUTION_FAILED ; GPU=0",
            "CUDNN failure 8: CUDNN_STATUS_EXECUTION_FAILED",
            "CUDA failure 46: all CUDA-capable devices are busy or unavailable",
        ] {
            let e = rt(m);
            assert!(matches!(e, WorkerError::Device { .. }), "{m}: {e:?}");
            assert!(e.kind().retryable(), "{m}");
            assert!(e.to_string().starts_with("device failure: joint_blocks"), "{e}");
        }
        let oom = rt("CUDA failure 2: out of memory ; GPU=0");
        assert!(matches!(oom, WorkerError::TooLarge { .. }), "{oom:?}");
        let trt = rt("TensorRT EP failed to create engine from network");
        assert!(matches!(trt, WorkerError::Runtime { .. }), "{trt:?}");
    }
}
