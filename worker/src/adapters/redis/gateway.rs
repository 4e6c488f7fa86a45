//! The gateway's keys (it keeps no state of its own, so any number of replicas can serve):
//! - `{prefix}:gw:job:{job_id}`: the [`JobRecord`] of a job it accepted (`SET NX`, result TTL);
//! - `{prefix}:gw:idem:{client}:{sha256(key)}`: the job an `Idempotency-Key` was first used for;
//! - `{prefix}:gw:rate:{client}:{window}`: requests of a client in one fixed window;
//! - `{prefix}:gw:open:{client}`: a sorted set of the client's jobs without a result yet (scored
//!   by acceptance time).

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

    /// Stores the record of an accepted job and adds it to its owner's open set, in one round
    /// trip.
    pub async fn record_accepted(&self, job_id: &str, rec: &JobRecord) -> Result<()> {
        let mut c = self.conn.clone();
        let body = serde_json::to_string(rec).map_err(internal)?;
        let open = self.gw_key("open", &rec.owner);
        let ttl = self.cfg.result_ttl_secs;
        let now = crate::clock::unix_secs() as f64;
        let _: ((), i64, i64) = redis::pipe()
            .set_ex(self.gw_key("job", job_id), body, ttl)
            .zadd(&open, job_id, now)
            .expire(&open, ttl as i64)
            .query_async(&mut c)
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

    /// Counts one request of `client` in the current fixed window of `window_secs`; returns the
    /// count so far and the seconds until the window ends.
    pub async fn count_request(&self, client: &str, window_secs: u64) -> Result<(u64, u64)> {
        let now = crate::clock::unix_secs();
        let window = now / window_secs.max(1);
        let key = self.gw_key("rate", &format!("{client}:{window}"));
        let mut c = self.conn.clone();
        let (n, _): (u64, i64) = redis::pipe()
            .incr(&key, 1)
            .expire(&key, window_secs.max(1) as i64 + 1)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let left = (window + 1) * window_secs.max(1) - now;
        Ok((n, left.max(1)))
    }

    /// How many of `client`'s accepted jobs have no result yet, as far as it matters for taking
    /// `more` within `limit`: one round trip, and O(1) below the limit (the set's size counts); at
    /// it, a script drops the finished jobs from the set and counts again.
    pub async fn open_jobs(&self, client: &str, more: usize, limit: usize) -> Result<usize> {
        const COUNT_OPEN: &str = r"
            redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
            local n = redis.call('ZCARD', KEYS[1])
            if n + tonumber(ARGV[3]) <= tonumber(ARGV[4]) then
                return n
            end
            local open = 0
            for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
                if redis.call('EXISTS', ARGV[2] .. id) == 1 then
                    redis.call('ZREM', KEYS[1], id)
                else
                    open = open + 1
                end
            end
            return open";
        let mut c = self.conn.clone();
        let horizon = crate::clock::unix_secs().saturating_sub(self.cfg.result_ttl_secs);
        redis::cmd("EVAL")
            .arg(COUNT_OPEN)
            .arg(1)
            .arg(self.gw_key("open", client))
            .arg(horizon)
            .arg(self.result_key(""))
            .arg(more)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }
}
