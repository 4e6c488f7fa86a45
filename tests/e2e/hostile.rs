//! The gateway played by a hostile client, against real RabbitMQ, Redis and SeaweedFS, two or
//! four gateway replicas and a real worker: ids chosen to reach other jobs, bursts against the
//! limits, many event streams, half-broken batches, slow headers and the ops endpoints.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ddit_e2e::gateway::{curl, token_line, Gateway, Http};
use ddit_e2e::*;
use serde_json::{json, Value};

const ALICE: &str = "Authorization: Bearer alice-token";
const BOB: &str = "Authorization: Bearer bob-token";

fn post(gw: &Gateway, path: &str, auth: &str, body: &str) -> Http {
    curl(&[
        "-X",
        "POST",
        "-H",
        auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &gw.url(path),
    ])
}

fn get(gw: &Gateway, path: &str, auth: &str) -> Http {
    curl(&["-H", auth, &gw.url(path)])
}

/// The same request from `n` threads at once, round robin over `gws`: the status codes.
fn burst(gws: &[&Gateway], n: usize, request: impl Fn(&Gateway) -> Http + Sync) -> Vec<u16> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let gw = gws[i % gws.len()];
                let request = &request;
                s.spawn(move || request(gw).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn count(codes: &[u16], code: u16) -> usize {
    codes.iter().filter(|&&c| c == code).count()
}

fn wait_final(gw: &Gateway, id: &str, auth: &str) -> Value {
    let start = Instant::now();
    loop {
        let st = get(gw, &format!("/v1/jobs/{id}"), auth).json();
        if st.get("result").is_some() {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{id}: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn png_b64(rgb: [u8; 3]) -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

/// Item 1: a client lives in its own id space. Bob names the id of a job published straight to
/// the broker and of one of Alice's, through another replica, before and after Alice's record
/// is gone: he gets only his own jobs, learns nothing (202, never 409), and cannot read Alice's
/// output through an `s3://` caption input either.
#[test]
fn no_client_reaches_another_clients_job_or_a_direct_one() {
    let names = Names::new("hostile-ids");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let tokens = token_line("alice", "alice-token", "") + &token_line("bob", "bob-token", "");
    let a = Gateway::start(&names, dir.path(), "gw-a", &tokens, &[]);
    let b = Gateway::start(&names, dir.path(), "gw-b", &tokens, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let direct = json!({"job_id": "hello-1", "task": "generate", "params": {"prompt": "a blue square", "steps": 2}});
    rt.block_on(publish(&names, &[direct.to_string().into_bytes()]));
    let alices = r#"{"job_id": "shared-1", "task": "generate", "params": {"prompt": "a red circle", "steps": 2}}"#;
    assert_eq!(post(&a, "/v1/jobs", ALICE, alices).status, 202);

    for id in ["hello-1", "shared-1"] {
        assert_eq!(get(&b, &format!("/v1/jobs/{id}"), BOB).status, 404, "{id}");
    }
    let bobs = r#"{"job_id": "shared-1", "task": "generate", "params": {"prompt": "a green triangle", "steps": 2}}"#;
    let r = post(&b, "/v1/jobs", BOB, bobs);
    assert_eq!(
        r.status,
        202,
        "another client's id is not revealed: {}",
        r.text()
    );
    let bob_hello = r#"{"job_id": "hello-1", "task": "generate", "params": {"prompt": "a green triangle", "steps": 3}}"#;
    assert_eq!(post(&b, "/v1/jobs", BOB, bob_hello).status, 202);

    let mut worker = Worker::start(&names, &model, dir.path(), "w", &[]);
    worker.wait_ready(Duration::from_secs(60));
    let direct_result = rt.block_on(wait_results(
        &names,
        &["hello-1".into()],
        Duration::from_secs(90),
    ));
    assert_eq!(direct_result.len(), 1);
    let alice_st = wait_final(&a, "shared-1", ALICE);
    let bob_st = wait_final(&b, "shared-1", BOB);
    let bob_hello_st = wait_final(&a, "hello-1", BOB);
    assert_eq!(alice_st["state"], "succeeded", "{alice_st}");
    assert_eq!(bob_st["result"]["job_id"], "shared-1", "{bob_st}");
    let uri = |st: &Value| {
        st["result"]["outputs"][0]["uri"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(uri(&bob_st).contains("gw:bob:shared-1"), "{bob_st}");
    assert!(uri(&alice_st).contains("gw:alice:shared-1"), "{alice_st}");
    assert_ne!(uri(&bob_hello_st), direct_result[0].outputs[0].uri);
    assert!(
        uri(&bob_hello_st).contains("gw:bob:hello-1"),
        "{bob_hello_st}"
    );

    // Alice's record expires (its TTL runs from acceptance, the result's from the end): her job
    // is still not Bob's, and her id is still hers.
    rt.block_on(async {
        let mut r = redis().await;
        let key = format!("{}:gw:job:gw:alice:shared-1", names.redis_prefix);
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut r)
            .await
            .unwrap();
    });
    assert_eq!(wait_final(&b, "shared-1", BOB)["result"], bob_st["result"]);
    let again = post(&a, "/v1/jobs", ALICE, alices);
    assert_eq!(again.status, 409, "{}", again.text());
    let img = get(&b, "/v1/jobs/shared-1/outputs/0", BOB);
    assert_eq!(img.status, 200);
    let sha = ddit_schemas::hex(&<sha2::Sha256 as sha2::Digest>::digest(&img.body));
    assert_eq!(
        sha,
        bob_st["result"]["outputs"][0]["sha256"].as_str().unwrap()
    );

    // Alice's output, named as Bob's caption input, is refused before it is queued.
    let steal = json!({"task": "caption", "params": {"image": uri(&alice_st)}});
    let r = post(&b, "/v1/jobs", BOB, &steal.to_string());
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("params.image"), "{}", r.text());
    rt.block_on(cleanup(&names));
}

/// Item 2: 30 concurrent submissions against an in-flight limit of 2 on four replicas admit 2;
/// a rate of 40 a minute admits 40 of a burst of 100 that straddles a minute's end, counting the
/// invalid requests among them.
#[test]
fn limits_hold_under_concurrency_on_four_replicas() {
    let names = Names::new("hostile-limits");
    let dir = tempfile::tempdir().unwrap();
    let tokens =
        token_line("carol", "carol-token", ":0:2") + &token_line("dave", "dave-token", ":40");
    let gws: Vec<Gateway> = (0..4)
        .map(|i| Gateway::start(&names, dir.path(), &format!("gw-{i}"), &tokens, &[]))
        .collect();
    let all: Vec<&Gateway> = gws.iter().collect();
    let carol = "Authorization: Bearer carol-token";
    let job = r#"{"task": "generate", "params": {"prompt": "a red circle", "steps": 2}}"#;
    let codes = burst(&all, 30, |gw| post(gw, "/v1/jobs", carol, job));
    assert_eq!(count(&codes, 202), 2, "{codes:?}");
    assert_eq!(count(&codes, 429), 28, "{codes:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(queue_depth(&names, &names.queue)), 2);
    let batch = json!({"jobs": [json!({"task": "generate", "params": {"prompt": "p"}})]});
    let r = post(&gws[1], "/v1/jobs/batch", carol, &batch.to_string());
    assert_eq!(r.status, 429, "{}", r.text());
    // More jobs than the limit could ever take: not worth a retry.
    let three = json!({"jobs": vec![json!({"task": "generate", "params": {"prompt": "p"}}); 3]});
    let r = post(&gws[2], "/v1/jobs/batch", carol, &three.to_string());
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(rt.block_on(queue_depth(&names, &names.queue)), 2);

    // The burst starts half a second before a minute ends (a fixed window would admit 2×).
    let ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 60_000
    };
    while ms() < 59_300 {
        std::thread::sleep(Duration::from_millis(50).min(Duration::from_millis(
            (59_300u128.saturating_sub(ms())) as u64,
        )));
    }
    let dave = "Authorization: Bearer dave-token";
    let bad = burst(&all, 10, |gw| post(gw, "/v1/jobs", dave, "not json"));
    assert_eq!(count(&bad, 400), 10, "{bad:?}");
    let codes = burst(&all, 100, |gw| get(gw, "/v1/jobs/none", dave));
    assert_eq!(count(&codes, 404), 30, "{codes:?}");
    assert_eq!(count(&codes, 429), 70, "{codes:?}");
    rt.block_on(cleanup(&names));
}

/// Both limits through the one admission script: a request abandoned mid-body gives its place
/// back at once, and a burst over both limits is refused for the right reason every time.
#[test]
fn an_abandoned_body_keeps_no_place_and_both_limits_hold() {
    let names = Names::new("hostile-both");
    let dir = tempfile::tempdir().unwrap();
    // Six requests a minute, one job in flight; a request has one second.
    let gw = Gateway::start(
        &names,
        dir.path(),
        "gw",
        &token_line("erin", "erin-token", ":6:1"),
        &["--request-timeout", "1"],
    );
    let erin = "Authorization: Bearer erin-token";
    let job = r#"{"task": "generate", "params": {"prompt": "a red circle", "steps": 2}}"#;
    // Headers and part of the body (the admission, count and place, runs meanwhile), then the
    // client goes away, or stays past the request timeout and gets a 408.
    let abandon = |hold: Duration| {
        let mut half = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{erin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            job.len()
        );
        half.write_all(head.as_bytes()).unwrap();
        half.write_all(&job.as_bytes()[..10]).unwrap();
        std::thread::sleep(hold);
        let mut answer = String::new();
        half.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let _ = half.read_to_string(&mut answer);
        answer
    };
    abandon(Duration::from_millis(300));
    let timed_out = abandon(Duration::from_millis(1800));
    assert!(timed_out.starts_with("HTTP/1.1 408"), "{timed_out}");
    std::thread::sleep(Duration::from_millis(300));
    // The place is free again (it was held until the claim's TTL, 600 s); both requests counted.
    let r = post(&gw, "/v1/jobs", erin, job);
    assert_eq!(r.status, 202, "{}", r.text());
    // Three of six requests used, one job in flight: of eight at once, three are refused for
    // the place and five for the rate.
    let codes: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| post(&gw, "/v1/jobs", erin, job)))
            .collect();
        hs.into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 429, "{}", r.text());
                r.json()["error"]["code"].as_str().unwrap().to_string()
            })
            .collect()
    });
    let jobs = codes.iter().filter(|c| *c == "too_many_jobs").count();
    let rate = codes.iter().filter(|c| *c == "rate_limited").count();
    assert_eq!((jobs, rate), (3, 5), "{codes:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(queue_depth(&names, &names.queue)), 1);
    rt.block_on(cleanup(&names));
}

