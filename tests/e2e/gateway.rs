//! `ddit-worker gateway` against real RabbitMQ, Redis and S3 and a real worker, driven by `curl`.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddit_e2e::gateway::{curl, sse_events, token_line, Gateway, Http};
use ddit_e2e::*;
use serde_json::{json, Value};
use sha2::Digest;

const ALICE: &str = "Authorization: Bearer alice-secret-token";

fn post_json(gw: &Gateway, path: &str, auth: &str, body: &Value, extra: &[&str]) -> Http {
    let body = body.to_string();
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        auth,
        "-H",
        "Content-Type: application/json",
    ];
    args.extend_from_slice(extra);
    let url = gw.url(path);
    args.extend_from_slice(&["--data-binary", &body, &url]);
    curl(&args)
}

fn get(gw: &Gateway, path: &str, auth: &str) -> Http {
    curl(&["-H", auth, &gw.url(path)])
}

/// Polls the job's state until `done` holds for it.
fn wait_state(gw: &Gateway, id: &str, done: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let st = get(gw, &format!("/v1/jobs/{id}"), ALICE).json();
        if done(&st) || start.elapsed() > timeout {
            return st;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A gateway whose one client, alice, holds `alice-secret-token` without limits of its own.
fn alice_gateway(names: &Names, dir: &std::path::Path) -> Gateway {
    let tokens = token_line("alice", "alice-secret-token", "");
    Gateway::start(names, dir, "gw", &tokens, &[])
}

fn red_png(path: &std::path::Path) {
    let mut img = image::RgbImage::from_pixel(24, 24, image::Rgb([255, 255, 255]));
    for (x, y) in (6..14).flat_map(|x| (6..14).map(move |y| (x, y))) {
        img.put_pixel(x, y, image::Rgb([220, 40, 40]));
    }
    img.save(path).unwrap();
}

/// `curl -N` on the job's event stream into `out`, once its `state` event has come.
fn stream_events(gw: &Gateway, id: &str, out: &std::path::Path) -> std::process::Child {
    let events = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "120",
            "-H",
            ALICE,
            &gw.url(&format!("/v1/jobs/{id}/events")),
        ])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(out)
        .unwrap()
        .contains("event: state")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no state event");
        std::thread::sleep(Duration::from_millis(50));
    }
    events
}

#[test]
fn curl_posts_streams_fetches_uploads_cancels_and_replays() {
    let names = Names::new("gw");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let gw = alice_gateway(&names, dir.path());

    // Queued before any worker runs, so the event stream sees the job from its first step.
    let job =
        json!({"task": "generate", "params": {"prompt": "a red circle", "steps": 6, "seed": 3}});
    let r = post_json(&gw, "/v1/jobs", ALICE, &job, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    let events_out = dir.path().join("events.txt");
    let mut events = stream_events(&gw, &id, &events_out);
    let png = dir.path().join("red.png");
    red_png(&png);
    let caption = curl(&[
        "-H",
        ALICE,
        "-F",
        r#"job={"task":"caption","params":{"steps":4,"seed":1}};type=application/json"#,
        "-F",
        &format!("image=@{};type=image/png", png.display()),
        &gw.url("/v1/jobs"),
    ]);
    assert_eq!(caption.status, 202, "{}", caption.text());

    let mut worker = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        // The cancel test's job is long on purpose: above the default caps.
        &[
            "--progress-interval-ms",
            "0",
            "--max-steps",
            "1000",
            "--max-images-per-job",
            "8",
        ],
    );
    worker.wait_ready(Duration::from_secs(60));
    assert!(events.wait().unwrap().success());
    let evs = sse_events(&std::fs::read_to_string(&events_out).unwrap());
    let kinds: Vec<&str> = evs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"state"), "{kinds:?}");
    assert_eq!(evs[0].1["state"], "queued");
    // A progress event after every step but the last, whose news is the result.
    let steps: Vec<(u64, u64)> = evs
        .iter()
        .filter(|(k, _)| k == "progress")
        .map(|(_, p)| (p["step"].as_u64().unwrap(), p["total"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        steps,
        (1..6).map(|s| (s, 6)).collect::<Vec<_>>(),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"result"), "{kinds:?}");
    let result = &evs.last().unwrap().1;
    assert_eq!(result["status"], "succeeded", "{result}");

    // The image, streamed through the gateway, is the one the result names.
    let img = get(&gw, &format!("/v1/jobs/{id}/outputs/0"), ALICE);
    assert_eq!(
        (img.status, img.header("content-type")),
        (200, Some("image/png"))
    );
    let sha = ddit_schemas::hex(&sha2::Sha256::digest(&img.body));
    assert_eq!(sha, result["outputs"][0]["sha256"].as_str().unwrap());
    assert_eq!(
        get(&gw, &format!("/v1/jobs/{id}/outputs/1"), ALICE).status,
        404
    );

    // The multipart upload was captioned.
    let cid = caption.json()["job_id"].as_str().unwrap().to_string();
    let st = wait_state(
        &gw,
        &cid,
        |s| s.get("result").is_some(),
        Duration::from_secs(60),
    );
    assert_eq!(st["state"], "succeeded", "{st}");
    assert!(!st["result"]["text"].as_str().unwrap().is_empty(), "{st}");

    replays_create_no_second_job(&gw);
    a_cancel_ends_a_long_job_canceled(&gw);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cleanup(&names));
}

