//! Redis: results (the source of truth), notifications, progress and cancellation.
//!
//! Keys, under `{prefix}`:
//! - `{prefix}:result:{job_id}`: the result JSON, written once with `SET NX` and a TTL;
//! - `{prefix}:results` (pub/sub channel): the job id, published after the result is stored;
//! - `{prefix}:progress:{job_id}` (pub/sub channel): `{"job_id","step","total"}`, throttled;
//! - `{prefix}:step:{job_id}`: the last progress event, for a client that asks rather than listens;
//! - `{prefix}:cancel:{job_id}`: set by a client to cancel a job; checked between steps;
//! - `{prefix}:attempts:{job_id}`: deliveries of the job a worker admitted (`INCR`, the result TTL);
//! - `{prefix}:last_error:{job_id}`: the last transient failure's `ErrorInfo` JSON (same TTL);
//! - `{prefix}:gw:…`: the gateway's job records, idempotency keys and limits ([`gateway`]).

pub mod gateway;

use std::time::Duration;

use ddit_schemas::{ErrorInfo, JobResult};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::error::{Result, WorkerError};

#[derive(Clone)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    pub result_ttl_secs: u64,
    /// A private CA (PEM) that `rediss://` servers are verified against (else the system's).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &super::secret::redacted(&self.url))
            .field("prefix", &self.prefix)
            .field("result_ttl_secs", &self.result_ttl_secs)
            .field("private_ca", &self.ca_pem.is_some())
            .finish()
    }
}

#[derive(Clone)]
pub struct ResultStore {
    conn: ConnectionManager,
    pub cfg: RedisConfig,
}

pub(super) fn unavailable(e: redis::RedisError) -> WorkerError {
    WorkerError::unavailable("redis", e)
}

/// A client for `url`: `rediss://` is TLS (rustls) verified against the system's roots, or
/// against `ca_pem` when given; a plaintext server is an error, never a fallback.
pub fn client(url: &str, ca_pem: Option<&str>) -> Result<redis::Client> {
    super::install_crypto();
    let bad = |e: redis::RedisError| WorkerError::Config {
        name: "redis-url".into(),
        message: super::secret::scrub(&e.to_string(), url),
    };
    match ca_pem {
        Some(pem) if url.starts_with("rediss://") => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.as_bytes().to_vec()),
            };
            redis::Client::build_with_tls(url, certs).map_err(bad)
        }
        _ => redis::Client::open(url).map_err(bad),
    }
}

