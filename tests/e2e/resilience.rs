//! Failure handling: a broker restart, SIGTERM under load, wrong S3 credentials.
//! These tests share the broker, so they run one at a time (a lock), in their own test binary.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::Status;
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn generate_jobs(prefix: &str, n: usize, steps: u32) -> (Vec<String>, Vec<Vec<u8>>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:02}")).collect();
    let bodies = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::to_vec(&json!({"job_id": id, "task": "generate", "params": {"prompt": "a red circle", "steps": steps, "seed": i}}))
                .unwrap()
        })
        .collect();
    (ids, bodies)
}

fn in_flight(port: u16) -> u64 {
    http_get(port, "/metrics")
        .and_then(|(_, m)| {
            m.lines()
                .find(|l| l.starts_with("ddit_jobs_in_flight "))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_nothing() {
    let _g = SERIAL.lock().await;
    let names = Names::new("restart");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut w = Worker::start(&names, &model, dir.path(), "w", &[]);
    w.wait_ready(Duration::from_secs(60));
    let (ids, bodies) = generate_jobs("rs", 30, 120);
    publish(&names, &bodies).await;
    // Restart the broker once the worker is busy.
    for _ in 0..200 {
        if in_flight(w.port) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let results = wait_results(&names, &ids, Duration::from_secs(300)).await;
    assert_eq!(results.len(), 30, "worker log:\n{}", w.log_text());
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    w.wait_ready(Duration::from_secs(60));
    // One result per job, the bytes they name, and nothing dead-lettered or left waiting.
    assert_eq!(result_count(&names).await, 30);
    assert_outputs_match(&results).await;
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    assert_eq!(retry_depth(&names).await, 0);
    assert_eq!(queue_depth(&names, &names.dlq).await, 0);
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_within_the_deadline_and_loses_nothing() {
    let _g = SERIAL.lock().await;
    let names = Names::new("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut w = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        // Jobs long enough to be running at SIGTERM: above the default --max-steps.
        &["--shutdown-deadline", "2", "--max-steps", "1000"],
    );
    w.wait_ready(Duration::from_secs(60));
    let (ids, bodies) = generate_jobs("st", 12, 600);
    publish(&names, &bodies).await;
    for _ in 0..400 {
        if in_flight(w.port) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(in_flight(w.port) > 0);
    let t0 = Instant::now();
    w.sigterm();
    let (status, w) = tokio::task::spawn_blocking(move || (w.child.wait().unwrap(), w))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(status.success(), "exit {status:?}:\n{}", w.log_text());
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with a 2 s deadline"
    );
    assert!(w.log_text().contains("shutting down"), "{}", w.log_text());
    // Whatever was not finished was requeued: a second worker completes every job.
    let mut w2 = Worker::start(&names, &model, dir.path(), "w2", &["--max-steps", "1000"]);
    w2.wait_ready(Duration::from_secs(60));
    let results = wait_results(&names, &ids, Duration::from_secs(300)).await;
    assert_eq!(results.len(), 12, "worker 2 log:\n{}", w2.log_text());
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    cleanup(&names).await;
}

/// Jobs delivered to a worker but not yet started by its inference thread go back to the queue
/// at SIGTERM; only the running one finishes (the deadline is long, so waiting would finish all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_requeues_at_once_the_jobs_that_had_not_started() {
    let _g = SERIAL.lock().await;
    let names = Names::new("drain");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let args = [
        "--max-batch",
        "1",
        "--prefetch",
        "4",
        "--shutdown-deadline",
        "120",
        "--max-steps",
        "1000",
    ];
    let mut w = Worker::start(&names, &model, dir.path(), "w", &args);
    w.wait_ready(Duration::from_secs(60));
    let (ids, bodies) = generate_jobs("dr", 4, 600);
    publish(&names, &bodies).await;
    for _ in 0..400 {
        if in_flight(w.port) >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(in_flight(w.port), 4);
    w.sigterm();
    let (status, w) = tokio::task::spawn_blocking(move || (w.child.wait().unwrap(), w))
        .await
        .unwrap();
    assert!(status.success(), "exit {status:?}:\n{}", w.log_text());
    let done = wait_results(&names, &ids, Duration::from_secs(1))
        .await
        .len();
    let requeued = queue_depth(&names, &names.queue).await;
    // One job ran when SIGTERM came (two if it landed as the first finished); the rest were
    // never started and are back in the queue, none lost.
    assert!(
        (1..=2).contains(&done),
        "{done} finished:\n{}",
        w.log_text()
    );
    assert_eq!(
        done + requeued as usize,
        4,
        "{done} finished, {requeued} requeued"
    );
    assert!(
        w.log_text()
            .contains("requeued the jobs no inference thread had started"),
        "{}",
        w.log_text()
    );
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_s3_credentials_make_readyz_fail_with_a_reason() {
    let _g = SERIAL.lock().await;
    let names = Names::new("creds");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut w = Worker::start_with_env(
        &names,
        &model,
        dir.path(),
        "w",
        &[],
        &[(
            "AWS_SECRET_ACCESS_KEY",
            "0000000000000000000000000000000000000000000000000000000000000000",
        )],
    );
    let mut code = 0;
    for _ in 0..200 {
        if let Some(status) = w.child.try_wait().unwrap() {
            panic!(
                "worker exited ({status}) instead of staying unready:\n{}",
                w.log_text()
            );
        }
        if let Some((c, body)) = http_get(w.port, "/readyz") {
            code = c;
            if c == 503 && body.contains("s3") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, 503);
    assert_eq!(http_get(w.port, "/healthz").unwrap().0, 200);
    let log = w.log_text();
    assert!(
        log.contains("not ready") && log.to_lowercase().contains("s3"),
        "{log}"
    );
    assert!(
        log.contains("403")
            || log.contains("Forbidden")
            || log.contains("AccessDenied")
            || log.contains("signature"),
        "{log}"
    );
    cleanup(&names).await;
}