fn replays_create_no_second_job(gw: &Gateway) {
    let job = json!({"task": "vqa", "params": {"image": format!("data:image/png;base64,{}", tiny_png_b64()), "question": "what colour?", "steps": 3}});
    let first = post_json(
        gw,
        "/v1/jobs",
        ALICE,
        &job,
        &["-H", "Idempotency-Key: order-17"],
    );
    assert_eq!(first.status, 202, "{}", first.text());
    let again = post_json(
        gw,
        "/v1/jobs",
        ALICE,
        &job,
        &["-H", "Idempotency-Key: order-17"],
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["job_id"], first.json()["job_id"]);
    assert_eq!(again.json()["replayed"], true);
    // A client-chosen job_id is idempotent too; the same id with another body is a conflict.
    let mine = json!({"job_id": "alice-7", "task": "generate", "params": {"prompt": "a square", "steps": 2}});
    assert_eq!(post_json(gw, "/v1/jobs", ALICE, &mine, &[]).status, 202);
    assert_eq!(post_json(gw, "/v1/jobs", ALICE, &mine, &[]).status, 200);
    let other = json!({"job_id": "alice-7", "task": "generate", "params": {"prompt": "a circle", "steps": 2}});
    assert_eq!(post_json(gw, "/v1/jobs", ALICE, &other, &[]).status, 409);
    let id = first.json()["job_id"].as_str().unwrap().to_string();
    let st = wait_state(
        gw,
        &id,
        |s| s.get("result").is_some(),
        Duration::from_secs(60),
    );
    assert_eq!(st["state"], "succeeded", "{st}");
    assert_eq!(st["result"]["attempts"], 1, "{st}");
    wait_state(
        gw,
        "alice-7",
        |s| s.get("result").is_some(),
        Duration::from_secs(60),
    );
    // Four jobs were published for six submissions (generate, caption, vqa, alice-7).
    let metrics = curl(&[&gw.ops_url("/metrics")]).text();
    assert_eq!(
        metric_sum(&metrics, "ddit_gateway_jobs_accepted_total", &[]),
        4.0,
        "{metrics}"
    );
}

