//! The gateway's keys (it keeps no state of its own, so any number of replicas can serve). Every
//! job id here is the gateway's scoped id, `gw:{client}:{id}` ([`crate::gateway::auth::Client::scoped`]):
//! - `{prefix}:gw:job:{scoped id}`: the [`JobRecord`] of a job it accepted (`SET NX`; a claim not
//!   yet confirmed expires after [`CLAIM_TTL_SECS`], a confirmed one with the results);
//! - `{prefix}:gw:idem:{client}:{sha256(key)}`: the job an `Idempotency-Key` was first used for;
//! - `{prefix}:gw:rate:{client}`: a sorted set of the client's admitted requests over the last
//!   window (scored by Redis's clock in ms; at most its rate limit in size);
//! - `{prefix}:gw:open:{client}`: a sorted set of the client's jobs without a result yet (scored
//!   by acceptance time; only for a client with an in-flight limit, and never larger than it).

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::{unavailable, ResultStore};
use crate::error::{Result, WorkerError};

/// How long a claim lives before its publish is confirmed: a gateway that died between the two
/// leaves no `queued` job behind for longer.
pub const CLAIM_TTL_SECS: u64 = 600;

/// What the gateway knows of a job it accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The client (token name) that submitted it.
    pub owner: String,
    /// sha256 of the job as submitted, to tell a replay from a different job with the same id.
    pub job_sha256: String,
    /// Whether the broker confirmed the publish. A claim left unconfirmed (a gateway that died
    /// between claim and confirm) is published again by the next identical request.
    pub confirmed: bool,
    /// When the claim was made (unix seconds).
    #[serde(default)]
    pub claimed_at: u64,
    /// The request that claimed it: only that request may forget it.
    #[serde(default)]
    pub token: String,
}

/// A job as the gateway sees it, read in one round trip.
#[derive(Debug, Default)]
pub struct JobView {
    pub result: Option<ddit_schemas::JobResult>,
    pub progress: Option<ddit_schemas::Progress>,
    pub record: Option<JobRecord>,
}

fn internal(e: serde_json::Error) -> WorkerError {
    WorkerError::Internal(e.to_string())
}

impl ResultStore {
    fn gw_key(&self, kind: &str, id: &str) -> String {
        format!("{}:gw:{kind}:{id}", self.cfg.prefix)
    }

