//! Where input images come from: `s3://` URIs, local paths (`file://` or plain), or inline
//! `data:` URIs. Local mode reads files and data URIs; the service adds S3.

use base64::Engine as _;

use crate::error::{Result, WorkerError};

/// Inline images are for small inputs only.
pub const MAX_DATA_URI: usize = 1 << 20;

/// Reads input bytes for a URI.
pub trait InputFetcher {
    fn fetch(&self, uri: &str) -> Result<Vec<u8>>;
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
    fn fetch(&self, uri: &str) -> Result<Vec<u8>> {
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
}
