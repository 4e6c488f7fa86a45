//! A job's cost is bounded: the worker's caps on pixels, images, steps and text fail a job over
//! them once, naming the field; the job timeout counts from the delivery, so time waiting in the
//! prefetch buffer counts; an out-of-memory error fails the job once as too large.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use base64::Engine as _;
use ddit_e2e::*;
use ddit_schemas::{ErrorKind, JobResult, Status};
use serde_json::json;

fn data_uri() -> String {
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 30, 30]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
    format!("data:image/png;base64,{b64}")
}

/// A final failure on the first attempt: `invalid_job`, not retryable, the message containing
/// each of `words`.
fn assert_failed_once(r: &JobResult, words: &[&str], log: &str) {
    assert_eq!(r.status, Status::Failed, "{}: {:?}", r.job_id, r.error);
    assert_eq!(r.attempts, Some(1), "{}: retried\n{log}", r.job_id);
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidJob, "{}: {}", r.job_id, e.message);
    assert!(!e.retryable, "{}", r.job_id);
    for w in words {
        assert!(e.message.contains(w), "{}: {}", r.job_id, e.message);
    }
}

/// Dead letters until `n` arrived (or 10 s passed).
async fn dead_letters(names: &Names, n: usize) -> Vec<Vec<u8>> {
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead.extend(take_dead_letters(names).await.into_iter().map(|(b, _)| b));
        if dead.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    dead
}

/// A worker with small caps: a job over each one fails at once with a result naming the field
/// and the cap, counted as one attempt, and its message is dead-lettered (as every failed job's
/// is); a job within the caps still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_each_cap_fails_once_naming_the_field() {
    let names = Names::new("caps");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let caps = [
        ("--max-pixels", "256"),
        ("--max-images-per-job", "2"),
        ("--max-steps", "20"),
        ("--max-text-tokens", "12"),
        ("--max-text-chars", "40"),
    ];
    let extra: Vec<&str> = caps.iter().flat_map(|(f, v)| [*f, *v]).collect();
    let mut w = Worker::start(&names, &model, dir.path(), "w", &extra);
    w.wait_ready(Duration::from_secs(60));
    let gen = |id: &str, params: serde_json::Value| {
        let mut p = json!({"prompt": "a red circle", "steps": 4, "seed": 1});
        p.as_object_mut()
            .unwrap()
            .extend(params.as_object().unwrap().clone());
        json!({"job_id": id, "task": "generate", "params": p})
    };
    let cases = [
        (
            gen("pixels", json!({"width": 32, "height": 16})),
            vec![
                "params.width × params.height",
                "512 pixels",
                "256 (--max-pixels)",
            ],
        ),
        (
            gen("images", json!({"num_images": 3})),
            vec!["params.num_images", "at most 2 (--max-images-per-job)"],
        ),
        (
            gen("steps", json!({"steps": 21})),
            vec!["params.steps", "at most 20 (--max-steps)"],
        ),
        (
            json!({"job_id": "canvas", "task": "caption",
                   "params": {"image": data_uri(), "length": 16, "steps": 4}}),
            vec!["params.length", "at most 12 (--max-text-tokens)"],
        ),
        (
            gen(
                "chars",
                json!({"prompt": "a red circle left of a blue square, small"}),
            ),
            vec!["params.prompt", "at most 40 (--max-text-chars)"],
        ),
    ];
    let mut bodies: Vec<Vec<u8>> = cases
        .iter()
        .map(|(j, _)| serde_json::to_vec(j).unwrap())
        .collect();
    let within = gen(
        "within",
        json!({"width": 16, "height": 16, "num_images": 2, "steps": 20}),
    );
    bodies.push(serde_json::to_vec(&within).unwrap());
    publish(&names, &bodies).await;
    let ids: Vec<String> = ["pixels", "images", "steps", "canvas", "chars", "within"]
        .map(String::from)
        .into();
    let got = wait_results(&names, &ids, Duration::from_secs(120)).await;
    let log = w.log_text();
    assert_eq!(got.len(), ids.len(), "{log}");
    for (job, words) in &cases {
        let id = job["job_id"].as_str().unwrap();
        let r = got.iter().find(|r| r.job_id == id).unwrap();
        let mut words = words.clone();
        words.push("this worker allows");
        assert_failed_once(r, &words, &log);
    }
    let ok = got.iter().find(|r| r.job_id == "within").unwrap();
    assert_eq!(ok.status, Status::Succeeded, "{:?}", ok.error);
    assert_eq!(ok.outputs.len(), 2);
    assert!(!log.contains("retry scheduled"), "{log}");
    let dead = dead_letters(&names, cases.len()).await;
    assert_eq!(dead.len(), cases.len(), "dead letters");
    for body in &bodies[..cases.len()] {
        assert!(
            dead.contains(body),
            "not dead-lettered: {}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    assert_eq!(retry_depth(&names).await, 0);
    drop(w);
    cleanup(&names).await;
}

/// One runner of one row with a 1 s job timeout: six long jobs (about 0.6 s each here) hold it,
/// and the short job delivered with them, waiting in the prefetch buffer all that time, ends
/// `expired` without starting: the timeout counts from the delivery, not from when the runner
/// takes the job (which gave it a fresh second and let it succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_in_the_prefetch_buffer_counts_toward_the_job_timeout() {
    let names = Names::new("buffered");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let extra = [
        "--job-timeout",
        "1",
        "--max-batch",
        "1",
        "--inference-threads",
        "1",
        "--prefetch",
        "8",
        "--batch-window-ms",
        "0",
    ];
    let mut w = Worker::start(&names, &model, dir.path(), "w", &extra);
    w.wait_ready(Duration::from_secs(60));
    // Within the default caps: 250 steps × 4 images of two rows, one row per pass.
    let long = |i: usize| {
        json!({"job_id": format!("long-{i}"), "task": "generate", "params": {
            "prompt": "a red circle", "steps": 250, "num_images": 4, "width": 32, "height": 32,
            "seed": i}})
    };
    let short = json!({"job_id": "short", "task": "generate",
        "params": {"prompt": "a blue square", "steps": 2, "seed": 2}});
    let mut bodies: Vec<Vec<u8>> = (0..6)
        .map(|i| serde_json::to_vec(&long(i)).unwrap())
        .collect();
    bodies.push(serde_json::to_vec(&short).unwrap());
    publish(&names, &bodies).await;
    let mut ids: Vec<String> = (0..6).map(|i| format!("long-{i}")).collect();
    ids.push("short".into());
    let got = wait_results(&names, &ids, Duration::from_secs(120)).await;
    let log = w.log_text();
    assert_eq!(got.len(), ids.len(), "{log}");
    // Which jobs expire depends on how the runner interleaves them; what must hold for every
    // job: none succeeds past its timeout counted from the delivery (a step's check granularity
    // aside), and an expired one says so, once, not retryable.
    for r in &got {
        match r.status {
            Status::Succeeded => {
                let m = r.metrics.as_ref().unwrap();
                let since_delivery = m.queue_ms + m.run_ms;
                assert!(
                    since_delivery <= 1250,
                    "{} succeeded {since_delivery} ms after its delivery (timeout 1 s)\n{log}",
                    r.job_id
                );
            }
            Status::Expired => {
                let e = r.error.as_ref().unwrap();
                assert!(!e.retryable);
                assert_eq!(r.attempts, Some(1));
                assert!(e.message.contains("after the delivery"), "{}", e.message);
            }
            other => panic!("{}: {other:?} {:?}\n{log}", r.job_id, r.error),
        }
    }
    assert!(got.iter().any(|r| r.status == Status::Expired), "{log}");
    // Expired jobs are acknowledged, not dead-lettered, and nothing is left.
    assert!(take_dead_letters(&names).await.is_empty());
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    assert_eq!(retry_depth(&names).await, 0);
    drop(w);
    cleanup(&names).await;
}

