//! Every job ends with exactly one true result: attempts that end, dead letters without a usable
//! id, two copies of one job at once on two workers, and a panic in one job's step. A stalled S3
//! holds up only the job whose input it is reading.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// A TCP relay to the loopback S3 whose answers can be held back: while `stalled`, nothing the
/// server sends reaches the worker (a stalled object store; requests still go through).
struct StallingRelay {
    endpoint: String,
    stalled: Arc<AtomicBool>,
}

impl StallingRelay {
    fn start() -> Self {
        let upstream = var("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900");
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let flag = flag.clone();
                std::thread::spawn(move || answer(server, client, &flag));
            }
        });
        Self { endpoint, stalled }
    }
}

/// Copies the server's answers to the client, holding each chunk while `stalled` is set.
fn answer(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// One inference thread; a caption job whose input read stalls (S3 answers nothing), then a
/// generate job. The generate job takes every step while the read waits, and once S3 answers the
/// caption succeeds at its first attempt. (When the read blocked the inference thread, the
/// generate job did not step until the read gave up at the S3 client's 30 s timeout, and the
/// caption was retried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_input_read_holds_up_only_its_own_job() {
    use redis::AsyncCommands;
    let names = Names::new("stalled");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let input = upload_input(&names).await;
    let relay = StallingRelay::start();
    let flags = [
        "--s3-endpoint",
        relay.endpoint.as_str(),
        "--inference-threads",
        "1",
        "--progress-interval-ms",
        "0",
    ];
    let mut w = Worker::start(&names, &model, dir.path(), "w", &flags);
    w.wait_ready(Duration::from_secs(60));
    relay.stalled.store(true, Ordering::SeqCst);
    let jobs = [
        json!({"job_id": "cap", "task": "caption", "params": {"image": input, "steps": 4}}),
        json!({"job_id": "gen", "task": "generate", "params": {"prompt": "a red circle", "steps": 8}}),
    ];
    let bodies: Vec<Vec<u8>> = jobs
        .iter()
        .map(|j| serde_json::to_vec(j).unwrap())
        .collect();
    publish(&names, &bodies).await;
    // gen's last step is reported while S3 still answers nothing.
    let mut redis = redis().await;
    let key = format!("{}:step:gen", names.redis_prefix);
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(25) {
        let v: Option<String> = redis.get(&key).await.unwrap();
        let p = v.map(|v| serde_json::from_str::<serde_json::Value>(&v).unwrap());
        if let Some(p) =
            p.filter(|p| p["step"].as_u64().unwrap() + 1 >= p["total"].as_u64().unwrap())
        {
            last = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stalled.store(false, Ordering::SeqCst);
    assert!(
        last.is_some(),
        "gen did not step while the caption's input read stalled:\n{}",
        w.log_text()
    );
    let got = wait_results(
        &names,
        &["cap".into(), "gen".into()],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(got.len(), 2, "{}", w.log_text());
    for r in &got {
        assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
        assert_eq!(r.attempts, Some(1), "{}", r.job_id);
    }
    drop(w);
    cleanup(&names).await;
}
