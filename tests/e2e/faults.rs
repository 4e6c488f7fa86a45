//! Every job ends with exactly one true result: attempts that end, dead letters without a usable
//! id, two copies of one job at once on two workers, and a panic in one job's step.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::{ErrorKind, Status};
use serde_json::json;

async fn upload_input(names: &Names) -> String {
    let key = format!("{}/inputs/red.png", names.s3_prefix);
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    s3_client()
        .await
        .put_object()
        .bucket(bucket())
        .key(&key)
        .body(png.into_inner().into())
        .send()
        .await
        .unwrap();
    format!("s3://{}/{key}", bucket())
}

/// A worker whose S3 secret is wrong (an expired credential): every input read is a 403, a
/// transient failure. The job is tried `--delivery-limit` times with delays, then ends `failed`
/// with the cause and the attempt count, and its message is dead-lettered. A message without a
/// usable id is dead-lettered with a reason and no result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_transiently_forever_ends_failed_within_its_attempts() {
    let mut names = Names::new("attempts");
    names.delivery_limit = 3;
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let input = upload_input(&names).await;
    let bad_secret = "0".repeat(64);
    let w = Worker::start_with_env(
        &names,
        &model,
        dir.path(),
        "w",
        &["--retry-delay-ms", "300"],
        &[("AWS_SECRET_ACCESS_KEY", bad_secret.as_str())],
    );
    let job =
        json!({"job_id": "forever", "task": "caption", "params": {"image": input, "steps": 4}});
    let bodies = vec![
        serde_json::to_vec(&job).unwrap(),
        b"{ not json at all".to_vec(),
        serde_json::to_vec(&json!({"job_id": "bad id with spaces", "task": "caption"})).unwrap(),
    ];
    let t0 = Instant::now();
    publish(&names, &bodies).await;
    let got = wait_results(&names, &["forever".into()], Duration::from_secs(120)).await;
    assert_eq!(got.len(), 1, "no final result:\n{}", w.log_text());
    let r = &got[0];
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts, Some(3));
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.message);
    assert!(
        e.message.contains("403") || e.message.contains("Signature"),
        "{}",
        e.message
    );
    // Two delays of at least 150 ms and 300 ms (jittered 300 ms, then 600 ms) passed.
    assert!(t0.elapsed() >= Duration::from_millis(450));
    let log = w.log_text();
    assert_eq!(log.matches("retry scheduled").count(), 2, "{log}");

    let mut dead = Vec::new();
    for _ in 0..50 {
        dead.extend(take_dead_letters(&names).await);
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dead.len(), 3, "{dead:?}");
    let forever = dead.iter().filter(|(b, _)| b == &bodies[0]).count();
    assert_eq!(forever, 1, "the failed job's message is dead-lettered once");
    for body in &bodies[1..] {
        let (_, reason) = dead.iter().find(|(b, _)| b == body).unwrap();
        assert!(
            reason.as_deref().unwrap_or("").contains("no usable job_id"),
            "{reason:?}"
        );
    }
    let mut redis = redis().await;
    let keys: Vec<String> =
        redis::AsyncCommands::keys(&mut redis, format!("{}:result:*", names.redis_prefix))
            .await
            .unwrap();
    assert_eq!(
        keys.len(),
        1,
        "only the job with an id has a result: {keys:?}"
    );
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    assert_eq!(retry_depth(&names).await, 0);
    drop(w);
    cleanup(&names).await;
}

