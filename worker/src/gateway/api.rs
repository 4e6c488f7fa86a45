//! The routes. Each `/v1` handler is annotated for the OpenAPI document, which is generated from
//! these annotations (so the document cannot list a route the router lacks, or miss one).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Client;
use super::error::ApiError;
use super::events::{self, JobState};
use super::limits;
use super::submit::{self, Accepted, Inline};
use super::Gateway;

#[derive(OpenApi)]
#[openapi(
    info(title = "ddit gateway", description = "Text to image, captioning and VQA jobs over HTTP. \
        Jobs follow schemas/job.schema.json; results schemas/result.schema.json."),
    modifiers(&Security),
    tags((name = "jobs"))
)]
struct Doc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The `/v1` routes with their OpenAPI document.
pub fn v1() -> (axum::Router<Arc<Gateway>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(Doc::openapi())
        .routes(routes!(submit_job))
        .routes(routes!(submit_batch))
        .routes(routes!(job_status, cancel_job))
        .routes(routes!(job_events))
        .routes(routes!(job_output))
        .split_for_parts()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Ok(Some(k.to_string())),
            _ => Err(ApiError::bad_request(
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )),
        },
    }
}

/// The body: a JSON document, or a multipart form whose `job` part is the JSON and whose
/// `image` part (a file) becomes `params.image` (held once, as sent).
async fn job_body(gw: &Arc<Gateway>, req: Request) -> Result<(Value, Option<Inline>), ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !multipart {
        let bytes = Bytes::from_request(req, gw)
            .await
            .map_err(|r| ApiError::body(r.status(), r.body_text()))?;
        let job = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
        return Ok((job, None));
    }
    let mut form = Multipart::from_request(req, gw)
        .await
        .map_err(|r| ApiError::body(r.status(), r.body_text()))?;
    let (mut job, mut image) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::body(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let content_type = field
            .content_type()
            .unwrap_or("application/octet-stream")
            .to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::body(e.status(), e.body_text()))?;
        match name.as_str() {
            "job" => {
                job =
                    Some(serde_json::from_slice::<Value>(&bytes).map_err(|e| {
                        ApiError::bad_request(format!("part `job` is not JSON: {e}"))
                    })?)
            }
            "image" => {
                image = Some(Inline {
                    bytes,
                    content_type,
                })
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown part `{other}` (expected `job` and `image`)"
                )))
            }
        }
    }
    let job = job.ok_or_else(|| ApiError::bad_request("multipart body without a `job` part"))?;
    Ok((job, image))
}

/// Accepts in a task of its own: a client that goes away (or a request timeout) mid-way must
/// not leave a claim or a place in flight that no publish or release follows.
async fn accept_detached(
    gw: &Arc<Gateway>,
    client: &Client,
    jobs: Vec<submit::Prepared>,
    key: Option<String>,
    presumed: Option<submit::Presumed>,
) -> Result<Vec<Accepted>, ApiError> {
    let (gw, client) = (gw.clone(), client.clone());
    tokio::spawn(async move { submit::accept(&gw, &client, jobs, key.as_deref(), presumed).await })
        .await
        .map_err(|e| ApiError::internal(format!("accepting: {e}")))?
}

fn accepted_response(a: Accepted) -> Response {
    let status = if a.replayed {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let location = a.status_url.clone();
    (status, [(header::LOCATION, location)], Json(a)).into_response()
}

/// Submit one job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])),
    request_body(content = Object, description = "A job (`schemas/job.schema.json`); `job_id` may be omitted. \
        Or `multipart/form-data` with a `job` part (that JSON) and an `image` file part for caption and VQA. \
        `data:` images are moved to S3.", content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key again (from the same client) returns the first job and creates none")),
    responses(
        (status = 202, description = "Queued (the broker confirmed it)", body = Accepted, headers(("Location" = String))),
        (status = 200, description = "A replay: the job this key or `job_id` already made", body = Accepted),
        (status = 400, description = "Not JSON, or a bad multipart form", body = ApiError),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 409, description = "`job_id` taken by another job or client", body = ApiError),
        (status = 413, description = "Body over `--max-body-bytes`", body = ApiError),
        (status = 422, description = "Not a valid job; the message names the field", body = ApiError),
        (status = 429, description = "Over the client's request rate or jobs in flight; see Retry-After", body = ApiError),
        (status = 503, description = "Broker, Redis or S3 unavailable; retry after Retry-After", body = ApiError),
    ))]
