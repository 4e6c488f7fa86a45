//! `ddit-worker serve` against real RabbitMQ, Redis and S3 (SeaweedFS) on loopback.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use ddit_e2e::*;
use ddit_schemas::{ErrorKind, Status};
use futures_util::StreamExt;
use serde_json::json;
use sha2::Digest;

fn png_bytes() -> Vec<u8> {
    let mut img = image::RgbImage::from_pixel(24, 24, image::Rgb([255, 255, 255]));
    for y in 6..14 {
        for x in 6..14 {
            img.put_pixel(x, y, image::Rgb([220, 40, 40]));
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mixed_jobs_give_fifty_results_with_images_in_s3() {
    let names = Names::new("mixed");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let s3 = s3_client().await;
    let input_key = format!("{}/inputs/red.png", names.s3_prefix);
    s3.put_object()
        .bucket(bucket())
        .key(&input_key)
        .body(png_bytes().into())
        .send()
        .await
        .unwrap();
    let input = format!("s3://{}/{input_key}", bucket());

    // A small pixel limit so that an "oversized" input is cheap to make.
    let mut worker = Worker::start(
        &names,
        &model,
        dir.path(),
        "w1",
        &["--max-image-pixels", "10000"],
    );
    worker.wait_ready(Duration::from_secs(60));

    // Progress events on pub/sub.
    let mut pubsub = results_subscription(&names).await;
    pubsub
        .psubscribe(format!("{}:progress:*", names.redis_prefix))
        .await
        .unwrap();

    let mut bodies = Vec::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("job-{i:02}");
        let job = match i % 3 {
            0 => {
                json!({"job_id": id, "task": "generate", "params": {"prompt": "a red circle", "steps": 4, "seed": i, "num_images": 1 + (i % 2)}})
            }
            1 => {
                json!({"job_id": id, "task": "caption", "params": {"image": input, "steps": 4, "seed": i}})
            }
            _ => {
                json!({"job_id": id, "task": "vqa", "params": {"image": input, "question": "what colour is it?", "steps": 4, "seed": i}})
            }
        };
        bodies.push(serde_json::to_vec(&job).unwrap());
        ids.push(id);
    }
    // Poison messages: not JSON, and a job with an unknown task; a missing input object.
    bodies.push(b"{ this is not json".to_vec());
    bodies.push(
        serde_json::to_vec(&json!({"job_id": "poison-task", "task": "paint", "params": {}}))
            .unwrap(),
    );
    bodies.push(
        serde_json::to_vec(&json!({"job_id": "missing-input", "task": "caption",
            "params": {"image": format!("s3://{}/{}/nope.png", bucket(), names.s3_prefix)}}))
        .unwrap(),
    );
    // An out-of-range parameter, an oversized image, a bucket outside the allowed list.
    bodies.push(serde_json::to_vec(&json!({"job_id": "bad-steps", "task": "generate", "params": {"prompt": "p", "steps": 5000}})).unwrap());
    let big_key = format!("{}/inputs/big.png", names.s3_prefix);
    let mut big = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(200, 200)
        .write_to(&mut big, image::ImageFormat::Png)
        .unwrap();
    s3.put_object()
        .bucket(bucket())
        .key(&big_key)
        .body(big.into_inner().into())
        .send()
        .await
        .unwrap();
    bodies.push(serde_json::to_vec(&json!({"job_id": "too-big", "task": "caption", "params": {"image": format!("s3://{}/{big_key}", bucket())}})).unwrap());
    bodies.push(serde_json::to_vec(&json!({"job_id": "other-bucket", "task": "vqa", "params": {"image": "s3://someone-else/x.png", "question": "q?"}})).unwrap());
    // A duplicate publish of a job: computed once (the metrics below count 17 generate jobs), one result.
    bodies.push(bodies[0].clone());
    publish(&names, &bodies).await;

    let results = wait_results(&names, &ids, Duration::from_secs(240)).await;
    assert_eq!(
        results.len(),
        50,
        "worker log:\n{}",
        std::fs::read_to_string(&worker.log).unwrap_or_default()
    );
    let mut images = 0;
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
        assert_eq!(r.model.name, "tiny-f32");
        if r.task.as_deref() == Some("generate") {
            assert!(!r.outputs.is_empty());
            for o in &r.outputs {
                let key = o.uri.strip_prefix(&format!("s3://{}/", bucket())).unwrap();
                assert!(key.starts_with(&names.s3_prefix), "{key}");
                let obj = s3
                    .get_object()
                    .bucket(bucket())
                    .key(key)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(obj.content_type(), Some("image/png"));
                assert!(obj.metadata().unwrap().contains_key("model-hash"));
                let bytes = obj.body.collect().await.unwrap().into_bytes();
                let sha: String = sha2::Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(sha, o.sha256);
                let img =
                    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
                assert_eq!((img.width(), img.height()), (o.width, o.height));
                images += 1;
            }
        } else {
            assert!(r.text.is_some(), "{}", r.job_id);
        }
    }
    assert_eq!(images, 17 + 8);

    // Poison and bad inputs: failed results, and their messages in the dead-letter queue.
    // Every bad job with an id has its failed result, of the right kind, after one attempt.
    let expected = [
        ("poison-task", ErrorKind::InvalidJob),
        ("missing-input", ErrorKind::InputNotFound),
        ("bad-steps", ErrorKind::InvalidJob),
        ("too-big", ErrorKind::InvalidInput),
        ("other-bucket", ErrorKind::InvalidJob),
    ];
    let bad_ids: Vec<String> = expected.iter().map(|(id, _)| id.to_string()).collect();
    let bad = wait_results(&names, &bad_ids, Duration::from_secs(30)).await;
    assert_eq!(bad.len(), expected.len());
    let by: HashMap<_, _> = bad.iter().map(|r| (r.job_id.clone(), r)).collect();
    for (id, kind) in expected {
        let r = by[id];
        assert_eq!(r.status, Status::Failed, "{id}");
        assert_eq!(r.error.as_ref().unwrap().kind, kind, "{id}: {:?}", r.error);
        assert_eq!(r.attempts, Some(1), "{id}");
    }
    let mut dlq = 0;
    for _ in 0..50 {
        dlq = queue_depth(&names, &names.dlq).await;
        if dlq >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        dlq, 6,
        "not JSON, unknown task, missing input, out of range, too big, other bucket"
    );
    let dead = take_dead_letters(&names).await;
    let (_, reason) = dead
        .iter()
        .find(|(b, _)| b.starts_with(b"{ this is not json"))
        .unwrap();
    assert!(
        reason.as_deref().unwrap_or("").contains("no usable job_id"),
        "{reason:?}"
    );
    assert_eq!(queue_depth(&names, &names.queue).await, 0);

    // One notification per stored result, and progress events were published.
    let mut notified: HashMap<String, u32> = HashMap::new();
    let mut progress = 0;
    let mut stream = pubsub.on_message();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        let payload: String = msg.get_payload().unwrap();
        if msg.get_channel_name().ends_with(":results") {
            *notified.entry(payload).or_default() += 1;
        } else {
            let event: ddit_schemas::Progress = serde_json::from_str(&payload).unwrap();
            assert!(ids.contains(&event.job_id));
            progress += 1;
        }
    }
    drop(stream);
    for id in &ids {
        assert_eq!(notified.get(id), Some(&1), "{id}");
    }
    assert!(progress > 0);

    // HTTP: health, readiness and metrics.
    assert_eq!(http_get(worker.port, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(worker.port, "/readyz").unwrap().0, 200);
    let (code, metrics) = http_get(worker.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    for m in [
        "ddit_jobs_total{task=\"generate\",status=\"succeeded\"} 17",
        "ddit_step_seconds_bucket",
        "ddit_queue_wait_seconds",
        "ddit_batch_size",
        "ddit_jobs_in_flight 0",
        "ddit_execution_provider{provider=\"cpu\"} 1",
    ] {
        assert!(metrics.contains(m), "metrics lack `{m}`:\n{metrics}");
    }

    // SIGTERM: a clean exit.
    worker.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let s = worker.child.wait().unwrap();
        (s, worker)
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit {:?}: {}",
        status.0,
        std::fs::read_to_string(&status.1.log).unwrap_or_default()
    );
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_nothing() {
    let names = Names::new("kill");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let (mut a, mut b) = Worker::start_pair(&names, &model, dir.path());
    let mut pubsub = results_subscription(&names).await;
    let ids: Vec<String> = (0..16).map(|i| format!("long-{i:02}")).collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| serde_json::to_vec(&json!({"job_id": id, "task": "generate", "params": {"prompt": "a blue square", "steps": 150, "seed": i}})).unwrap())
        .collect();
    publish(&names, &bodies).await;
    // Kill A once it is mid-job (it holds unacknowledged deliveries).
    let mut killed = false;
    for _ in 0..200 {
        if let Some((_, m)) = http_get(a.port, "/metrics") {
            if m.lines()
                .any(|l| l.starts_with("ddit_jobs_in_flight ") && !l.ends_with(" 0"))
            {
                a.kill9();
                killed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed, "worker A never had a job in flight");
    let results = wait_results(&names, &ids, Duration::from_secs(300)).await;
    assert_eq!(
        results.len(),
        16,
        "worker B log:\n{}",
        std::fs::read_to_string(&b.log).unwrap_or_default()
    );
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
    }
    // The images the results name hold the bytes they say, killed copies notwithstanding.
    assert_outputs_match(&results).await;
    // Exactly one final result each: one key per job, and nothing left in any queue.
    assert_eq!(result_count(&names).await, 16);
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    assert_eq!(retry_depth(&names).await, 0);
    assert_eq!(queue_depth(&names, &names.dlq).await, 0);
    // B took over A's unacknowledged deliveries.
    let (_, m) = http_get(b.port, "/metrics").unwrap();
    let redelivered: f64 = m
        .lines()
        .find(|l| l.starts_with("ddit_redeliveries_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(redelivered >= 1.0, "no redelivery reached worker B:\n{m}");
    // One stored result (one notification) per job.
    let mut notified: HashMap<String, u32> = HashMap::new();
    let mut stream = pubsub.on_message();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        *notified
            .entry(msg.get_payload::<String>().unwrap())
            .or_default() += 1;
    }
    drop(stream);
    for id in &ids {
        assert_eq!(notified.get(id), Some(&1), "{id}: {notified:?}");
    }
    b.sigterm();
    let _ = tokio::task::spawn_blocking(move || b.child.wait()).await;
    cleanup(&names).await;
}

/// A minimal OTLP/HTTP collector: keeps the body of every POST.
async fn collector() -> (u16, std::sync::Arc<tokio::sync::Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let store = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= pos + 4 + len {
                            store
                                .lock()
                                .await
                                .push(buf[pos + 4..pos + 4 + len].to_vec());
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            buf.clear();
                        }
                    }
                }
            });
        }
    });
    (port, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_continues_the_callers_trace_over_otlp() {
    let names = Names::new("otlp");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let (port, bodies) = collector().await;
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let mut w = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        &["--otlp-endpoint", &endpoint],
    );
    w.wait_ready(Duration::from_secs(60));
    // `publish` sets traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.
    let body = serde_json::to_vec(&json!({"job_id": "traced", "task": "generate", "params": {"prompt": "a red circle", "steps": 2}})).unwrap();
    publish(&names, &[body]).await;
    assert_eq!(
        wait_results(&names, &["traced".to_string()], Duration::from_secs(60))
            .await
            .len(),
        1
    );
    w.sigterm();
    let (status, w) = tokio::task::spawn_blocking(move || (w.child.wait().unwrap(), w))
        .await
        .unwrap();
    assert!(status.success(), "{}", w.log_text());
    let trace_id: Vec<u8> = (0..16)
        .map(|i| {
            u8::from_str_radix(&"4bf92f3577b34da6a3ce929d0e0e4736"[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    let got = bodies.lock().await;
    assert!(
        !got.is_empty(),
        "no OTLP export reached the collector:\n{}",
        w.log_text()
    );
    assert!(
        got.iter()
            .any(|b| b.windows(16).any(|x| x == trace_id.as_slice())),
        "exported spans do not carry the caller's trace id"
    );
    assert!(
        got.iter().any(|b| b.windows(6).any(|x| x == b"traced")),
        "no span carries the job id"
    );
    cleanup(&names).await;
}
