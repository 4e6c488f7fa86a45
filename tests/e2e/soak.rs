//! The soak test: every job ends with exactly one true result while things break.
//!
//! N good jobs (text to image, captioning from S3, VQA from a data URI) run on 3 workers with two
//! intra-op threads each, together with fuzzed bad jobs, jobs that fail transiently forever (a
//! real 403: the test key may not read the locked bucket) and jobs published twice at once. Meanwhile
//! a random worker is killed with SIGKILL every 20 s and restarted, the broker is restarted
//! (`rabbitmqctl stop_app`/`start_app`), the test's own Redis (AOF, on a spare port) is restarted,
//! and SeaweedFS is stopped for 15 s.
//!
//! Its last line is `soak: jobs=N lost=0 duplicates=0 mismatched=0 without_result=0
//! dead_lettered=D panics=0`, and any counter but D above 0 fails it. `scripts/soak.sh --jobs N`
//! runs it at full size (2,000 jobs and 1,000 fuzzed ones by default); `scripts/test.sh` runs it
//! at `DDIT_SOAK_JOBS` (default 300) and `DDIT_SOAK_FUZZ` (default 100).
#![allow(clippy::unwrap_used)]

#[path = "soak/chaos.rs"]
mod chaos;
#[path = "soak/jobs.rs"]
mod jobs;
#[path = "soak/tally.rs"]
mod tally;

use std::time::{Duration, Instant};

use ddit_e2e::*;

fn count(name: &str, default: usize) -> usize {
    var(name, &default.to_string()).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak() {
    let n = count("DDIT_SOAK_JOBS", 300);
    let fuzz = count("DDIT_SOAK_FUZZ", 100);
    let mut names = Names::new("soak");
    // Enough attempts that a 15 s outage (plus SeaweedFS's restart) cannot use them all up.
    names.delivery_limit = 7;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let redis = chaos::OwnRedis::start(dir.path());
    let plan = jobs::Plan::build(&names, n, fuzz).await;
    let announced = tally::listen(&redis.url, &names.redis_prefix);
    let fleet = chaos::Fleet::start(&names, &model, dir.path(), &redis.url);
    let killer = fleet.kill_every(Duration::from_secs(20));

    let t0 = Instant::now();
    let pause = Duration::from_secs(((n / 100).max(5)) as u64);
    for (i, chunk) in plan.chunks(10).into_iter().enumerate() {
        publish(&names, &chunk).await;
        match i {
            2 => chaos::restart_broker(),
            4 => redis.restart(Duration::from_secs(3)),
            6 => chaos::s3_outage(Duration::from_secs(15)),
            _ => tokio::time::sleep(pause).await,
        }
    }
    eprintln!(
        "soak: published {} messages in {:?}",
        plan.len(),
        t0.elapsed()
    );
    let limit = Duration::from_secs(600 + n as u64 / 5);
    let done = tally::wait_done(&names, &redis.url, &plan.result_ids(), limit).await;
    killer.stop();
    let logs = fleet.stop();
    assert!(done, "not every job ended within {limit:?}");

    let t = tally::Tally::count(&names, &redis.url, &plan, &announced, &logs).await;
    eprintln!("soak: took {:?}", t0.elapsed());
    eprint!("{}", t.details);
    let line = t.line();
    println!("{line}");
    assert!(t.clean(), "{line}");
    redis.stop();
    cleanup(&names).await;
}
