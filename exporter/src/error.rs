//! Every way an export can fail, each naming the file, key or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: config key `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: config key `{key}` = {value} is not used by D-DiT ({expected})")]
    UnsupportedConfig {
        path: PathBuf,
        key: String,
        value: String,
        expected: String,
    },

    #[error("missing tensor `{key}` in {component} (looked in {files})")]
    MissingTensor {
        component: String,
        key: String,
        files: String,
    },

    #[error("tensor `{key}` in {path}: expected shape {expected:?}, found {actual:?}")]
    WrongShape {
        key: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("tensor `{key}` in {path}: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        key: String,
        path: PathBuf,
        dtype: String,
    },

    #[error("{path} is not a valid safetensors file (truncated or corrupt): {message}")]
    BadSafetensors { path: PathBuf, message: String },

    #[error("shard index {path}: tensor `{key}` is mapped to {shard}, which does not contain it")]
    BadShardIndex {
        path: PathBuf,
        key: String,
        shard: String,
    },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("package {path}: {message}")]
    Package { path: PathBuf, message: String },

    /// The package failed verification (`ddit_schemas::verify_package`).
    #[error(transparent)]
    Verify(#[from] ddit_schemas::PackageError),

    #[error("invalid argument `{name}`: {message}")]
    Argument { name: String, message: String },
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ExportError::MissingFile {
                path,
                what: "not found".into(),
            }
        } else {
            ExportError::Io { path, source }
        }
    }
}
