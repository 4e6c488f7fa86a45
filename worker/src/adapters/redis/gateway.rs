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

/// A request to count against a client's rate: at most `limit` requests in any `window_secs`.
pub struct RateAsk<'a> {
    pub limit: u64,
    pub window_secs: u64,
    pub member: &'a str,
}

/// Places in flight to reserve, for `job_ids` (scoped ids), within `limit`.
pub struct PlacesAsk<'a> {
    pub job_ids: &'a [&'a str],
    pub limit: usize,
}

/// What [`ResultStore::admit`] decided.
#[derive(Debug, PartialEq)]
pub struct Admission {
    /// `Some(secs)` when the request was over its rate: the seconds until one would be admitted.
    pub rate_wait_secs: Option<u64>,
    pub places: Places,
}

/// Whether places in flight were reserved.
#[derive(Debug, PartialEq)]
pub enum Places {
    Reserved,
    /// They would pass the limit: `open` jobs are in flight.
    Refused {
        open: usize,
    },
    /// None were asked for, or the request was over its rate.
    NotAsked,
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

    /// Admits one request of `client` in one atomic script (so replicas' clocks, and concurrent
    /// requests on any replicas, do not matter):
    /// - `rate`, when given: counts it against `limit` requests in any `window_secs` (a sliding
    ///   window on Redis's clock; `member` unique to this request). A refused request is not
    ///   recorded, and reserves nothing.
    /// - `places`, when given: reserves places for its job ids among the client's jobs in flight,
    ///   all or none. At the limit the script first drops the jobs that have a result, and the
    ///   places older than a claim whose job was never recorded (the set holds at most `limit`).
    pub async fn admit(
        &self,
        client: &str,
        rate: Option<RateAsk<'_>>,
        places: Option<PlacesAsk<'_>>,
    ) -> Result<Admission> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
                local rate_limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]) * 1000
                if rate_limit > 0 then
                    local t = redis.call('TIME')
                    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
                    if redis.call('ZCARD', KEYS[1]) >= rate_limit then
                        local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
                        return {tonumber(oldest[2]) + window - now, -2}
                    end
                    redis.call('ZADD', KEYS[1], now, ARGV[3])
                    redis.call('PEXPIRE', KEYS[1], window)
                end
                local limit = tonumber(ARGV[4])
                if limit == 0 or #ARGV < 11 then return {-1, -1} end
                redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
                local more = 0
                for i = 11, #ARGV do
                    if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then more = more + 1 end
                end
                local n = redis.call('ZCARD', KEYS[2])
                if n + more > limit then
                    local claims = tonumber(ARGV[7]) - tonumber(ARGV[10])
                    local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
                    for i = 1, #all, 2 do
                        local id, at = all[i], tonumber(all[i + 1])
                        local finished = redis.call('EXISTS', ARGV[5] .. id) == 1
                        -- a place whose request never recorded its job (a gateway that died)
                        local orphan = at < claims and redis.call('EXISTS', ARGV[9] .. id) == 0
                        if finished or orphan then
                            redis.call('ZREM', KEYS[2], id)
                            n = n - 1
                        end
                    end
                    if n + more > limit then return {-1, n} end
                end
                for i = 11, #ARGV do redis.call('ZADD', KEYS[2], ARGV[7], ARGV[i]) end
                redis.call('EXPIRE', KEYS[2], ARGV[8])
                return {-1, -1}",
            )
        });
        let now = crate::clock::unix_secs();
        let mut c = self.conn.clone();
        let mut call = SCRIPT.key(self.gw_key("rate", client));
        call.key(self.gw_key("open", client));
        match &rate {
            Some(r) => call.arg(r.limit).arg(r.window_secs).arg(r.member),
            None => call.arg(0).arg(0).arg(""),
        };
        call.arg(places.as_ref().map_or(0, |p| p.limit))
            .arg(self.result_key(""))
            .arg(now.saturating_sub(self.cfg.result_ttl_secs))
            .arg(now)
            .arg(self.cfg.result_ttl_secs)
            .arg(self.gw_key("job", ""))
            .arg(CLAIM_TTL_SECS);
        for id in places.iter().flat_map(|p| p.job_ids) {
            call.arg(*id);
        }
        let (wait_ms, open): (i64, i64) = call.invoke_async(&mut c).await.map_err(unavailable)?;
        Ok(Admission {
            rate_wait_secs: (wait_ms >= 0).then(|| (wait_ms as u64).div_ceil(1000).max(1)),
            places: match open {
                -1 if places.is_some() => Places::Reserved,
                n if n >= 0 => Places::Refused { open: n as usize },
                _ => Places::NotAsked,
            },
        })
    }
}