/// Items 5 and 9: a batch with one broken inline image publishes nothing; ten identical
/// requests at once (same `job_id`, same body, two replicas) publish one job.
#[test]
fn a_batch_is_all_or_nothing_and_identical_requests_publish_once() {
    let names = Names::new("hostile-batch");
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_line("alice", "alice-token", "");
    let a = Gateway::start(&names, dir.path(), "gw-a", &tokens, &[]);
    let b = Gateway::start(&names, dir.path(), "gw-b", &tokens, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = |id: &str| json!({"job_id": id, "task": "caption", "params": {"image": format!("data:image/png;base64,{}", png_b64([200, 30, 30]))}});
    for (broken, says) in [
        (
            "data:image/png;base64,bm90IGFuIGltYWdl",
            "jobs[2].params.image",
        ),
        ("data:image/png;base64,%%%", "invalid base64"),
    ] {
        let jobs = json!({"jobs": [good("ok-1"), good("ok-2"), {"job_id": "bad", "task": "vqa", "params": {"image": broken, "question": "what?"}}]});
        let r = post(&a, "/v1/jobs/batch", ALICE, &jobs.to_string());
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
        assert_eq!(rt.block_on(queue_depth(&names, &names.queue)), 0);
        assert_eq!(get(&a, "/v1/jobs/ok-1", ALICE).status, 404);
    }
    let twice = json!({"jobs": [good("ok-1"), good("ok-1")]});
    assert_eq!(
        post(&a, "/v1/jobs/batch", ALICE, &twice.to_string()).status,
        422
    );
    // Ids and keys that would reach past the client's space, or a route.
    let own = format!("s3://{}/{}", bucket(), names.s3_prefix);
    for (job, says) in [
        (
            json!({"job_id": "batch", "task": "generate", "params": {"prompt": "p"}}),
            "job_id",
        ),
        (
            json!({"task": "caption", "params": {"image": format!("{own}/gw:alice:x/../gw:bob:y/0.png")}}),
            "params.image",
        ),
        (
            json!({"task": "caption", "params": {"image": format!("{own}/gw:alice:x/%2e%2e/0.png")}}),
            "params.image",
        ),
    ] {
        let r = post(&a, "/v1/jobs", ALICE, &job.to_string());
        assert_eq!(r.status, 422, "{job}: {}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
    }

    let same = r#"{"job_id": "same-1", "task": "generate", "params": {"prompt": "a red circle"}}"#;
    let codes = burst(&[&a, &b], 10, |gw| post(gw, "/v1/jobs", ALICE, same));
    assert_eq!(count(&codes, 202), 1, "{codes:?}");
    assert_eq!(count(&codes, 200), 9, "{codes:?}");
    assert_eq!(rt.block_on(queue_depth(&names, &names.queue)), 1);
    rt.block_on(cleanup(&names));
}

/// TCP connections from process `pid` to Redis (port 6379), read from `/proc`.
fn redis_connections(pid: u32) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(
                l.strip_prefix("socket:[")?
                    .trim_end_matches(']')
                    .to_string(),
            )
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 9 && cols[2].ends_with(":18EB") && inodes.contains(cols[9])
        })
        .count()
}

