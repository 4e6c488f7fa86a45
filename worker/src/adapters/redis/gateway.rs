//! The gateway's keys (it keeps no state of its own, so any number of replicas can serve):
//! - `{prefix}:gw:job:{job_id}`: the [`JobRecord`] of a job it accepted (`SET NX`, result TTL);
//! - `{prefix}:gw:idem:{client}:{sha256(key)}`: the job an `Idempotency-Key` was first used for;
//! - `{prefix}:gw:rate:{client}:{window}`: requests of a client in one fixed window;
//! - `{prefix}:gw:open:{client}`: a sorted set of the client's jobs without a result yet (scored
//!   by acceptance time);
//! - `{prefix}:gw:replicas:{window}`: the replicas that counted requests in one window.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::{unavailable, ResultStore};
use crate::error::{Result, WorkerError};

/// What the gateway knows of a job it accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The client (token name) that submitted it: only it may see or cancel the job.
    pub owner: String,
    /// sha256 of the job as published, to tell a replay from a different job with the same id.
    pub job_sha256: String,
    /// Whether the broker confirmed the publish. A record left unconfirmed (a gateway that died
    /// between claim and confirm) is published again by the next identical request.
    pub confirmed: bool,
}

fn internal(e: serde_json::Error) -> WorkerError {
    WorkerError::Internal(e.to_string())
}

impl ResultStore {
    fn gw_key(&self, kind: &str, id: &str) -> String {
        format!("{}:gw:{kind}:{id}", self.cfg.prefix)
    }

    /// Claims `job_id` for `rec` unless it is taken; returns the record already there, if any.
    pub async fn claim_job(&self, job_id: &str, rec: &JobRecord) -> Result<Option<JobRecord>> {
        let mut c = self.conn.clone();
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::EX(self.cfg.result_ttl_secs));
        let body = serde_json::to_string(rec).map_err(internal)?;
        let old: Option<String> = c
            .set_options(self.gw_key("job", job_id), body, opts)
            .await
            .map_err(unavailable)?;
        old.map(|s| serde_json::from_str(&s).map_err(internal))
            .transpose()
    }

    /// Stores the record of an accepted job and adds it to its owner's open set: one script, one
    /// reply.
    pub async fn record_accepted(&self, job_id: &str, rec: &JobRecord) -> Result<()> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
                redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
                redis.call('EXPIRE', KEYS[2], ARGV[2])
                return 1",
            )
        });
        let mut c = self.conn.clone();
        let body = serde_json::to_string(rec).map_err(internal)?;
        let _: i64 = SCRIPT
            .key(self.gw_key("job", job_id))
            .key(self.gw_key("open", &rec.owner))
            .arg(body)
            .arg(self.cfg.result_ttl_secs)
            .arg(crate::clock::unix_secs())
            .arg(job_id)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Forgets a job whose publish failed (its claim or record, and its place in the open set),
    /// so that a retry publishes again.
    pub async fn forget_job(&self, job_id: &str, owner: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: (i64, i64) = redis::pipe()
            .del(self.gw_key("job", job_id))
            .zrem(self.gw_key("open", owner), job_id)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn job_record(&self, job_id: &str) -> Result<Option<JobRecord>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c
            .get(self.gw_key("job", job_id))
            .await
            .map_err(unavailable)?;
        v.map(|s| serde_json::from_str(&s).map_err(internal))
            .transpose()
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

    /// Counts `requests` requests of `client` in the current fixed window of `window_secs` (unless
    /// `window_secs` is 0), notes `replica` as counting in this window and, when `limit` is not 0, how many of its accepted jobs have no result
    /// yet as far as it matters for taking `more` within `limit`. One script, one round trip:
    /// O(1) below the limit (the open set's size counts); at it, the script drops the finished
    /// jobs from the set and counts again.
    pub async fn count_admission(
        &self,
        client: &str,
        replica: &str,
        window_secs: u64,
        requests: u64,
        more: usize,
        limit: usize,
    ) -> Result<Admission> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                local requests = 0
                if tonumber(ARGV[1]) > 0 then
                    requests = redis.call('INCRBY', KEYS[1], ARGV[6])
                    if requests == tonumber(ARGV[6]) then
                        redis.call('EXPIRE', KEYS[1], ARGV[1] + 1)
                    end
                end
                redis.call('SADD', KEYS[3], ARGV[7])
                redis.call('EXPIRE', KEYS[3], 2 * ARGV[1] + 1)
                local replicas = redis.call('SCARD', KEYS[3])
                local limit = tonumber(ARGV[5])
                if limit == 0 then return {requests, 0, replicas} end
                redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, ARGV[2])
                local n = redis.call('ZCARD', KEYS[2])
                if n + tonumber(ARGV[4]) <= limit then return {requests, n, replicas} end
                local open = 0
                for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
                    if redis.call('EXISTS', ARGV[3] .. id) == 1 then
                        redis.call('ZREM', KEYS[2], id)
                    else
                        open = open + 1
                    end
                end
                return {requests, open, replicas}",
            )
        });
        let now = crate::clock::unix_secs();
        let window = now / window_secs.max(1);
        let horizon = now.saturating_sub(self.cfg.result_ttl_secs);
        let mut c = self.conn.clone();
        let (requests, open, replicas): (u64, usize, u64) = SCRIPT
            .key(self.gw_key("rate", &format!("{client}:{window}")))
            .key(self.gw_key("open", client))
            .key(self.gw_key("replicas", &window.to_string()))
            .arg(window_secs)
            .arg(horizon)
            .arg(self.result_key(""))
            .arg(more)
            .arg(limit)
            .arg(requests)
            .arg(replica)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let secs_left = ((window + 1) * window_secs.max(1)).saturating_sub(now);
        Ok(Admission {
            window,
            requests,
            secs_left: secs_left.max(1),
            open,
            replicas: replicas.max(1),
        })
    }
}

/// What [`ResultStore::count_admission`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The rate window counted (`unix seconds / window_secs`).
    pub window: u64,
    /// Requests of the client in the current window, these included (0 when not counted).
    pub requests: u64,
    /// Seconds until the window ends.
    pub secs_left: u64,
    /// The client's jobs without a result (0 when not asked).
    pub open: usize,
    /// Gateway replicas that counted requests in this window or the one before.
    pub replicas: u64,
}
