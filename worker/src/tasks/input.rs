//! Where input images come from: `s3://` URIs, local paths (`file://` or plain), or inline
//! `data:` URIs. Local mode reads files and data URIs; the service adds S3, read on its runtime
//! so that a slow object store never holds up the inference thread that asked.

use base64::Engine as _;

use crate::error::{Result, WorkerError};

/// Inline images are for small inputs only.
pub const MAX_DATA_URI: usize = 1 << 20;

/// What a fetch calls with the bytes it read (or why it could not).
pub type Fetched = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;

/// Reads input bytes for a URI.
pub trait InputFetcher {
    /// Reads `uri` and calls `done` with its bytes, here or later from another thread. What is
    /// quick to read (a file, a data URI) may be read here; a read that waits on a network
    /// must not be: the caller is an inference thread, whose other jobs step meanwhile.
    fn fetch(&self, uri: &str, done: Fetched);
}

/// Syntax check of an image reference (no I/O).
pub fn check_uri(field: &str, uri: &str) -> Result<()> {
    if uri.is_empty() {
        return Err(WorkerError::invalid(field, "must not be empty"));
    }
    if let Some(rest) = uri.strip_prefix("s3://") {
        match rest.split_once('/') {
            Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok(()),
            _ => Err(WorkerError::invalid(
                field,
                format!("`{uri}` is not s3://bucket/key"),
            )),
        }
    } else if uri.starts_with("data:") {
        if uri.len() > MAX_DATA_URI {
            return Err(WorkerError::invalid(
                field,
                format!("inline image is larger than {MAX_DATA_URI} bytes"),
            ));
        }
        if !uri.contains(";base64,") {
            return Err(WorkerError::invalid(
                field,
                "data URI must be base64 (data:image/...;base64,...)",
            ));
        }
        Ok(())
    } else if uri.contains("://") && !uri.starts_with("file://") {
        Err(WorkerError::invalid(
            field,
            format!("unsupported scheme in `{uri}` (s3://, file://, a path or data:)"),
        ))
    } else {
        Ok(())
    }
}

/// Decodes a `data:...;base64,...` URI.
pub fn decode_data_uri(uri: &str) -> Result<Vec<u8>> {
    let b64 = uri.split_once(";base64,").map(|(_, b)| b).unwrap_or("");
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| WorkerError::InvalidInput {
            source_ref: "data URI".into(),
            message: format!("invalid base64: {e}"),
        })
}

/// Local files and data URIs (local mode). `s3://` is refused with a clear message.
pub struct LocalFetcher;

impl InputFetcher for LocalFetcher {
    fn fetch(&self, uri: &str, done: Fetched) {
        done(read_local(uri))
    }
}

/// A local file (`file://` or a plain path) or a data URI, read here.
fn read_local(uri: &str) -> Result<Vec<u8>> {
    if uri.starts_with("data:") {
        return decode_data_uri(uri);
    }
    if uri.starts_with("s3://") {
        return Err(WorkerError::invalid(
            "params.image",
            "s3:// inputs need `ddit-worker serve` (S3 configured)",
        ));
    }
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => WorkerError::InputNotFound {
            source_ref: path.to_string(),
        },
        _ => WorkerError::InvalidInput {
            source_ref: path.to_string(),
            message: e.to_string(),
        },
    })
}