/// Item 3: 30 open event streams hold no Redis connection of their own; the 31st of one client
/// is refused; every stream ends by itself at `--max-stream-secs`.
#[test]
fn event_streams_share_one_redis_connection_and_are_bounded() {
    let names = Names::new("hostile-sse");
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_line("alice", "alice-token", "");
    let gw = Gateway::start(
        &names,
        dir.path(),
        "gw",
        &tokens,
        &["--max-streams-per-client", "30", "--max-stream-secs", "4"],
    );
    let job = r#"{"task": "generate", "params": {"prompt": "a red circle"}}"#;
    let id = post(&gw, "/v1/jobs", ALICE, job).json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = gw.url(&format!("/v1/jobs/{id}/events"));
    let pid = gw.child.id();
    let before = redis_connections(pid);
    let started = Instant::now();
    let streams: Vec<_> = (0..30)
        .map(|_| {
            std::process::Command::new("curl")
                .args(["-sS", "-N", "--max-time", "30", "-H", ALICE, &url])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let during = redis_connections(pid);
    assert!(before >= 1, "the gateway holds no Redis connection?");
    assert_eq!(
        during, before,
        "the gateway's Redis connections, then with 30 streams"
    );
    let over = get(&gw, &format!("/v1/jobs/{id}/events"), ALICE);
    assert_eq!(over.status, 429, "{}", over.text());
    for s in streams {
        let out = s.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("event: state") && !text.contains("event: result"),
            "{text}"
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "streams ended after {took:?}"
    );
    rt_cleanup(&names);
}

fn rt_cleanup(names: &Names) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(cleanup(names));
}

/// Items 6 and 8: ops endpoints answer only on the ops address; a half-sent header is cut at
/// `--header-timeout`; a job the broker cannot route is a 503 whose body names a request id and
/// no internal detail.
#[test]
fn ops_are_private_slow_headers_are_cut_and_unroutable_jobs_refused() {
    let names = Names::new("hostile-http");
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_line("alice", "alice-token", "");
    let gw = Gateway::start(
        &names,
        dir.path(),
        "gw",
        &tokens,
        &["--header-timeout", "2"],
    );
    for path in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(
            curl(&[&gw.url(path)]).status,
            404,
            "{path} on the public port"
        );
        assert_eq!(
            curl(&[&gw.ops_url(path)]).status,
            200,
            "{path} on the ops port"
        );
    }

    let mut slow = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    slow.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let _ = slow.read(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "held for {:?}",
        start.elapsed()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = ddit_worker::adapters::amqp::connect(&names.amqp(), "e2e-delete")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_delete(names.queue.as_str().into(), Default::default())
            .await
            .unwrap();
        let _ = conn.close(200, "done".into()).await;
    });
    let job = r#"{"task": "generate", "params": {"prompt": "a red circle"}}"#;
    let r = post(&gw, "/v1/jobs", ALICE, job);
    assert_eq!(r.status, 503, "{}", r.text());
    let err = &r.json()["error"];
    let rid = err["request_id"].as_str().unwrap();
    assert!(!r.text().contains(&names.queue), "{}", r.text());
    assert!(gw.log_text().contains(rid), "{}", gw.log_text());
    rt.block_on(cleanup(&names));
}

