//! Accepting a job: validate it against `job.schema.json`, move inline and uploaded images to
//! S3, claim its id (idempotency), publish it with a broker confirm, record it.

use std::sync::Arc;

use axum::http::StatusCode;
use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::auth::Client;
use super::error::ApiError;
use super::Gateway;
use crate::adapters::amqp;
use crate::adapters::redis::gateway::JobRecord;

/// A job the gateway took (or had taken before: `replayed`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub job_id: String,
    /// `GET` it for the job's state; `…/events` streams progress, then the result.
    pub status_url: String,
    /// True when this request repeated an earlier one (same `Idempotency-Key` or `job_id`) and
    /// no new job was created.
    pub replayed: bool,
}

/// A random job id: `gw-` and 128 random bits in hex.
fn new_job_id() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("random: {e}"),
        )
    })?;
    Ok(format!("gw-{}", ddit_schemas::hex(&b)))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    ddit_schemas::hex(&Sha256::digest(bytes))
}

/// Checks `job` against the job schema and the typed contract, naming the first bad field.
pub fn validate(gw: &Gateway, job: &Value, at: &str) -> Result<(), ApiError> {
    // The fast yes/no first; the error walk only for a job that fails.
    if !gw.schema.is_valid(job) {
        let Some(e) = gw.schema.iter_errors(job).next() else {
            return Err(ApiError::invalid("body", "does not match job.schema.json"));
        };
        let path = e.instance_path().to_string();
        let field = format!("{at}{}", path.trim_start_matches('/').replace('/', "."));
        let field = if field.is_empty() {
            "body".to_string()
        } else {
            field
        };
        return Err(ApiError::invalid(&field, e));
    }
    let parsed = <ddit_schemas::Job as serde::Deserialize>::deserialize(job)
        .map_err(|e| ApiError::invalid(at.trim_end_matches('.'), e))?;
    for (field, uri) in image_fields(&parsed.task) {
        if !(uri.starts_with("s3://") || uri.starts_with("data:")) {
            return Err(ApiError::invalid(
                &format!("{at}params.{field}"),
                "the service reads s3:// or data: images (or a multipart upload)",
            ));
        }
        crate::tasks::input::check_uri(field, uri).or_else(|e| {
            // Inline images larger than a queue message allows are fine here: they go to S3.
            if uri.starts_with("data:") && uri.contains(";base64,") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    Ok(())
}

fn image_fields(task: &ddit_schemas::TaskParams) -> Vec<(&'static str, &str)> {
    match task {
        ddit_schemas::TaskParams::Generate(_) => vec![],
        ddit_schemas::TaskParams::Caption(p) => vec![("image", p.image.as_str())],
        ddit_schemas::TaskParams::Vqa(p) => vec![("image", p.image.as_str())],
    }
}

/// Fills in `job_id` (the idempotency key's job, or a new one) and `submitted_at`.
async fn identify(
    gw: &Gateway,
    client: &Client,
    job: &mut Value,
    idempotency_key: Option<&str>,
) -> Result<String, ApiError> {
    let given = job
        .get("job_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = match idempotency_key {
        Some(k) => {
            let candidate = match &given {
                Some(g) => g.clone(),
                None => new_job_id()?,
            };
            let bound = gw
                .redis
                .bind_idempotency_key(&client.name, &sha256_hex(k.as_bytes()), &candidate)
                .await?;
            if given.as_ref().is_some_and(|g| *g != bound) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!("this Idempotency-Key was used for job `{bound}`"),
                ));
            }
            bound
        }
        None => match given {
            Some(g) => g,
            None => new_job_id()?,
        },
    };
    if let Some(o) = job.as_object_mut() {
        o.insert("job_id".into(), Value::String(id.clone()));
        o.entry("submitted_at")
            .or_insert_with(|| Value::String(crate::clock::now_rfc3339()));
    }
    Ok(id)
}