fn tiny_png_b64() -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([30, 200, 40]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

fn a_cancel_ends_a_long_job_canceled(gw: &Gateway) {
    let job = json!({"task": "generate", "params": {"prompt": "a long one", "steps": 1000, "num_images": 8}});
    let r = post_json(gw, "/v1/jobs", ALICE, &job, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    let running = wait_state(gw, &id, |s| s["state"] != "queued", Duration::from_secs(60));
    assert_eq!(running["state"], "running", "{running}");
    assert!(running["step"].as_u64().unwrap() < 1000, "{running}");
    let del = curl(&[
        "-X",
        "DELETE",
        "-H",
        ALICE,
        &gw.url(&format!("/v1/jobs/{id}")),
    ]);
    assert_eq!(del.status, 202, "{}", del.text());
    let st = wait_state(
        gw,
        &id,
        |s| s.get("result").is_some(),
        Duration::from_secs(60),
    );
    assert_eq!(st["state"], "canceled", "{st}");
}

/// SIGTERM ends an open event stream (its job still queued: no worker runs), so the gateway
/// exits (within `stop`'s 10 s) instead of waiting for a result that may be minutes away.
#[test]
fn shutdown_ends_open_event_streams() {
    let names = Names::new("gwstop");
    let dir = tempfile::tempdir().unwrap();
    let mut gw = alice_gateway(&names, dir.path());
    let job = json!({"task": "generate", "params": {"prompt": "a red circle", "steps": 6}});
    let r = post_json(&gw, "/v1/jobs", ALICE, &job, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    let out = dir.path().join("events.txt");
    let mut events = stream_events(&gw, &id, &out);
    let exited = gw.stop();
    assert!(exited.success(), "{exited}: {}", gw.log_text());
    assert!(events.wait().unwrap().success(), "curl saw the stream cut");
    let evs = sse_events(&std::fs::read_to_string(&out).unwrap());
    let kinds: Vec<&str> = evs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["state"], "{evs:?}");
    assert_eq!(evs[0].1["state"], "queued");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cleanup(&names));
}

#[test]
fn tokens_limits_and_the_contract_are_enforced() {
    let names = Names::new("gwlimits");
    let dir = tempfile::tempdir().unwrap();
    let tokens = [
        "# name:sha256(token)[:requests per minute[:jobs in flight]]\n".to_string(),
        token_line("alice", "alice-secret-token", ""),
        token_line("bob", "bob-token", ":3"),
        token_line("carol", "carol-token", ":0:1"),
    ]
    .concat();
    let gw = Gateway::start(
        &names,
        dir.path(),
        "gw",
        &tokens,
        &["--max-body-bytes", "2048"],
    );
    let job = json!({"task": "generate", "params": {"prompt": "a red circle", "steps": 2}});

    let none = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &job.to_string(),
        &gw.url("/v1/jobs"),
    ]);
    assert_eq!(
        (none.status, none.header("www-authenticate")),
        (401, Some("Bearer"))
    );
    let wrong = post_json(
        &gw,
        "/v1/jobs",
        "Authorization: Bearer alice-secret-tokeN",
        &job,
        &[],
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["code"], "unauthorized");

    let big = json!({"task": "generate", "params": {"prompt": "x".repeat(3000)}});
    assert_eq!(post_json(&gw, "/v1/jobs", ALICE, &big, &[]).status, 413);

    for (bad, field) in [
        (json!({"task": "generate", "params": {}}), "params"),
        (
            json!({"task": "generate", "params": {"prompt": "p", "steps": 0}}),
            "params.steps",
        ),
        (
            json!({"task": "caption", "params": {"image": "/etc/passwd"}}),
            "params.image",
        ),
    ] {
        let r = post_json(&gw, "/v1/jobs", ALICE, &bad, &[]);
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{}",
            r.text()
        );
    }

    // Over the request rate: 429 with Retry-After; another client is not affected.
    let bob = "Authorization: Bearer bob-token";
    let codes: Vec<u16> = (0..4)
        .map(|_| get(&gw, "/v1/jobs/nothing", bob).status)
        .collect();
    assert_eq!(codes, [404, 404, 404, 429]);
    let limited = get(&gw, "/v1/jobs/nothing", bob);
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(get(&gw, "/v1/jobs/nothing", ALICE).status, 404);

    // Over the jobs in flight (no worker consumes this queue): 429; alice's job is not carol's.
    let carol = "Authorization: Bearer carol-token";
    assert_eq!(post_json(&gw, "/v1/jobs", carol, &job, &[]).status, 202);
    let second = post_json(&gw, "/v1/jobs", carol, &job, &[]);
    assert_eq!(
        (second.status, second.json()["error"]["code"].as_str()),
        (429, Some("too_many_jobs"))
    );
    assert!(second.header("retry-after").is_some());
    let a = post_json(&gw, "/v1/jobs", ALICE, &job, &[]).json();
    let id = a["job_id"].as_str().unwrap();
    assert_eq!(
        get(&gw, &format!("/v1/jobs/{id}"), ALICE).json()["state"],
        "queued"
    );
    assert_eq!(get(&gw, &format!("/v1/jobs/{id}"), carol).status, 404);

    // A batch is validated whole before anything is published.
    let mut jobs: Vec<Value> = (0..3).map(|i| json!({"job_id": format!("b-{i}"), "task": "generate", "params": {"prompt": "p", "steps": 2}})).collect();
    let ok = post_json(&gw, "/v1/jobs/batch", ALICE, &json!({"jobs": jobs}), &[]);
    assert_eq!(ok.status, 202, "{}", ok.text());
    assert_eq!(ok.json()["jobs"].as_array().unwrap().len(), 3);
    jobs[1]["params"]["steps"] = json!(-1);
    jobs[0]["job_id"] = json!("b-new");
    let bad = post_json(&gw, "/v1/jobs/batch", ALICE, &json!({"jobs": jobs}), &[]);
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert!(
        bad.text().contains("jobs[1].params.steps"),
        "{}",
        bad.text()
    );
    assert_eq!(get(&gw, "/v1/jobs/b-new", ALICE).status, 404);

    // The OpenAPI document names every route and carries the job contract; `/` is the playground.
    let doc = curl(&[&gw.url("/openapi.json")]).json();
    for path in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/outputs/{n}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(doc["paths"]["/v1/jobs/{id}"].get("delete").is_some());
    assert_eq!(
        doc["components"]["schemas"]["Job"]["$defs"]["generate"]["required"],
        json!(["prompt"])
    );
    let page = curl(&[&gw.url("/")]);
    assert!(page.text().contains("ddit playground"), "{}", page.text());
    assert!(
        !gw.log_text().contains("secret-token"),
        "a token reached the log"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cleanup(&names));
}

