//! The soak test: every job ends with exactly one true result while things break.
//!
//! N good jobs (text to image, captioning from S3, VQA from a data URI) run on 3 workers with two
//! intra-op threads each, together with fuzzed bad jobs, hostile ones (decompression bombs,
//! parameters over the caps, JSON nested past any parser's depth), jobs that fail transiently
//! forever (a real 403: the test key may not read the locked bucket) and jobs published twice at
//! once. With chaos on (the default), a random worker is killed with SIGKILL every 20 s and
//! replaced, the broker is restarted (`rabbitmqctl stop_app`/`start_app`), the test's own Redis
//! (the deploy manifests' persistence, on a spare port) is shut down with `SHUTDOWN` and started
//! again, S3 is unreachable for 30 s (the workers reach it through a relay the test shuts), and
//! a worker under load gets SIGTERM and drains.
//!
//! The tally runs whether or not every job ended, judges the published plan against what the
//! services hold, and prints one line, `soak: jobs=N lost=0 duplicates=0 ran_twice=R mismatched=0
//! without_result=0 empty_success=0 good_dead_lettered=0 dead_lettered=D panics=0`; any counter
//! but R and D above 0, or a job that never ended, fails it. `scripts/soak.sh --jobs N --chaos`
//! runs it at full size; `cargo test` (so `scripts/test.sh`) at `DDIT_SOAK_JOBS` (default 200),
//! `DDIT_SOAK_FUZZ` (default 50) and `DDIT_SOAK_CHAOS` (default 1), which is every fault once at
//! least. Details: `docs/soak.md`.
#![allow(clippy::unwrap_used)]

#[path = "soak/chaos.rs"]
mod chaos;
#[path = "soak/gate.rs"]
mod gate;
#[path = "soak/hostile.rs"]
mod hostile;
#[path = "soak/jobs.rs"]
mod jobs;
#[path = "soak/observe.rs"]
mod observe;
#[path = "soak/tally.rs"]
mod tally;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddit_e2e::*;

fn count(name: &str, default: usize) -> usize {
    var(name, &default.to_string()).parse().unwrap()
}

/// What the chaos left running in the background: the S3 outage and the drained worker.
#[derive(Default)]
struct Background {
    outage: Option<JoinHandle<()>>,
    drained: Option<JoinHandle<String>>,
}

impl Background {
    fn join(self) {
        if let Some(h) = self.outage {
            h.join().unwrap();
        }
        if let Some(h) = self.drained {
            eprintln!("soak: {}", h.join().unwrap());
        }
    }
}

/// Publishes the plan in 10 chunks, `pause` apart, with one fault after each of the first ones
/// (the SIGKILLs run on their own meanwhile).
async fn publish_through_chaos(
    names: &Names,
    plan: &jobs::Plan,
    faults: Option<(&chaos::OwnRedis, &chaos::Fleet, &gate::Gate)>,
    pause: Duration,
) -> Background {
    let mut bg = Background::default();
    for (i, chunk) in plan.chunks(10).into_iter().enumerate() {
        publish(names, &chunk).await;
        match (i, faults) {
            (0, Some(_)) => chaos::restart_broker(),
            (1, Some((_, _, s3))) => bg.outage = Some(s3.outage(Duration::from_secs(30))),
            (3, Some((redis, ..))) => redis.restart(Duration::from_secs(3)),
            (5, Some((_, fleet, _))) => bg.drained = Some(fleet.sigterm_one()),
            _ => {}
        }
        tokio::time::sleep(pause).await;
    }
    bg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak() {
    let n = count("DDIT_SOAK_JOBS", 200);
    let fuzz = count("DDIT_SOAK_FUZZ", 50);
    let chaos_on = count("DDIT_SOAK_CHAOS", 1) == 1;
    let mut names = Names::new("soak");
    // Enough attempts that the 30 s outage (plus SeaweedFS's restart) and a SIGKILL or two
    // cannot use them all up: the 7th comes at least 61 s after the first.
    names.delivery_limit = 7;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let redis = chaos::OwnRedis::start(dir.path());
    let plan = jobs::Plan::build(&names, n, fuzz).await;
    let heard = observe::listen(&redis.url, &names.redis_prefix);
    let s3 = gate::Gate::start();
    let fleet = chaos::Fleet::start(&names, &model, dir.path(), &redis.url, &s3.endpoint);
    let killer = chaos_on.then(|| fleet.kill_every(Duration::from_secs(20)));

    let t0 = Instant::now();
    let pause = Duration::from_secs((n / 100).max(3) as u64);
    let faults = chaos_on.then_some((&redis, &fleet, &s3));
    let bg = publish_through_chaos(&names, &plan, faults, pause).await;
    eprintln!(
        "soak: published {} messages in {:?}",
        plan.len(),
        t0.elapsed()
    );
    let limit = Duration::from_secs(600 + n as u64 / 5);
    let done = observe::wait_done(&names, &redis.url, &plan.result_ids(), limit).await;
    if let Some(k) = killer {
        k.stop();
    }
    bg.join();
    let logs = fleet.stop();

    let at = (redis.url.as_str(), model.as_path(), dir.path());
    let seen = observe::gather(&names, at, &plan, &heard, &logs).await;
    let t = tally::Tally::judge(&plan, names.delivery_limit, &seen);
    eprintln!("soak: took {:?}", t0.elapsed());
    eprint!("{}", t.details);
    let line = t.line();
    println!("{line}");
    redis.stop();
    cleanup(&names).await;
    if !(done && t.clean()) {
        // The workers' logs, for whoever reads the failure.
        eprintln!("soak: logs kept in {}", dir.keep().display());
    }
    assert!(done, "not every job ended within {limit:?}: {line}");
    assert!(t.clean(), "{line}");
}