/// Item 9: every key a gateway writes for a client's jobs, limits and idempotency keys expires,
/// and a worker taking back an attempt whose count expired leaves no key behind.
#[test]
fn every_key_the_gateway_writes_expires() {
    let names = Names::new("hostile-ttl");
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_line("carol", "carol-token", ":100:50");
    let gw = Gateway::start(&names, dir.path(), "gw", &tokens, &[]);
    let carol = "Authorization: Bearer carol-token";
    let job = r#"{"job_id": "k-1", "task": "generate", "params": {"prompt": "a red circle"}}"#;
    assert_eq!(post(&gw, "/v1/jobs", carol, job).status, 202);
    let keyed = curl(&[
        "-X",
        "POST",
        "-H",
        carol,
        "-H",
        "Idempotency-Key: order-1",
        "--data-binary",
        r#"{"task": "generate", "params": {"prompt": "a square"}}"#,
        &gw.url("/v1/jobs"),
    ]);
    assert_eq!(keyed.status, 202, "{}", keyed.text());
    assert_eq!(get(&gw, "/v1/jobs/k-1", carol).status, 200);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = ddit_worker::adapters::redis::ResultStore::connect(
            ddit_worker::adapters::redis::RedisConfig {
                url: var("DDIT_REDIS_URL", "redis://127.0.0.1:6379"),
                prefix: names.redis_prefix.clone(),
                result_ttl_secs: 60,
                ca_pem: None,
            },
        )
        .await
        .unwrap();
        store.forget_attempt("never-counted").await.unwrap();
        let mut r = redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", names.redis_prefix))
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(keys.len() >= 4, "{keys:?}");
        for k in keys {
            let ttl: i64 = redis::cmd("TTL").arg(&k).query_async(&mut r).await.unwrap();
            assert!(ttl > 0, "{k} has no TTL ({ttl})");
        }
    });
    rt.block_on(cleanup(&names));
}

