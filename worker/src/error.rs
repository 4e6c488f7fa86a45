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

    /// A requested execution provider could not be registered.
    #[error("execution provider `{provider}` could not be registered: {message}")]
    Provider { provider: String, message: String },

    /// Configuration (flags, environment) is invalid.
    #[error("invalid configuration `{name}`: {message}")]
    Config { name: String, message: String },

    /// A dependency (S3, Redis, broker, disk) is unavailable; a retry may succeed.
    #[error("unavailable: {what}: {message}")]
    Unavailable { what: String, message: String },

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

impl WorkerError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::InvalidJob {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn runtime(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        WorkerError::Runtime {
            context: context.into(),
            message: e.to_string(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WorkerError::Io {
            context: context.into(),
            source,
        }
    }

    /// The fixed kind reported in results and metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::InvalidJob { .. } => ErrorKind::InvalidJob,
            WorkerError::InvalidInput { .. } => ErrorKind::InvalidInput,
            WorkerError::InputNotFound { .. } => ErrorKind::InputNotFound,
            WorkerError::Package { .. }
            | WorkerError::Runtime { .. }
            | WorkerError::Provider { .. } => ErrorKind::ModelError,
            WorkerError::Unavailable { .. } | WorkerError::Io { .. } => ErrorKind::Unavailable,
            WorkerError::Config { .. } | WorkerError::Internal(_) => ErrorKind::Internal,
        }
    }
}
