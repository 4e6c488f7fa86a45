//! The circuit breaker against real RabbitMQ, Redis and SeaweedFS: a worker whose device fails
//! stops consuming, fails its probes and gives back the jobs in hand without charging them; a
//! healthy worker finishes every job, each with exactly one result.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::Status;
use serde_json::json;

/// A worker built with the test-only `fault-injection` feature loses its device at the first pass
/// holding `ddit-inject-device` (that pass and every later one fail as CUDA's illegal address
/// does). With `--max-batch 2`, one inference thread and `--breaker-threshold 1`, the first batch
/// (that job and `held-1`) fails and the breaker opens: both rows of that pass are charged (a job
/// that breaks devices must run out of attempts, not go back free to break the next worker), and
/// the other five jobs (prefetched or queued in the process) go back uncharged. The healthy
/// worker (the plain build) finishes all seven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_opens_the_breaker_and_a_healthy_worker_finishes_every_job() {
    let names = Names::new("breaker");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let ids: Vec<String> = std::iter::once("ddit-inject-device".to_string())
        .chain((1..=6).map(|i| format!("held-{i}")))
        .collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            serde_json::to_vec(&json!({"job_id": id, "task": "generate",
                "params": {"prompt": "a red circle", "steps": 6, "seed": 1}}))
            .unwrap()
        })
        .collect();
    // Queued before the worker starts: it prefetches them in this order.
    publish(&names, &bodies).await;
    let extra = [
        "--prefetch",
        "8",
        "--max-batch",
        "2",
        // The first pass waits for its second row (it arrives in milliseconds).
        "--batch-window-ms",
        "5000",
        "--threads",
        "1",
        "--breaker-threshold",
        "1",
        "--retry-delay-ms",
        "300",
    ];
    let a = Worker::start_bin(
        &fault_injection_bin(),
        &names,
        &model,
        dir.path(),
        "a",
        &extra,
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let health = http_get(a.port, "/healthz");
        if health.as_ref().is_some_and(|(c, _)| *c == 503) {
            let body = health.unwrap().1;
            assert!(body.contains("circuit breaker open"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never opened:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = http_get(a.port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("illegal memory access"), "{body}");
    // Everything it held goes back; then it holds nothing and consumes nothing.
    loop {
        let metrics = http_get(a.port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        let settled = metrics.lines().any(|l| l == "ddit_jobs_in_flight 0");
        if settled && queue_consumers(&names, &names.queue).await == 0 {
            assert!(
                metrics.lines().any(|l| l == "ddit_breaker_open 1"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs not given back:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        result_count(&names).await,
        0,
        "no result, failed or not, here"
    );
    let log = a.log_text();
    assert!(
        log.contains("batched step failed, retrying rows alone"),
        "{log}"
    );
    // `held-1` was on the failing pass: charged, not given back.
    assert!(
        !log.lines()
            .any(|l| l.contains("given back unfinished") && l.contains("held-1")),
        "{log}"
    );

    let mut b = Worker::start(&names, &model, dir.path(), "b", &["--max-batch", "4"]);
    b.wait_ready(Duration::from_secs(60));
    let got = wait_results(&names, &ids, Duration::from_secs(120)).await;
    assert_eq!(got.len(), ids.len(), "{}\n{}", a.log_text(), b.log_text());
    for r in &got {
        assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
        // The two jobs of the failing pass ran twice; the rest are charged once, here.
        let want = if ["ddit-inject-device", "held-1"].contains(&r.job_id.as_str()) {
            2
        } else {
            1
        };
        assert_eq!(r.attempts, Some(want), "{}", r.job_id);
    }
    assert_outputs_match(&got).await;
    assert_eq!(result_count(&names).await, ids.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue_depth(&names, &names.queue).await + retry_depth(&names).await > 0 {
        assert!(Instant::now() < deadline, "messages left behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still up, still refusing: a restart, not the worker, closes the breaker.
    let mut a = a;
    assert!(a.child.try_wait().unwrap().is_none(), "{}", a.log_text());
    assert_eq!(http_get(a.port, "/healthz").map(|(c, _)| c), Some(503));
    drop((a, b));
    cleanup(&names).await;
}
