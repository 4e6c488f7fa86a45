//! Accepting jobs: validate each whole (its inline image decoded), claim its scoped id
//! (idempotency), reserve its place in flight, move its image to S3, publish it with a broker
//! confirm, record it. A request's jobs pass each stage together: nothing is published unless
//! every job is valid, unclaimed by another body and within the client's limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
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

/// An inline (`data:`) or uploaded image, decoded once to check it and held once.
pub struct Inline {
    pub bytes: Bytes,
    pub content_type: String,
}

/// A job checked whole and ready to accept.
pub struct Prepared {
    /// The job; an inline image's place holds [`PENDING`] until it is in S3.
    job: Value,
    image: Option<Inline>,
    /// sha256 of the job as submitted (its image by content), without `job_id`: tells a replay
    /// from another job under the same id.
    sha256: String,
}

/// Where an inline image goes once it is in S3 (never published).
const PENDING: &str = "s3://pending/inline-image";
/// How long a request waits for an identical one in progress (same id, same body) to be
/// confirmed before publishing it itself (the workers keep one result per job id).
const SETTLE: Duration = Duration::from_secs(10);

/// A random job id: `gw-` and 128 random bits in hex.
fn new_job_id() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("random: {e}")))?;
    Ok(format!("gw-{}", ddit_schemas::hex(&b)))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    ddit_schemas::hex(&Sha256::digest(bytes))
}

/// Checks `job` whole for `client` (`at` prefixes field names, e.g. `jobs[2].`): the schema, the
/// typed contract, its image (decoded, within the size limits) and its id's length.
pub fn prepare(
    gw: &Gateway,
    client: &Client,
    mut job: Value,
    upload: Option<Inline>,
    at: &str,
) -> Result<Prepared, ApiError> {
    let field = format!("{at}params.image");
    let mut image = upload;
    match job.pointer_mut("/params/image") {
        Some(slot) if image.is_some() => *slot = Value::String(PENDING.into()),
        Some(slot) if slot.as_str().is_some_and(|u| u.starts_with("data:")) => {
            let uri = slot.take();
            image = Some(from_data_uri(gw, uri.as_str().unwrap_or_default(), &field)?);
            *slot = Value::String(PENDING.into());
        }
        Some(slot) if slot.as_str() == Some(PENDING) => {
            return Err(ApiError::invalid(&field, "is not s3://bucket/key"))
        }
        _ => {
            if let (Some(_), Some(p)) = (
                &image,
                job.get_mut("params").and_then(|p| p.as_object_mut()),
            ) {
                p.insert("image".into(), Value::String(PENDING.into()));
            }
        }
    }
    validate(gw, client, &with_placeholder_id(&job), at)?;
    if let Some(id) = job.get("job_id").and_then(Value::as_str) {
        if id == "batch" {
            // `/v1/jobs/batch` is the batch route: such a job could not be read or canceled.
            return Err(ApiError::invalid(
                &format!("{at}job_id"),
                "`batch` is reserved",
            ));
        }
        if id.len() > client.max_id_len() {
            return Err(ApiError::invalid(
                &format!("{at}job_id"),
                format!("at most {} characters for this client", client.max_id_len()),
            ));
        }
    }
    let mut identity = job.clone();
    if let Some(o) = identity.as_object_mut() {
        o.remove("job_id");
        o.remove("submitted_at");
    }
    if let Some(img) = &image {
        check_image(gw, img, &field)?;
        if let Some(slot) = identity.pointer_mut("/params/image") {
            *slot = Value::String(format!("sha256:{}", sha256_hex(&img.bytes)));
        }
    }
    Ok(Prepared {
        sha256: sha256_hex(identity.to_string().as_bytes()),
        job,
        image,
    })
}

/// A job without `job_id` is valid: the gateway assigns one. Validation sees a placeholder.
fn with_placeholder_id(job: &Value) -> Value {
    let mut j = job.clone();
    if let Some(o) = j.as_object_mut() {
        o.entry("job_id")
            .or_insert_with(|| Value::String("gw-placeholder".into()));
    }
    j
}

/// Decodes a `data:…;base64,` image, refusing one over the input size before decoding it.
fn from_data_uri(gw: &Gateway, uri: &str, field: &str) -> Result<Inline, ApiError> {
    let Some((meta, b64)) = uri.split_once(";base64,") else {
        return Err(ApiError::invalid(
            field,
            "data URI must be base64 (data:image/...;base64,...)",
        ));
    };
    let max = gw.s3.cfg.max_input_bytes;
    if b64.len() / 4 * 3 > max + 3 {
        return Err(ApiError::invalid(field, format!("larger than {max} bytes")));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::invalid(field, format!("invalid base64: {e}")))?;
    let content_type = meta.strip_prefix("data:").unwrap_or_default();
    Ok(Inline {
        bytes: bytes.into(),
        content_type: content_type.to_string(),
    })
}