/// Item 10: a job canceled while it is queued ends `canceled` without a step, though the worker
/// starts after the cancel (its 250 ms poll would see it only after the job started).
#[test]
fn a_job_canceled_while_queued_never_starts_a_step() {
    let names = Names::new("hostile-cancel");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let gw = Gateway::start(
        &names,
        dir.path(),
        "gw",
        &token_line("alice", "alice-token", ""),
        &[],
    );
    let job = r#"{"task": "generate", "params": {"prompt": "a red circle", "steps": 200, "num_images": 4}}"#;
    let id = post(&gw, "/v1/jobs", ALICE, job).json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let del = curl(&[
        "-X",
        "DELETE",
        "-H",
        ALICE,
        &gw.url(&format!("/v1/jobs/{id}")),
    ]);
    assert_eq!(del.status, 202, "{}", del.text());
    let mut worker = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        &["--progress-interval-ms", "0"],
    );
    worker.wait_ready(Duration::from_secs(60));
    let st = wait_final(&gw, &id, ALICE);
    assert_eq!(st["state"], "canceled", "{st}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let step: Option<String> = rt.block_on(async {
        let mut r = redis().await;
        redis::cmd("GET")
            .arg(format!("{}:step:gw:alice:{id}", names.redis_prefix))
            .query_async(&mut r)
            .await
            .unwrap()
    });
    assert_eq!(step, None, "a step ran: {step:?}");
    rt.block_on(cleanup(&names));
}
