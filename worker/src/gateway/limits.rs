//! Per-client admission: requests per minute and jobs in flight, shared by every replica through
//! Redis, without a Redis round trip for a request far below its limits.
//!
//! Each replica keeps, per client, what Redis counted at its last look (the minute's requests, the
//! open jobs, and how many replicas are counting) plus what it admitted since. Since a look that
//! is younger than [`FRESH`], a replica admits from memory up to its share of what was left: half
//! of it, split between the replicas. Beyond that every request asks Redis in one script, which
//! also adds what this replica admitted from memory, and a new look starts; admissions from memory
//! reach Redis at the latest with the next flush (every [`FLUSH`]). So one replica enforces a limit
//! exactly, and replicas together never refuse a request below it; what they cannot see of each
//! other's admissions from memory can take a client past a limit by at most a quarter of it (a
//! simulation of the rule over random interleavings and flush timings: at most 49 of 40 for 2 to 8
//! replicas).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::auth::Client;
use super::error::ApiError;
use super::Gateway;
use crate::adapters::redis::gateway::Admission;

/// How often a replica sends what it admitted from memory to Redis (and looks again).
const FLUSH: Duration = Duration::from_millis(200);
/// A look older than this no longer admits from memory.
const FRESH: Duration = Duration::from_secs(1);
/// The rate window.
const WINDOW_SECS: u64 = 60;

/// What one replica knows of one client.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The rate window of `requests`.
    window: u64,
    /// The window's requests in Redis at the last look.
    requests: u64,
    /// Requests admitted here since, not yet in Redis.
    unflushed: u64,
    /// Open jobs in Redis at the last look.
    open: usize,
    /// Jobs admitted here since.
    admitted: usize,
    /// Replicas counting requests at the last look.
    replicas: u64,
    at: Instant,
}

/// The replica's counts, by client name.
pub struct Limiter {
    /// This replica's name among the replicas counting in Redis.
    replica: String,
    seen: Mutex<HashMap<String, Seen>>,
}

fn window_now() -> u64 {
    crate::clock::unix_secs() / WINDOW_SECS
}

impl Limiter {
    pub fn new(replica: String) -> Self {
        Self {
            replica,
            seen: Mutex::default(),
        }
    }

    /// Admits from memory within this replica's share of both limits: true when it did (and
    /// counted it).
    fn admit_locally(&self, client: &Client, jobs: usize) -> bool {
        let (rpm, in_flight) = limits(client, jobs);
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        let Some(s) = seen.get_mut(&client.name) else {
            return false;
        };
        let fresh = s.at.elapsed() < FRESH && s.window == window_now();
        let split = 2 * s.replicas;
        let rate_ok = rpm == 0 || (s.unflushed + 1) * split <= rpm.saturating_sub(s.requests);
        let open_ok = in_flight == 0
            || ((s.admitted + jobs) as u64) * split <= in_flight.saturating_sub(s.open) as u64;
        if fresh && rate_ok && open_ok {
            s.unflushed += 1;
            s.admitted += jobs;
        }
        fresh && rate_ok && open_ok
    }

    /// Takes the requests admitted from memory for `client`, to be sent to Redis.
    fn take_unflushed(&self, client: &str) -> u64 {
        let Ok(mut seen) = self.seen.lock() else {
            return 0;
        };
        seen.get_mut(client)
            .map(|s| std::mem::take(&mut s.unflushed))
            .unwrap_or(0)
    }

    /// Records a look at Redis (which now holds every request this replica admitted before it).
    fn looked(&self, client: &str, a: Admission) {
        if let Ok(mut seen) = self.seen.lock() {
            let unflushed = seen.get(client).map(|s| s.unflushed).unwrap_or(0);
            seen.insert(
                client.to_string(),
                Seen {
                    window: a.window,
                    requests: a.requests,
                    unflushed,
                    open: a.open,
                    admitted: 0,
                    replicas: a.replicas,
                    at: Instant::now(),
                },
            );
        }
    }

    /// Returns requests a failed flush took, for the next one.
    fn give_back(&self, client: &str, count: u64) {
        if let Ok(mut seen) = self.seen.lock() {
            if let Some(s) = seen.get_mut(client) {
                s.unflushed += count;
            }
        }
    }

    /// Records the minute's requests after a flush (the open-jobs count stays as it was).
    fn refresh_requests(&self, client: &str, a: Admission) {
        if let Ok(mut seen) = self.seen.lock() {
            if let Some(s) = seen.get_mut(client) {
                s.window = a.window;
                s.requests = a.requests;
                s.replicas = a.replicas;
            }
        }
    }

