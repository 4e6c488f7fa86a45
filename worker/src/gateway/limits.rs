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
use crate::adapters::redis::gateway::{Places, PlacesAsk, RateAsk};

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
    ask(gw, client, true, &[]).await.0
}

/// Counts one request of `client` and, when it is admitted, reserves places in flight for
/// `job_ids` (scoped ids), all or none: one Redis round trip. The first result is the count's
/// (429 over the rate), the second the places' (429 when they do not fit; also an error when the
/// request was refused, since nothing was reserved).
pub async fn admit_with_places(
    gw: &Gateway,
    client: &Client,
    job_ids: &[&str],
) -> (Result<(), ApiError>, Result<(), ApiError>) {
    ask(gw, client, true, job_ids).await
}

/// [`admit_with_places`], counting the request only when `count`.
async fn ask(
    gw: &Gateway,
    client: &Client,
    count: bool,
    job_ids: &[&str],
) -> (Result<(), ApiError>, Result<(), ApiError>) {
    let rpm = if count {
        client.limits.requests_per_minute
    } else {
        0
    };
    let limit = client.limits.jobs_in_flight;
    let member = format!(
        "{}-{}",
        gw.limiter.replica,
        gw.limiter.seq.fetch_add(1, Ordering::Relaxed)
    );
    let rate = (rpm > 0).then_some(RateAsk {
        limit: rpm,
        window_secs: WINDOW_SECS,
        member: &member,
    });
    let places = (limit > 0 && !job_ids.is_empty()).then_some(PlacesAsk { job_ids, limit });
    if let Some(p) = &places {
        if p.job_ids.len() > limit {
            let e = ApiError::invalid(
                "jobs",
                format!(
                    "{} jobs; this client's in-flight limit is {limit}",
                    job_ids.len()
                ),
            );
            return (Err(e.clone()), Err(e));
        }
    }
    if rate.is_none() && places.is_none() {
        return (Ok(()), Ok(()));
    }
    let admission = match gw.redis.admit(&client.name, rate, places).await {
        Ok(a) => a,
        Err(e) => {
            let e = ApiError::from(e);
            return (Err(e.clone()), Err(e));
        }
    };
    let counted = match admission.rate_wait_secs {
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
    };
    let placed = match admission.places {
        Places::Reserved => Ok(()),
        Places::NotAsked if job_ids.is_empty() || limit == 0 => Ok(()),
        Places::NotAsked => Err(counted
            .clone()
            .err()
            .unwrap_or_else(|| ApiError::internal("places in flight were not reserved"))),
        Places::Refused { open } => {
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
    };
    (counted, placed)
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
/// `Retry-After` when they do not fit. Counts no request.
pub async fn reserve(gw: &Gateway, client: &Client, job_ids: &[&str]) -> Result<(), ApiError> {
    ask(gw, client, false, job_ids).await.1
}