/// Refuses what a worker would refuse before decoding (format, completeness, header
/// dimensions, size), without decoding: a small file can claim many pixels.
fn check_image(gw: &Gateway, img: &Inline, field: &str) -> Result<(), ApiError> {
    let limits = crate::image_io::ImageLimits {
        max_bytes: gw.s3.cfg.max_input_bytes,
        ..Default::default()
    };
    crate::image_io::check(&img.bytes, "image", limits).map_err(|e| ApiError::invalid(field, e))
}

/// Checks `job` against the job schema and the typed contract, naming the first bad field.
fn validate(gw: &Gateway, client: &Client, job: &Value, at: &str) -> Result<(), ApiError> {
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
        let field = format!("{at}params.{field}");
        if uri == PENDING {
            continue;
        }
        if !uri.starts_with("s3://") {
            return Err(ApiError::invalid(
                &field,
                "the service reads s3:// or data: images (or a multipart upload)",
            ));
        }
        crate::tasks::input::check_uri(&field, uri)?;
        // Keys are taken literally: no dot segments or escapes that a store or a proxy between
        // could resolve into another client's objects.
        let key = uri
            .trim_start_matches("s3://")
            .split_once('/')
            .map_or("", |(_, k)| k);
        if key.contains('%')
            || key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(ApiError::invalid(
                &field,
                "an s3:// key must not have empty, `.` or `..` segments or `%` escapes",
            ));
        }
        // The service's own bucket holds every client's outputs: only this client's are readable.
        let own = format!("s3://{}/", gw.s3.cfg.bucket);
        if let Some(key) = uri.strip_prefix(&own) {
            let prefix = gw.s3.cfg.prefix.trim_matches('/');
            let mine = match prefix {
                "" => client.scoped(""),
                p => format!("{p}/{}", client.scoped("")),
            };
            if !key.starts_with(&mine) {
                return Err(ApiError::invalid(
                    &field,
                    "names the service's own bucket outside this client's outputs",
                ));
            }
        }
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

/// The client's id for `job` (the idempotency key's job, the given one, or a new one), and
/// whether it is fresh (random: nobody can repeat it, so there is nothing to claim).
async fn identify(
    gw: &Gateway,
    client: &Client,
    job: &Value,
    idempotency_key: Option<&str>,
    fresh_id: Option<&str>,
) -> Result<(String, bool), ApiError> {
    let given = job.get("job_id").and_then(Value::as_str);
    let Some(k) = idempotency_key else {
        return Ok(match (given, fresh_id) {
            (Some(g), _) => (g.to_string(), false),
            (None, Some(f)) => (f.to_string(), true),
            (None, None) => (new_job_id()?, true),
        });
    };
    let candidate = match given {
        Some(g) => g.to_string(),
        None => new_job_id()?,
    };
    let bound = gw
        .redis
        .bind_idempotency_key(&client.name, &sha256_hex(k.as_bytes()), &candidate)
        .await?;
    if given.is_some_and(|g| g != bound) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("this Idempotency-Key was used for job `{bound}`"),
        ));
    }
    Ok((bound, false))
}

/// What a job's claim found.
enum Claim {
    /// Nobody had the id (or nothing needs claiming): publish it.
    Publish,
    /// The same job was accepted before: answer with it, publish nothing.
    Replay,
}