async fn submit_job(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    req: Request,
) -> Result<Response, ApiError> {
    // Counted, and a place reserved for a fresh id, while the body is read.
    let admitted = submit::Presumed::admit_meanwhile(&gw, &client)?;
    // Let the admission (and the Redis connection's writer) run now: a body already buffered is
    // read and checked without yielding, and on one event loop the round trip would otherwise
    // start only when the handler waits for it.
    tokio::task::yield_now().await;
    let parsed = async {
        let key = idempotency_key(req.headers())?;
        let (job, image) = job_body(&gw, req).await?;
        Ok::<_, ApiError>((key, submit::prepare(&gw, &client, job, image, "")?))
    }
    .await;
    let (counted, presumed) = admitted.finish().await;
    let (key, prepared) = match counted.and(parsed) {
        Ok(p) => p,
        Err(e) => {
            presumed.give_back(&gw, &client).await;
            return Err(e);
        }
    };
    let mut accepted = accept_detached(&gw, &client, vec![prepared], key, Some(presumed)).await?;
    let one = accepted
        .pop()
        .ok_or_else(|| ApiError::internal("no job accepted"))?;
    Ok(accepted_response(one))
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
struct Batch {
    /// Jobs as for `POST /v1/jobs` (give each a `job_id` to make retrying the batch safe).
    #[schema(value_type = Vec<Object>)]
    jobs: Vec<Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct BatchAccepted {
    jobs: Vec<Accepted>,
}

/// Submit up to `--max-batch-jobs` jobs at once: all are validated before any is published.
#[utoipa::path(post, path = "/v1/jobs/batch", tag = "jobs", security(("bearer" = [])),
    request_body = Batch,
    responses(
        (status = 202, description = "All queued (replays included, marked `replayed`)", body = BatchAccepted),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 409, body = ApiError),
        (status = 413, body = ApiError),
        (status = 422, description = "A job is invalid: `jobs[i].field`, or too many jobs", body = ApiError),
        (status = 429, body = ApiError),
        (status = 503, description = "Some jobs may be queued; retrying the batch with job ids is safe", body = ApiError),
    ))]
async fn submit_batch(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    req: Request,
) -> Result<Response, ApiError> {
    let counted = limits::admit_meanwhile(&gw, &client);
    tokio::task::yield_now().await;
    let bytes = Bytes::from_request(req, &gw).await;
    counted.await?;
    let bytes = bytes.map_err(|r| ApiError::body(r.status(), r.body_text()))?;
    let batch: Batch = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body is not {{\"jobs\": [...]}}: {e}")))?;
    let max = gw.cfg.max_batch_jobs;
    if batch.jobs.is_empty() || batch.jobs.len() > max {
        return Err(ApiError::invalid(
            "jobs",
            format!("{} jobs; 1 to {max} allowed", batch.jobs.len()),
        ));
    }
    let mut ids = std::collections::HashSet::new();
    let mut prepared = Vec::with_capacity(batch.jobs.len());
    for (i, job) in batch.jobs.into_iter().enumerate() {
        if let Some(id) = job.get("job_id").and_then(Value::as_str) {
            if !ids.insert(id.to_string()) {
                return Err(ApiError::invalid(
                    &format!("jobs[{i}].job_id"),
                    format!("`{id}` appears twice in this batch"),
                ));
            }
        }
        prepared.push(submit::prepare(
            &gw,
            &client,
            job,
            None,
            &format!("jobs[{i}]."),
        )?);
    }
    let jobs = accept_detached(&gw, &client, prepared, None, None).await?;
    Ok((StatusCode::ACCEPTED, Json(BatchAccepted { jobs })).into_response())
}

/// A job's state: `queued`, `running` (with the step), or final with its result.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses((status = 200, body = JobState), (status = 401, body = ApiError), (status = 404, description = "No such job of this client", body = ApiError)))]
async fn job_status(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    Path(id): Path<String>,
) -> Result<Json<JobState>, ApiError> {
    Ok(Json(events::state(&gw, &client, &id).await?))
}

/// Cancel a job: a queued one never runs, a running one stops at its next step. Ends `canceled`
/// (unless it finished first).
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, description = "Cancel requested; the state shows when it took", body = JobState),
        (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn cancel_job(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let st = events::state(&gw, &client, &id).await?;
    if !st.is_final() {
        gw.redis.request_cancel(&client.scoped(&id)).await?;
    }
    Ok((StatusCode::ACCEPTED, Json(st)).into_response())
}

/// Server-Sent Events: `state`, then `progress` (`schemas/progress.schema.json`), then one
/// `result` (`schemas/result.schema.json`); then the stream ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream"),
        (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn job_events(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(events::stream(gw, client, id).await?.into_response())
}

/// Output image `n` (from 0) of a succeeded generate job, streamed from S3.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{n}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path), ("n" = u32, Path)),
    responses((status = 200, description = "The PNG; `ETag` is its sha256", content_type = "image/png"),
        (status = 401, body = ApiError), (status = 404, description = "No such job, output, or not finished", body = ApiError),
        (status = 503, body = ApiError)))]
async fn job_output(
    State(gw): State<Arc<Gateway>>,
    client: Client,
    Path((id, n)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    let st = events::state(&gw, &client, &id).await?;
    let out = st
        .result
        .as_ref()
        .and_then(|r| r.outputs.get(n as usize))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "job `{id}` has no output {n} (state `{}`)",
                st.state
            ))
        })?;
    let (length, body) = gw.s3.open(&out.uri).await?;
    let chunks = futures_util::stream::unfold(body, |mut b| async move {
        match b.try_next().await {
            Ok(Some(c)) => Some((Ok::<_, std::io::Error>(c), b)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), b)),
        }
    });
    let mut r = Response::new(Body::from_stream(chunks));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("image/png"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&format!("\"{}\"", out.sha256)) {
        h.insert(header::ETAG, v);
    }
    if let Some(len) = length.filter(|l| *l >= 0) {
        h.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(len as u64),
        );
    }
    Ok(r)
}