/// Moves every `data:` image of `job` to S3 under `{prefix}/inputs/gateway/`, content-addressed,
/// and points the job at it.
async fn materialize(gw: &Gateway, job: &mut Value) -> Result<(), ApiError> {
    let Some(image) = job.pointer_mut("/params/image") else {
        return Ok(());
    };
    let Some(uri) = image.as_str().filter(|u| u.starts_with("data:")) else {
        return Ok(());
    };
    let (meta, b64) = uri.split_once(";base64,").unwrap_or(("", ""));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::invalid("params.image", format!("invalid base64: {e}")))?;
    if bytes.len() > gw.s3.cfg.max_input_bytes {
        return Err(ApiError::invalid(
            "params.image",
            format!("larger than {} bytes", gw.s3.cfg.max_input_bytes),
        ));
    }
    let content_type = meta
        .strip_prefix("data:")
        .filter(|t| t.starts_with("image/"));
    let key = format!(
        "{}/inputs/gateway/{}",
        gw.s3.cfg.prefix.trim_matches('/'),
        sha256_hex(&bytes)
    );
    let put = gw.s3.put(
        &key,
        &bytes,
        content_type.unwrap_or("application/octet-stream"),
        &[],
    );
    *image = Value::String(put.await?);
    Ok(())
}

/// Accepts one validated job for `client`. A repeated request (same idempotency key, or same
/// `job_id` and body) returns the first one's job and publishes nothing.
///
/// A job given neither has a fresh random id nobody else can repeat, so there is nothing to
/// claim: its record is written while it is published. Otherwise the id is claimed first
/// (`SET NX`), published, then marked confirmed. A failed publish forgets the job again.
pub async fn accept(
    gw: &Arc<Gateway>,
    client: &Client,
    mut job: Value,
    idempotency_key: Option<&str>,
) -> Result<Accepted, ApiError> {
    let fresh = idempotency_key.is_none() && job.get("job_id").is_none();
    let job_id = identify(gw, client, &mut job, idempotency_key).await?;
    let mut as_sent = job.clone();
    if let Some(o) = as_sent.as_object_mut() {
        o.remove("submitted_at");
    }
    let rec = JobRecord {
        owner: client.name.clone(),
        job_sha256: sha256_hex(as_sent.to_string().as_bytes()),
        confirmed: true,
    };
    let accepted = |replayed| Accepted {
        status_url: format!("/v1/jobs/{job_id}"),
        job_id: job_id.clone(),
        replayed,
    };
    materialize(gw, &mut job).await?;
    let done = if fresh {
        let (recorded, published) =
            tokio::join!(gw.redis.record_accepted(&job_id, &rec), publish(gw, &job));
        published.and(recorded.map_err(ApiError::from))
    } else {
        let claim = JobRecord {
            confirmed: false,
            ..rec.clone()
        };
        match gw.redis.claim_job(&job_id, &claim).await? {
            Some(old) if old.owner != rec.owner || old.job_sha256 != rec.job_sha256 => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "job_id_taken",
                    format!("job `{job_id}` was submitted with another body or by another client"),
                ))
            }
            Some(old) if old.confirmed => return Ok(accepted(true)),
            // Claimed but never confirmed (a gateway died mid-way, or the same request runs
            // right now): publishing again is safe, the workers keep one result per job id.
            _ => {}
        }
        match publish(gw, &job).await {
            Ok(()) => gw
                .redis
                .record_accepted(&job_id, &rec)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(e),
        }
    };
    if let Err(e) = done {
        let _ = gw.redis.forget_job(&job_id, &client.name).await;
        return Err(e);
    }
    gw.metrics.accepted.inc();
    Ok(accepted(false))
}

async fn publish(gw: &Gateway, job: &Value) -> Result<(), ApiError> {
    let body = job.to_string();
    let started = std::time::Instant::now();
    let ch = gw.channel().await?;
    amqp::publish_job(&ch, &gw.cfg.amqp.queue, body.as_bytes(), None).await?;
    gw.metrics
        .publish_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}
