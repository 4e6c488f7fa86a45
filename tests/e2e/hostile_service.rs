//! The service under hostile use (issue 31): nothing confirmed is dropped (an unroutable publish
//! is an error, and a retry copy that no queue took keeps its original), and attempts are
//! counted right (drains that requeue a job that never started cost it nothing; a success whose
//! result could not be stored on its last attempt does not end `failed`).
//! Against the real RabbitMQ (whatever version this machine runs), Redis and S3.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::Status;
use ddit_worker::adapters::amqp;
use ddit_worker::error::WorkerError;
use serde_json::json;

fn job(id: &str, steps: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({"job_id": id, "task": "generate",
        "params": {"prompt": "a red circle", "steps": steps, "seed": 1}}))
    .unwrap()
}

async fn delete_queue(names: &Names, queue: &str) {
    let conn = amqp::connect(&names.amqp(), "e2e-delete").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(queue.into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// A log without its colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out + rest
}

/// Waits until the worker's log holds one of `needles`; returns the log.
async fn wait_log(w: &Worker, needles: &[&str], timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = w.log_text();
        if needles.iter().any(|n| log.contains(n)) || start.elapsed() > timeout {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A publish that no queue receives (its queue was deleted) is an error naming the queue, not a
/// confirmed message that went nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_deleted_queue_is_an_error() {
    let names = Names::new("unroutable");
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-unroutable").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare(&ch, &cfg).await.unwrap();
    amqp::publish_job(&ch, &cfg.queue, &job("kept", 2), None)
        .await
        .unwrap();
    delete_queue(&names, &cfg.queue).await;
    let e = amqp::publish_job(&ch, &cfg.queue, &job("lost", 2), None).await;
    match e {
        Err(e @ WorkerError::Unavailable { .. }) => {
            let shown = e.to_string();
            assert!(shown.contains(&cfg.queue), "{shown}");
        }
        other => panic!("an unroutable publish gave {other:?}"),
    }
    // The channel is still usable: a publish to a queue that exists is confirmed.
    let retry = cfg.retry_queue(1);
    amqp::publish_job(&ch, &retry, &job("kept-2", 2), None)
        .await
        .unwrap();
    assert_eq!(queue_depth(&names, &retry).await, 1);
    let _ = conn.close(200, "done".into()).await;
    cleanup(&names).await;
}

/// A job fails transiently (S3 refuses the worker's key) while its retry queue is gone: the retry
/// copy goes nowhere, so the worker must keep the original (requeue it), never ack it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_copy_that_no_queue_takes_keeps_the_original() {
    let names = Names::new("noretryq");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let wrong = [(
        "AWS_SECRET_ACCESS_KEY",
        "0000000000000000000000000000000000000000000000000000000000000000",
    )];
    let extra = ["--retry-delay-ms", "200"];
    let mut w = Worker::start_with_env(&names, &model, dir.path(), "w", &extra, &wrong);
    let log = wait_log(&w, &["consuming"], Duration::from_secs(60)).await;
    assert!(log.contains("consuming"), "{log}");
    // Published without declaring (support's `publish` would declare the retry queues again).
    let conn = amqp::connect(&names.amqp(), "e2e-orphan").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in names.amqp().retry_queues() {
        delete_queue(&names, &q).await;
    }
    amqp::publish_job(&ch, &names.queue, &job("orphan", 2), None)
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    let sent = "retry scheduled";
    let kept = "cannot schedule a retry";
    let log = wait_log(&w, &[sent, kept], Duration::from_secs(120)).await;
    w.kill9();
    assert!(!log.contains(sent), "a retry copy went nowhere:\n{log}");
    assert!(log.contains(kept), "{log}");
    // The job is still somewhere: in the work queue, or ended with a result.
    let queued = queue_depth(&names, &names.queue).await;
    let results = result_count(&names).await;
    assert!(queued + results as u32 >= 1, "the job was lost:\n{log}");
    cleanup(&names).await;
}

/// A job that a worker holds but never starts is requeued at each graceful shutdown: six drains
/// (as many as its delivery limit allows attempts) must cost it no attempt, whatever the broker's
/// `x-delivery-count` does with requeues. Forty short jobs ahead of it keep the one inference
/// thread busy; the one running at each drain is charged (it ran, and runs out on the seventh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_drains_of_a_job_that_never_started_cost_it_no_attempt() {
    let mut names = Names::new("drains");
    names.delivery_limit = 6;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut bodies: Vec<Vec<u8>> = (0..40).map(|i| job(&format!("b{i:02}"), 250)).collect();
    bodies.push(job("waiter", 2));
    publish(&names, &bodies).await;
    let extra = [
        "--max-batch",
        "1",
        "--prefetch",
        "41",
        "--shutdown-deadline",
        "0",
    ];
    let mut seen = String::new();
    for round in 0..6 {
        let label = format!("w{round}");
        let mut w = Worker::start(&names, &model, dir.path(), &label, &extra);
        // SIGTERM as soon as the waiter is held (the blockers ahead of it running).
        let start = Instant::now();
        let held = |log: String| plain(&log).contains("job_id=waiter");
        while !held(w.log_text()) && start.elapsed() < Duration::from_secs(60) {
            assert!(w.child.try_wait().unwrap().is_none(), "{}", w.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.sigterm();
        let (status, w) = tokio::task::spawn_blocking(move || (w.child.wait().unwrap(), w))
            .await
            .unwrap();
        let log = w.log_text();
        assert!(status.success(), "round {round}: {status:?}\n{log}");
        assert!(
            log.contains("requeued the jobs no inference thread had started"),
            "round {round}:\n{log}"
        );
        let log = plain(&log);
        let waiter = log
            .lines()
            .filter(|l| l.contains("waiter") || l.contains("requeue"));
        seen.extend(waiter.map(|l| format!("round {round}: {l}\n")));
        let early = wait_results(&names, &["waiter".into()], Duration::ZERO).await;
        assert!(early.is_empty(), "round {round}: the waiter ran:\n{log}");
    }
    let mut w = Worker::start(&names, &model, dir.path(), "last", &extra);
    w.wait_ready(Duration::from_secs(60));
    let got = wait_results(&names, &["waiter".into()], Duration::from_secs(120)).await;
    assert_eq!(got.len(), 1, "{}", w.log_text());
    assert_eq!(got[0].status, Status::Succeeded, "{:?}", got[0].error);
    let last = w.log_text();
    assert_eq!(got[0].attempts, Some(1), "{seen}\n{last}");
    drop(w);
    cleanup(&names).await;
}

/// A job whose inference succeeds on its last attempt but whose result cannot be stored (a worker
/// built with the test-only `fault-injection` feature fails the first store of a job whose id
/// contains `ddit-inject-unstored`, as a Redis blip would) runs again and ends `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_store_failure_on_the_last_attempt_does_not_fail_the_job() {
    let mut names = Names::new("unstored");
    names.delivery_limit = 1;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let bin = std::env::var_os("DDIT_FAULT_INJECTION_BIN")
        .map_or_else(fault_injection_bin, std::path::PathBuf::from);
    let extra = ["--retry-delay-ms", "200"];
    let mut w = Worker::start_bin(&bin, &names, &model, dir.path(), "w", &extra, &[]);
    w.wait_ready(Duration::from_secs(60));
    let id = "ddit-inject-unstored-1".to_string();
    publish(&names, &[job(&id, 2)]).await;
    let got = wait_results(&names, std::slice::from_ref(&id), Duration::from_secs(120)).await;
    let log = w.log_text();
    assert_eq!(got.len(), 1, "{log}");
    assert!(log.contains("injected store failure"), "{log}");
    assert_eq!(
        got[0].status,
        Status::Succeeded,
        "{:?}\n{log}",
        got[0].error
    );
    assert_eq!(got[0].attempts, Some(1));
    drop(w);
    cleanup(&names).await;
}

/// `--tls-ca-file` with a plaintext URL is an error at start, naming the flag (not the URL,
/// which may hold a password), for `serve` and `submit` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_with_a_plaintext_url_is_a_startup_error() {
    let names = Names::new("plainca");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let ca = ca.display().to_string();
    let model = dir.path().join("no-model");
    let secret = "pw-4711-never-logged";
    let amqp = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f");
    let extra = ["--tls-ca-file", &ca, "--amqp-url", &amqp];
    let mut w = Worker::start(&names, &model, dir.path(), "w", &extra);
    let status = w.child.wait().unwrap();
    let log = w.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--tls-ca-file") && log.contains("--amqp-url"),
        "{log}"
    );
    assert!(!log.contains(secret), "{log}");
    let out = client_command(&names, "submit")
        .args(["--input", dir.path().to_str().unwrap(), "--out"])
        .arg(dir.path().join("out.jsonl"))
        .args(["--tls-ca-file", &ca])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--tls-ca-file") && err.contains("--amqp-url"),
        "{err}"
    );
    // The gateway too.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice:{}\n", "a".repeat(64))).unwrap();
    let out = std::process::Command::new(worker_bin())
        .args([
            "gateway",
            "--tls-ca-file",
            &ca,
            "--amqp-url",
            &amqp,
            "--tokens-file",
        ])
        .arg(&tokens)
        .envs(service_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--tls-ca-file") && err.contains("--amqp-url") && !err.contains(secret),
        "{err}"
    );
}