/// Claims the scoped id `key` for `rec`. An identical request in progress is waited for (up to
/// [`SETTLE`]), so that two of them publish once.
async fn claim(gw: &Gateway, id: &str, key: &str, rec: JobRecord) -> Result<Claim, ApiError> {
    let taken = |why: &str| {
        ApiError::new(
            StatusCode::CONFLICT,
            "job_id_taken",
            format!("job `{id}` {why}"),
        )
    };
    let start = Instant::now();
    loop {
        match gw.redis.claim_job(key, &rec).await? {
            (None, true) => {
                // Its record expired, its result did not: the id was used.
                let _ = gw.redis.forget_job(key, &rec.owner, &rec.token).await;
                return Err(taken("has a result already"));
            }
            (None, false) => return Ok(Claim::Publish),
            (Some(old), _) if old.job_sha256 != rec.job_sha256 => {
                return Err(taken("was submitted with another body"))
            }
            (Some(old), _) if old.confirmed => return Ok(Claim::Replay),
            (Some(old), _) => {
                let age = crate::clock::unix_secs().saturating_sub(old.claimed_at);
                if start.elapsed() >= SETTLE || age > SETTLE.as_secs() {
                    // A gateway died between claim and confirm: publishing again is safe.
                    return Ok(Claim::Publish);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One job on its way: the client's id, the scoped id, the job as it will be published.
struct Pending {
    id: String,
    key: String,
    fresh: bool,
    /// This request's claim on the id.
    token: String,
    prepared: Prepared,
}

/// Accepts `jobs` for `client`, all or nothing up to the publish: a conflict or a limit refuses
/// the whole request and leaves no claim behind. A repeated request (same idempotency key, or
/// same `job_id` and body) gets the first one's job and publishes nothing.
pub async fn accept(
    gw: &Arc<Gateway>,
    client: &Client,
    jobs: Vec<Prepared>,
    idempotency_key: Option<&str>,
    presumed: Option<Presumed>,
) -> Result<Vec<Accepted>, ApiError> {
    let fresh_id = presumed.as_ref().map(|p| p.id.as_str());
    let mut identified: Result<Vec<Pending>, ApiError> = Ok(Vec::with_capacity(jobs.len()));
    for p in jobs {
        let Ok(all) = &mut identified else { break };
        let next = identify(gw, client, &p.job, idempotency_key, fresh_id).await;
        match next.and_then(|(id, fresh)| Ok((id, fresh, new_job_id()?))) {
            Ok((id, fresh, token)) => all.push(Pending {
                key: client.scoped(&id),
                id,
                fresh,
                token,
                prepared: p,
            }),
            Err(e) => identified = Err(e),
        }
    }
    let pre_reserved = settle_presumed(gw, client, presumed, identified.as_deref().ok())?;
    let pending = identified?;
    let rec = |p: &Pending, confirmed| JobRecord {
        owner: client.name.clone(),
        job_sha256: p.prepared.sha256.clone(),
        confirmed,
        claimed_at: crate::clock::unix_secs(),
        token: p.token.clone(),
    };
    let claims = futures_util::future::join_all(
        pending
            .iter()
            .filter(|p| !p.fresh)
            .map(|p| claim(gw, &p.id, &p.key, rec(p, false))),
    )
    .await;
    let mut replayed = std::collections::HashSet::new();
    let mut claimed = std::collections::HashSet::new();
    let mut refusal = None;
    for (p, c) in pending.iter().filter(|p| !p.fresh).zip(claims) {
        match c {
            Ok(Claim::Replay) => replayed.insert(p.key.as_str()),
            Ok(Claim::Publish) => claimed.insert(p.key.as_str()),
            Err(e) => {
                refusal = refusal.or(Some(e));
                false
            }
        };
    }
    let to_publish: Vec<&Pending> = pending
        .iter()
        .filter(|p| p.fresh || claimed.contains(p.key.as_str()))
        .collect();
    let keys: Vec<&str> = to_publish
        .iter()
        .map(|p| p.key.as_str())
        .filter(|k| pre_reserved.as_deref() != Some(*k))
        .collect();
    if refusal.is_none() {
        if let Err(e) = super::limits::reserve(gw, client, &keys).await {
            refusal = Some(e);
        }
    }
    if let Some(e) = refusal {
        release(gw, client, &to_publish).await;
        return Err(e);
    }
    let published = futures_util::future::join_all(
        to_publish
            .iter()
            .map(|p| publish_one(gw, client, p, rec(p, true))),
    )
    .await;
    if published.iter().any(Result::is_err) {
        // Name what did go out: a retry with these ids is safe, and nothing is orphaned.
        let queued: Vec<&str> = to_publish
            .iter()
            .zip(&published)
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| p.id.as_str())
            .collect();
        let mut e = published
            .into_iter()
            .find_map(Result::err)
            .unwrap_or_else(|| ApiError::internal("a publish failed without an error"));
        if !queued.is_empty() {
            e.message = format!("{} (queued: {})", e.message, queued.join(", "));
        }
        return Err(e);
    }
    Ok(pending
        .iter()
        .map(|p| Accepted {
            status_url: format!("/v1/jobs/{}", p.id),
            job_id: p.id.clone(),
            replayed: replayed.contains(p.key.as_str()),
        })
        .collect())
}

/// A fresh id chosen before the body was read, and its place in flight, reserved meanwhile.
pub struct Presumed {
    pub id: String,
    pub reserved: Result<(), ApiError>,
}

impl Presumed {
    /// Counts the request and reserves a place for a fresh id, in one Redis round trip, in a task
    /// of its own while the handler reads the body (a fresh job, the common case, then waits for
    /// no round trip of its own). [`Admitting::finish`] gives the count's result first.
    pub fn admit_meanwhile(gw: &Arc<Gateway>, client: &Client) -> Result<Admitting, ApiError> {
        let id = new_job_id()?;
        let (g, c, key) = (gw.clone(), client.clone(), client.scoped(&id));
        let task =
            tokio::spawn(async move { super::limits::admit_with_places(&g, &c, &[&key]).await });
        Ok(Admitting {
            gw: gw.clone(),
            client: client.clone(),
            id,
            task: Some(task),
        })
    }

    /// Gives the place back (the request was refused, or is not one fresh job).
    pub async fn give_back(self, gw: &Gateway, client: &Client) {
        if self.reserved.is_ok() {
            let key = client.scoped(&self.id);
            let _ = gw.redis.forget_job(&key, &client.name, "").await;
        }
    }
}

type Admission = (Result<(), ApiError>, Result<(), ApiError>);

/// The admission of a [`Presumed`] id under way. Dropped before [`Admitting::finish`] returns
/// (the client went away mid-body, or the request timed out), it gives back the place it
/// reserves, once reserved, rather than leave it until the claim's TTL.
pub struct Admitting {
    gw: Arc<Gateway>,
    client: Client,
    id: String,
    task: Option<tokio::task::JoinHandle<Admission>>,
}

impl Admitting {
    pub async fn finish(mut self) -> (Result<(), ApiError>, Presumed) {
        // Awaited in place: dropped mid-wait, `self` still holds the task and gives back.
        let joined = match self.task.as_mut() {
            Some(task) => task
                .await
                .map_err(|e| ApiError::internal(format!("admitting: {e}"))),
            None => Err(ApiError::internal("admission finished twice")),
        };
        self.task = None;
        let (counted, reserved) = joined.unwrap_or_else(|e| (Err(e.clone()), Err(e)));
        let id = std::mem::take(&mut self.id);
        (counted, Presumed { id, reserved })
    }
}

impl Drop for Admitting {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let (gw, client, id) = (self.gw.clone(), self.client.clone(), self.id.clone());
        tokio::spawn(async move {
            if let Ok((_, reserved)) = task.await {
                Presumed { id, reserved }.give_back(&gw, &client).await;
            }
        });
    }
}

/// The place reserved for the presumed id when the request is that one fresh job (its
/// refusal, if it was refused); otherwise gives the place back.
fn settle_presumed(
    gw: &Arc<Gateway>,
    client: &Client,
    presumed: Option<Presumed>,
    jobs: Option<&[Pending]>,
) -> Result<Option<String>, ApiError> {
    let Some(pr) = presumed else { return Ok(None) };
    let key = client.scoped(&pr.id);
    if let Some([one]) = jobs {
        if one.fresh && one.key == key {
            return pr.reserved.map(|()| Some(key));
        }
    }
    // Given back off the request's path.
    let (gw, client) = (gw.clone(), client.clone());
    tokio::spawn(async move { pr.give_back(&gw, &client).await });
    Ok(None)
}

/// Gives back what a refused request claimed and reserved.
async fn release(gw: &Gateway, client: &Client, jobs: &[&Pending]) {
    for p in jobs {
        let _ = gw.redis.forget_job(&p.key, &client.name, &p.token).await;
    }
}

/// Moves the job's image to S3, publishes the job under its scoped id and records it; on a
/// failure forgets it (claim and place in flight), so that a retry publishes again.
async fn publish_one(
    gw: &Gateway,
    client: &Client,
    p: &Pending,
    rec: JobRecord,
) -> Result<(), ApiError> {
    let mut job = p.prepared.job.clone();
    if let Some(o) = job.as_object_mut() {
        o.insert("job_id".into(), Value::String(p.key.clone()));
        o.entry("submitted_at")
            .or_insert_with(|| Value::String(crate::clock::now_rfc3339()));
    }
    let done = async {
        if let (Some(img), Some(slot)) = (&p.prepared.image, job.pointer_mut("/params/image")) {
            *slot = Value::String(materialize(gw, img).await?);
        }
        if p.fresh {
            // Nobody else can name a fresh id: record it while it is published.
            let (recorded, published) =
                tokio::join!(gw.redis.record_accepted(&p.key, &rec), publish(gw, &job));
            published.and(recorded.map_err(ApiError::from))
        } else {
            publish(gw, &job).await?;
            Ok(gw.redis.record_accepted(&p.key, &rec).await?)
        }
    };
    if let Err(e) = done.await {
        let _ = gw.redis.forget_job(&p.key, &client.name, &p.token).await;
        return Err(e);
    }
    gw.metrics.accepted.inc();
    Ok(())
}

/// Puts an inline image in S3 under `{prefix}/inputs/gateway/`, content-addressed.
async fn materialize(gw: &Gateway, img: &Inline) -> Result<String, ApiError> {
    let key = format!(
        "{}/inputs/gateway/{}",
        gw.s3.cfg.prefix.trim_matches('/'),
        sha256_hex(&img.bytes)
    );
    let content_type = Some(img.content_type.as_str())
        .filter(|t| t.starts_with("image/"))
        .unwrap_or("application/octet-stream");
    Ok(gw.s3.put(&key, &img.bytes, content_type, &[]).await?)
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
