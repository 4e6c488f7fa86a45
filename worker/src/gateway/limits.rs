//! Per-client admission, shared by every replica through Redis and exact under concurrency:
//! - requests: at most the client's rate in any 60 s (a sliding window on Redis's clock), every
//!   authenticated request counted before its body is read, valid or not;
//! - jobs in flight: places are reserved atomically, for all the jobs of a request at once,
//!   before anything is published, and given back when the publish fails. A job holds its place
//!   until its result is stored.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;

use super::auth::Client;
use super::error::ApiError;
use super::Gateway;

/// The rate window.
const WINDOW_SECS: u64 = 60;

/// Names this replica's requests in the rate window: the replica and a sequence number.
pub struct Limiter {
    replica: String,
    seq: AtomicU64,
}

impl Limiter {
    pub fn new(replica: String) -> Self {
        Self {
            replica,
            seq: AtomicU64::new(0),
        }
    }
}

/// Counts one request of `client`; 429 with `Retry-After` over its rate.
pub async fn admit(gw: &Gateway, client: &Client) -> Result<(), ApiError> {
    let rpm = client.limits.requests_per_minute;
    if rpm == 0 {
        return Ok(());
    }
    let seq = gw.limiter.seq.fetch_add(1, Ordering::Relaxed);
    let member = format!("{}-{seq}", gw.limiter.replica);
    match gw
        .redis
        .count_request(&client.name, rpm, WINDOW_SECS, &member)
        .await?
    {
        None => Ok(()),
        Some(wait) => {
            gw.metrics.limited.inc();
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("more than {rpm} requests in {WINDOW_SECS} s"),
            )
            .retry_after(wait))
        }
    }
}

/// [`admit`] in a task of its own, for a handler that reads its body meanwhile: the request
/// counts even when the body turns out bad and the handler stops early.
pub fn admit_meanwhile(
    gw: &std::sync::Arc<Gateway>,
    client: &Client,
) -> impl std::future::Future<Output = Result<(), ApiError>> {
    let (gw, client) = (gw.clone(), client.clone());
    let counting = tokio::spawn(async move { admit(&gw, &client).await });
    async move {
        counting
            .await
            .map_err(|e| ApiError::internal(format!("counting a request: {e}")))?
    }
}

/// Reserves places in flight for `job_ids` (scoped ids) of `client`, all or none; 429 with
/// `Retry-After` when they do not fit.
pub async fn reserve(gw: &Gateway, client: &Client, job_ids: &[&str]) -> Result<(), ApiError> {
    let limit = client.limits.jobs_in_flight;
    if limit == 0 || job_ids.is_empty() {
        return Ok(());
    }
    if job_ids.len() > limit {
        return Err(ApiError::invalid(
            "jobs",
            format!(
                "{} jobs; this client's in-flight limit is {limit}",
                job_ids.len()
            ),
        ));
    }
    match gw
        .redis
        .reserve_in_flight(&client.name, job_ids, limit)
        .await?
    {
        None => Ok(()),
        Some(open) => {
            gw.metrics.limited.inc();
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_jobs",
                format!(
                    "{open} jobs in flight and {} more; the limit is {limit}",
                    job_ids.len()
                ),
            )
            .retry_after(5))
        }
    }
}