    fn clients(&self) -> Vec<String> {
        self.seen
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The limits that apply to a request carrying `jobs` jobs (0: not a submission).
fn limits(client: &Client, jobs: usize) -> (u64, usize) {
    let in_flight = if jobs == 0 {
        0
    } else {
        client.limits.jobs_in_flight
    };
    (client.limits.requests_per_minute, in_flight)
}

/// Counts one request of `client` and, for a submission of `jobs` jobs (0 for any other
/// request), checks its jobs in flight; 429 with `Retry-After` over either limit.
pub async fn admit(gw: &Gateway, client: &Client, jobs: usize) -> Result<(), ApiError> {
    let (rpm, in_flight) = limits(client, jobs);
    if rpm == 0 && in_flight == 0 || gw.limiter.admit_locally(client, jobs) {
        return Ok(());
    }
    let count = 1 + gw.limiter.take_unflushed(&client.name);
    let a = match gw
        .redis
        .count_admission(
            &client.name,
            &gw.limiter.replica,
            WINDOW_SECS,
            count,
            jobs,
            in_flight,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => {
            gw.limiter.give_back(&client.name, count - 1);
            return Err(e.into());
        }
    };
    gw.limiter.looked(&client.name, a);
    let refused = if rpm > 0 && a.requests > rpm {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("more than {rpm} requests this minute"),
        )
        .retry_after(a.secs_left)
    } else if in_flight > 0 && a.open + jobs > in_flight {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_jobs",
            format!("{} jobs in flight; the limit is {in_flight}", a.open),
        )
        .retry_after(5)
    } else {
        return Ok(());
    };
    gw.metrics.limited.inc();
    Err(refused)
}

/// Every [`FLUSH`], sends each client's requests admitted from memory to Redis and looks again
/// (so a busy client's look stays fresh). Runs until the gateway is dropped.
pub async fn flush_forever(gw: std::sync::Weak<Gateway>) {
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(gw) = gw.upgrade() else { return };
        for client in gw.limiter.clients() {
            let count = gw.limiter.take_unflushed(&client);
            if count == 0 {
                continue;
            }
            match gw
                .redis
                .count_admission(&client, &gw.limiter.replica, WINDOW_SECS, count, 0, 0)
                .await
            {
                // The open-jobs count is only refreshed by an exact check; keep it.
                Ok(a) => gw.limiter.refresh_requests(&client, a),
                Err(e) => {
                    gw.limiter.give_back(&client, count);
                    tracing::warn!(%client, "limits flush: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Limits;

    fn client(rpm: u64, in_flight: usize) -> Client {
        Client {
            name: "c".into(),
            limits: Limits {
                requests_per_minute: rpm,
                jobs_in_flight: in_flight,
            },
        }
    }

    fn look(l: &Limiter, requests: u64, open: usize, replicas: u64) {
        let a = Admission {
            window: window_now(),
            requests,
            secs_left: 30,
            open,
            replicas,
        };
        l.looked("c", a);
    }

    fn admitted_from_memory(l: &Limiter, c: &Client, jobs: usize) -> usize {
        (0..1000).take_while(|_| l.admit_locally(c, jobs)).count()
    }

    #[test]
    fn memory_admits_half_of_what_is_left_split_between_replicas() {
        let l = Limiter::new("r".into());
        let c = client(40, 0);
        assert!(!l.admit_locally(&c, 0), "no look yet: ask Redis");
        look(&l, 1, 0, 1);
        assert_eq!(admitted_from_memory(&l, &c, 0), 19);
        // What was admitted from memory goes with the next exact check or flush.
        assert_eq!(l.take_unflushed("c"), 19);
        look(&l, 21, 0, 2);
        assert_eq!(admitted_from_memory(&l, &c, 0), 4);
        look(&l, 40, 0, 1);
        assert_eq!(
            admitted_from_memory(&l, &c, 0),
            0,
            "at the limit: ask Redis"
        );
    }

    #[test]
    fn jobs_in_flight_have_their_own_share_and_a_stale_look_admits_nothing() {
        let l = Limiter::new("r".into());
        let c = client(0, 10);
        look(&l, 0, 4, 1);
        assert_eq!(admitted_from_memory(&l, &c, 1), 3);
        look(&l, 0, 0, 1);
        assert_eq!(admitted_from_memory(&l, &c, 2), 2);
        look(&l, 0, 0, 1);
        if let Ok(mut seen) = l.seen.lock() {
            if let Some(s) = seen.get_mut("c") {
                s.at -= FRESH;
            }
        }
        assert!(!l.admit_locally(&c, 1));
    }
}