    /// Claims `job_id` for `rec` unless it is taken: the record already there, if any, and
    /// whether the job has a result. One round trip.
    pub async fn claim_job(
        &self,
        job_id: &str,
        rec: &JobRecord,
    ) -> Result<(Option<JobRecord>, bool)> {
        let mut c = self.conn.clone();
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::EX(CLAIM_TTL_SECS));
        let body = serde_json::to_string(rec).map_err(internal)?;
        let (old, finished): (Option<String>, bool) = redis::pipe()
            .atomic()
            .set_options(self.gw_key("job", job_id), body, opts)
            .exists(self.result_key(job_id))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let old = old
            .map(|s| serde_json::from_str(&s).map_err(internal))
            .transpose()?;
        Ok((old, finished))
    }

    /// Stores the record of a job whose publish the broker confirmed (the results' TTL).
    pub async fn record_accepted(&self, job_id: &str, rec: &JobRecord) -> Result<()> {
        let mut c = self.conn.clone();
        let body = serde_json::to_string(rec).map_err(internal)?;
        let _: () = c
            .set_ex(self.gw_key("job", job_id), body, self.cfg.result_ttl_secs)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Forgets a job whose publish failed (its claim or record, and its place in flight), so
    /// that a retry publishes again; unless another request (another `token`) holds it now.
    pub async fn forget_job(&self, job_id: &str, owner: &str, token: &str) -> Result<()> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                local v = redis.call('GET', KEYS[1])
                if v then
                    local ok, rec = pcall(cjson.decode, v)
                    if ok and rec.token ~= ARGV[2] then return 0 end
                    redis.call('DEL', KEYS[1])
                end
                redis.call('ZREM', KEYS[2], ARGV[1])
                return 1",
            )
        });
        let mut c = self.conn.clone();
        let _: i64 = SCRIPT
            .key(self.gw_key("job", job_id))
            .key(self.gw_key("open", owner))
            .arg(job_id)
            .arg(token)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The job's result, last progress and gateway record: one `MGET`.
    pub async fn job_view(&self, job_id: &str) -> Result<JobView> {
        let mut c = self.conn.clone();
        let keys = [
            self.result_key(job_id),
            self.step_key(job_id),
            self.gw_key("job", job_id),
        ];
        let [result, progress, record]: [Option<String>; 3] =
            c.mget(&keys).await.map_err(unavailable)?;
        Ok(JobView {
            result: result.and_then(|s| serde_json::from_str(&s).ok()),
            progress: progress.and_then(|s| serde_json::from_str(&s).ok()),
            record: record
                .map(|s| serde_json::from_str(&s).map_err(internal))
                .transpose()?,
        })
    }

    /// Binds `client`'s idempotency key (hashed) to `job_id` unless it is bound already; returns
    /// the job id it is bound to.
    pub async fn bind_idempotency_key(
        &self,
        client: &str,
        key_sha256: &str,
        job_id: &str,
    ) -> Result<String> {
        let mut c = self.conn.clone();
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::EX(self.cfg.result_ttl_secs));
        let key = self.gw_key("idem", &format!("{client}:{key_sha256}"));
        let old: Option<String> = c
            .set_options(key, job_id, opts)
            .await
            .map_err(unavailable)?;
        Ok(old.unwrap_or_else(|| job_id.to_string()))
    }

    /// Counts one request of `client` against `limit` requests in any `window_secs` (a sliding
    /// window on Redis's clock, so replicas' clocks do not matter): `Ok(None)` when admitted,
    /// `Ok(Some(secs))` when refused, with the seconds until a request would be admitted. A
    /// refused request is not recorded. `member` must be unique to this request.
    pub async fn count_request(
        &self,
        client: &str,
        limit: u64,
        window_secs: u64,
        member: &str,
    ) -> Result<Option<u64>> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                local t = redis.call('TIME')
                local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                local window = tonumber(ARGV[2]) * 1000
                redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
                if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
                    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
                    return tonumber(oldest[2]) + window - now
                end
                redis.call('ZADD', KEYS[1], now, ARGV[3])
                redis.call('PEXPIRE', KEYS[1], window)
                return -1",
            )
        });
        let mut c = self.conn.clone();
        let wait_ms: i64 = SCRIPT
            .key(self.gw_key("rate", client))
            .arg(limit)
            .arg(window_secs)
            .arg(member)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok((wait_ms >= 0).then(|| (wait_ms as u64).div_ceil(1000).max(1)))
    }

    /// Reserves places for `job_ids` among `client`'s jobs in flight, all or none: `Ok(None)`
    /// when reserved, `Ok(Some(open))` when `limit` would be passed (`open`: the jobs in flight).
    /// Atomic, so concurrent requests on any replicas never pass the limit together. At the
    /// limit the script drops the jobs that have a result, and the places older than a claim
    /// whose job was never recorded (the set holds at most `limit`).
    pub async fn reserve_in_flight(
        &self,
        client: &str,
        job_ids: &[&str],
        limit: usize,
    ) -> Result<Option<usize>> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                local limit = tonumber(ARGV[1])
                redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
                local more = 0
                for i = 8, #ARGV do
                    if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then more = more + 1 end
                end
                local n = redis.call('ZCARD', KEYS[1])
                if n + more > limit then
                    local claims = tonumber(ARGV[4]) - tonumber(ARGV[7])
                    local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
                    for i = 1, #all, 2 do
                        local id, at = all[i], tonumber(all[i + 1])
                        local finished = redis.call('EXISTS', ARGV[2] .. id) == 1
                        -- a place whose request never recorded its job (a gateway that died)
                        local orphan = at < claims and redis.call('EXISTS', ARGV[6] .. id) == 0
                        if finished or orphan then
                            redis.call('ZREM', KEYS[1], id)
                            n = n - 1
                        end
                    end
                    if n + more > limit then return n end
                end
                for i = 8, #ARGV do redis.call('ZADD', KEYS[1], ARGV[4], ARGV[i]) end
                redis.call('EXPIRE', KEYS[1], ARGV[5])
                return -1",
            )
        });
        let now = crate::clock::unix_secs();
        let mut c = self.conn.clone();
        let mut call = SCRIPT.key(self.gw_key("open", client));
        call.arg(limit)
            .arg(self.result_key(""))
            .arg(now.saturating_sub(self.cfg.result_ttl_secs))
            .arg(now)
            .arg(self.cfg.result_ttl_secs)
            .arg(self.gw_key("job", ""))
            .arg(CLAIM_TTL_SECS);
        for id in job_ids {
            call.arg(*id);
        }
        let open: i64 = call.invoke_async(&mut c).await.map_err(unavailable)?;
        Ok((open >= 0).then_some(open as usize))
    }
}