/// The playground page in Debian's headless Chromium (`tests/browser/playground.mjs`, with
/// playwright-core from npm; `scripts/test.sh` installs both). The screenshot is kept at
/// `target/test-artifacts/playground.png`.
#[test]
fn the_playground_page_generates_and_captions_in_headless_chromium() {
    use std::io::BufRead;
    let names = Names::new("gwbrowser");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut gw = alice_gateway(&names, dir.path());
    let script = workspace().join("tests/browser/playground.mjs");
    assert!(
        workspace()
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let artifacts = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("playground.png");
    let png = dir.path().join("red.png");
    red_png(&png);
    let mut node = Command::new("node")
        .arg(&script)
        .arg(gw.url("/"))
        .arg("alice-secret-token")
        .arg(&shot)
        .arg(&png)
        .env("RESTART", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut until = |want: &str| {
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line.clone());
            if line == want {
                return;
            }
        }
        panic!("the page never printed {want:?}: {seen:?}");
    };
    until("queued");
    // A rolling update: the page's event stream ends, and it follows the job on the new gateway.
    gw.restart();
    until("queued again");
    let mut worker = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        &["--progress-interval-ms", "0"],
    );
    worker.wait_ready(Duration::from_secs(60));
    seen.extend(lines.map(|l| l.unwrap()));
    let status = node.wait().unwrap();
    assert!(status.success(), "{seen:?}\n{}", gw.log_text());
    assert!(
        seen.iter().any(|l| l.starts_with("caption: \"")),
        "{seen:?}"
    );
    let shot_png = image::open(&shot).unwrap();
    assert!(
        shot_png.width() >= 800,
        "screenshot {}x{}",
        shot_png.width(),
        shot_png.height()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cleanup(&names));
}