impl ResultStore {
    pub async fn connect(cfg: RedisConfig) -> Result<Self> {
        let client = client(&cfg.url, cfg.ca_pem.as_deref())?;
        // A handshake that never completes (rediss:// at a plaintext port) or a server that stops
        // answering is an error after these, never a wait. One try per (re)connect: the callers
        // retry with their own backoff (`with_backoff`, the retry queues).
        let limits = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client, limits)
            .await
            .map_err(unavailable)?;
        Ok(Self { conn, cfg })
    }

    pub fn result_key(&self, job_id: &str) -> String {
        format!("{}:result:{job_id}", self.cfg.prefix)
    }

    pub fn cancel_key(&self, job_id: &str) -> String {
        format!("{}:cancel:{job_id}", self.cfg.prefix)
    }

    pub fn results_channel(&self) -> String {
        format!("{}:results", self.cfg.prefix)
    }

    pub fn progress_channel(&self, job_id: &str) -> String {
        format!("{}:progress:{job_id}", self.cfg.prefix)
    }

    fn step_key(&self, job_id: &str) -> String {
        format!("{}:step:{job_id}", self.cfg.prefix)
    }

    fn attempts_key(&self, job_id: &str) -> String {
        format!("{}:attempts:{job_id}", self.cfg.prefix)
    }

    fn last_error_key(&self, job_id: &str) -> String {
        format!("{}:last_error:{job_id}", self.cfg.prefix)
    }

    /// Counts one more admitted delivery of `job_id`; returns the count and the last transient
    /// failure recorded for it.
    pub async fn begin_attempt(&self, job_id: &str) -> Result<(u32, Option<ErrorInfo>)> {
        let mut c = self.conn.clone();
        let key = self.attempts_key(job_id);
        let (n, _, last): (u32, bool, Option<String>) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, self.cfg.result_ttl_secs as i64)
            .get(self.last_error_key(job_id))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok((n, last.and_then(|s| serde_json::from_str(&s).ok())))
    }

    /// Takes back an admission that never ran (a job requeued at shutdown before it started).
    /// A count that expired meanwhile stays absent (a bare `DECR` would leave `-1` without a TTL).
    pub async fn forget_attempt(&self, job_id: &str) -> Result<()> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
                return redis.call('DECR', KEYS[1])",
            )
        });
        let mut c = self.conn.clone();
        let _: i64 = SCRIPT
            .key(self.attempts_key(job_id))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Keeps a transient failure as the job's last cause (named by its final result if the
    /// attempts run out on a delivery that could not record one, e.g. after a crash).
    pub async fn record_failure(&self, job_id: &str, e: &ErrorInfo) -> Result<()> {
        let mut c = self.conn.clone();
        let body = serde_json::to_string(e).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let _: () = c
            .set_ex(self.last_error_key(job_id), body, self.cfg.result_ttl_secs)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn get_result(&self, job_id: &str) -> Result<Option<JobResult>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(self.result_key(job_id)).await.map_err(unavailable)?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Whether `job_id` has a result, and whether it was canceled: one round trip.
    pub async fn result_or_cancel(&self, job_id: &str) -> Result<(bool, bool)> {
        let mut c = self.conn.clone();
        redis::pipe()
            .exists(self.result_key(job_id))
            .exists(self.cancel_key(job_id))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    /// Stores the result unless one exists (`SET NX EX`), then notifies. Returns whether this
    /// call stored it (false: a result was already there, e.g. from a redelivered copy).
    pub async fn put_result(&self, r: &JobResult) -> Result<bool> {
        let mut c = self.conn.clone();
        let body = serde_json::to_string(r).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(self.cfg.result_ttl_secs));
        let stored: Option<String> = c
            .set_options(self.result_key(&r.job_id), body, opts)
            .await
            .map_err(unavailable)?;
        let stored = stored.is_some();
        if stored {
            let _: i64 = c
                .publish(self.results_channel(), &r.job_id)
                .await
                .map_err(unavailable)?;
        }
        Ok(stored)
    }

    /// Publishes a progress event and keeps it as the job's last one (same TTL as results).
    pub async fn publish_progress(&self, job_id: &str, step: usize, total: usize) -> Result<()> {
        let mut c = self.conn.clone();
        let event = ddit_schemas::Progress {
            job_id: job_id.to_string(),
            step: step as u64,
            total: total as u64,
        };
        let msg =
            serde_json::to_string(&event).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let _: ((), i64) = redis::pipe()
            .set_ex(self.step_key(job_id), &msg, self.cfg.result_ttl_secs)
            .publish(self.progress_channel(job_id), &msg)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The last progress event of a job that has not finished, if it has started.
    pub async fn last_progress(&self, job_id: &str) -> Result<Option<ddit_schemas::Progress>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(self.step_key(job_id)).await.map_err(unavailable)?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Asks the workers to cancel `job_id` (checked at admission and between steps).
    pub async fn request_cancel(&self, job_id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c
            .set_ex(self.cancel_key(job_id), "1", self.cfg.result_ttl_secs)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A dedicated pub/sub connection that hears every job's progress and every result (a
    /// gateway replica holds one and fans it out).
    pub async fn subscribe_events(&self) -> Result<redis::aio::PubSub> {
        let client = client(&self.cfg.url, self.cfg.ca_pem.as_deref())?;
        let connecting = client.get_async_pubsub();
        let mut ps = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| WorkerError::unavailable("redis", "no pub/sub connection within 5 s"))?
            .map_err(unavailable)?;
        ps.subscribe(self.results_channel())
            .await
            .map_err(unavailable)?;
        let escaped: String = self
            .progress_channel("")
            .chars()
            .flat_map(|c| {
                let esc = "*?[]\\".contains(c).then_some('\\');
                esc.into_iter().chain(std::iter::once(c))
            })
            .collect();
        ps.psubscribe(format!("{escaped}*"))
            .await
            .map_err(unavailable)?;
        Ok(ps)
    }

    /// Which of `ids` have a cancel key.
    pub async fn canceled(&self, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.conn.clone();
        let keys: Vec<String> = ids.iter().map(|i| self.cancel_key(i)).collect();
        let vals: Vec<Option<String>> = c.mget(&keys).await.map_err(unavailable)?;
        Ok(ids
            .iter()
            .zip(vals)
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| i.clone())
            .collect())
    }
}