/// The same job published twice at once to two workers with two intra-op threads each (whose
/// outputs need not be bit-identical): the stored result names objects whose bytes match it,
/// and no other image of that job is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_job_at_once_leave_only_the_winners_images() {
    let names = Names::new("twice");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let extra = ["--prefetch", "1", "--intra-threads", "2"];
    let mut a = Worker::start(&names, &model, dir.path(), "a", &extra);
    let mut b = Worker::start(&names, &model, dir.path(), "b", &extra);
    a.wait_ready(Duration::from_secs(60));
    b.wait_ready(Duration::from_secs(60));
    let job = json!({"job_id": "twice", "task": "generate",
        "params": {"prompt": "a red circle", "steps": 100, "num_images": 2, "seed": 1}});
    let body = serde_json::to_vec(&job).unwrap();
    publish(&names, &[body.clone(), body]).await;
    let got = wait_results(&names, &["twice".into()], Duration::from_secs(120)).await;
    assert_eq!(got.len(), 1, "{}\n{}", a.log_text(), b.log_text());
    let r = &got[0];
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.outputs.len(), 2);
    // Both deliveries settled: the queue is empty and nothing is unacked.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let settled = [&a, &b].iter().all(|w| {
            http_get(w.port, "/metrics")
                .is_some_and(|(_, m)| m.lines().any(|l| l == "ddit_jobs_in_flight 0"))
        });
        if settled && queue_depth(&names, &names.queue).await == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries not settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s3 = s3_client().await;
    let prefix = format!("{}/twice/", names.s3_prefix);
    let listed = s3
        .list_objects_v2()
        .bucket(bucket())
        .prefix(&prefix)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    keys.sort();
    let mut named: Vec<String> = r.outputs.iter().map(|o| s3_key(&o.uri).into()).collect();
    named.sort();
    assert_eq!(keys, named, "images the result does not name are left");
    assert_outputs_match(std::slice::from_ref(r)).await;
    // Both copies ran (each worker holds one delivery at a time).
    for w in [&a, &b] {
        assert!(w.log_text().contains("accepted"), "{}", w.log_text());
    }
    let losers = (a.log_text() + &b.log_text())
        .matches("removed the losing copy's images")
        .count();
    eprintln!("losing copies that removed images: {losers}");
    drop((a, b));
    cleanup(&names).await;
}

/// A panic injected in one job's step (a worker built with the test-only `fault-injection`
/// feature panics in any step whose batch holds a job whose id contains `ddit-inject-panic`):
/// the batch is retried row by row, that job alone fails, its batch mates succeed, and the worker
/// stays healthy and serves the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_jobs_step_fails_that_job_alone() {
    let names = Names::new("panic");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let bin = fault_injection_bin();
    let extra = ["--prefetch", "4", "--max-batch", "4"];
    // Queued before the worker starts, and mates long enough that the poisoned job joins them
    // however the deliveries trickle in (a mate that ends before it arrives shares nothing).
    let ids = ["mate-1", "ddit-inject-panic", "mate-2", "mate-3"];
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let steps = if id.starts_with("mate") { 60 } else { 8 };
            serde_json::to_vec(&json!({"job_id": id, "task": "generate",
                "params": {"prompt": "a red circle", "steps": steps, "seed": 1}}))
            .unwrap()
        })
        .collect();
    publish(&names, &bodies).await;
    let mut w = Worker::start_bin(&bin, &names, &model, dir.path(), "w", &extra, &[]);
    w.wait_ready(Duration::from_secs(60));
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    let got = wait_results(&names, &ids, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 4, "{}", w.log_text());
    for r in &got {
        if r.job_id == "ddit-inject-panic" {
            assert_eq!(r.status, Status::Failed);
            let e = r.error.as_ref().unwrap();
            assert!(e.message.contains("injected panic"), "{}", e.message);
        } else {
            assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
        }
    }
    let log = w.log_text();
    assert!(
        log.contains("batched step failed, retrying rows alone"),
        "the poisoned job never shared a batch:\n{log}"
    );
    assert_eq!(http_get(w.port, "/healthz").map(|(c, _)| c), Some(200));
    let next = json!({"job_id": "after", "task": "generate",
        "params": {"prompt": "a blue square", "steps": 4, "seed": 2}});
    publish(&names, &[serde_json::to_vec(&next).unwrap()]).await;
    let got = wait_results(&names, &["after".into()], Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1, "{}", w.log_text());
    assert_eq!(got[0].status, Status::Succeeded);
    assert!(w.child.try_wait().unwrap().is_none(), "the worker exited");
    drop(w);
    cleanup(&names).await;
}