/// An allocation that fails in a job's step (injected by the test-only `fault-injection` build
/// for a job whose id contains `ddit-inject-oom`) fails that job once as too large for this
/// worker, and its batch mate succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_job_fails_once_as_too_large() {
    let mut names = Names::new("oom");
    names.delivery_limit = 3;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let ids = ["oom-mate", "ddit-inject-oom"];
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            serde_json::to_vec(&json!({"job_id": id, "task": "generate",
                "params": {"prompt": "a red circle", "steps": 8, "seed": 1}}))
            .unwrap()
        })
        .collect();
    let mut w = Worker::start_bin(
        &fault_injection_bin(),
        &names,
        &model,
        dir.path(),
        "w",
        &["--retry-delay-ms", "200"],
        &[],
    );
    w.wait_ready(Duration::from_secs(60));
    publish(&names, &bodies).await;
    let ids: Vec<String> = ids.map(String::from).into();
    let got = wait_results(&names, &ids, Duration::from_secs(60)).await;
    let log = w.log_text();
    assert_eq!(got.len(), 2, "{log}");
    let oom = got.iter().find(|r| r.job_id == "ddit-inject-oom").unwrap();
    assert_failed_once(oom, &["too large for this worker", "out of memory"], &log);
    let mate = got.iter().find(|r| r.job_id == "oom-mate").unwrap();
    assert_eq!(mate.status, Status::Succeeded, "{:?}", mate.error);
    assert!(!log.contains("retry scheduled"), "{log}");
    let dead = dead_letters(&names, 1).await;
    assert_eq!(dead, vec![bodies[1].clone()]);
    drop(w);
    cleanup(&names).await;
}
