//! The gateway's one error answer: a status, a stable `code`, a message naming the offending
//! field, and `Retry-After` where waiting helps (429, 503). A 5xx names no internal detail: it
//! carries a `request_id`, and the detail is logged under that id.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ddit_schemas::ErrorKind;
use serde::Serialize;

use crate::error::WorkerError;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable, machine-readable: `unauthorized`, `rate_limited`, `invalid_job`, …
    pub code: String,
    pub message: String,
    /// On a 5xx: the id under which the gateway logged the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            request_id: None,
            retry_after: None,
        }
    }

    /// A server-side failure: the client reads `message` and a request id; `detail` goes to
    /// the log under that id.
    fn server(
        status: StatusCode,
        code: &str,
        message: &str,
        detail: &dyn std::fmt::Display,
    ) -> Self {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        let id = ddit_schemas::hex(&b);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(request_id = %id, "{detail}");
        } else {
            tracing::error!(request_id = %id, "{detail}");
        }
        Self {
            request_id: Some(id),
            ..Self::new(status, code, message)
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
            &detail,
        )
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_job",
            format!("`{field}`: {message}"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A body that could not be read: over the size limit (413 `too_large`), or malformed (400).
    pub fn body(status: StatusCode, message: String) -> Self {
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        Self::new(status, code, message)
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }
}

/// A dependency that failed is 503 (retry); a job's fault is 422; anything else 500.
impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        match e.kind() {
            ErrorKind::InvalidJob | ErrorKind::InvalidInput => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_job",
                e.to_string(),
            ),
            ErrorKind::InputNotFound => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ErrorKind::Unavailable => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "a dependency of the gateway is unavailable; retry",
                &e,
            )
            .retry_after(1),
            _ => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(serde_json::json!({ "error": &self })),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
