//! The fleet's client side against the real services on loopback: `ddit-worker submit` (bulk
//! captioning with two workers, interrupted and resumed), the Python client example, model
//! packages through S3 (`push-model` / `fetch-model`), the probe, and the Grafana dashboard's
//! metric names against a live worker.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddit_e2e::{
    bucket, cleanup, client_command, export_model, http_get, metric_sum, workspace, Names, Worker,
};

/// A 48x48 PNG: a coloured square on white, different per `i`.
fn write_png(path: &Path, i: u32) {
    let mut img = image::RgbImage::from_pixel(48, 48, image::Rgb([255, 255, 255]));
    let colour = image::Rgb([
        (i * 37 % 256) as u8,
        (i * 91 % 256) as u8,
        (i * 53 % 256) as u8,
    ]);
    let off = i % 16;
    for y in 8 + off..24 + off {
        for x in 8..24 + off {
            img.put_pixel(x, y, colour);
        }
    }
    img.save(path).unwrap();
}

fn result_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn submit(names: &Names, input: &Path, out: &Path, ahead: &str) -> Command {
    let mut c = client_command(names, "submit");
    c.args(["--input"]).arg(input).arg("--out").arg(out).args([
        "--ahead",
        ahead,
        "--poll-ms",
        "100",
        "--no-progress",
    ]);
    c
}

fn summary_of(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_captions_40_images_with_two_workers_across_an_interruption() {
    let names = Names::new("submit40");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let (a, b) = Worker::start_pair(&names, &model, dir.path());
    // The probe subcommand (container health checks) agrees with /readyz.
    let probe = Command::new(ddit_e2e::worker_bin())
        .args(["probe", "--url", &a.url("/readyz")])
        .status()
        .unwrap();
    assert!(probe.success());

    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut names_in: HashSet<String> = HashSet::new();
    for i in 0..40 {
        let n = format!("img-{i:02}.png");
        write_png(&images.join(&n), i);
        names_in.insert(n);
    }
    std::fs::write(images.join("README.txt"), "not an image").unwrap();
    let out = dir.path().join("captions.jsonl");

    // Run 1: killed (SIGKILL, a crash) once part of the results are in.
    let mut first = submit(&names, &images, &out, "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let n = result_lines(&out).len();
        if n >= 12 {
            break;
        }
        if let Some(status) = first.try_wait().unwrap() {
            panic!("submit ended before the interruption ({status}) with {n} results");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let before = result_lines(&out).len();
    let journal: HashSet<String> = std::fs::read_to_string(format!("{}.submitted", out.display()))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        (12..40).contains(&before),
        "interrupted with {before} results"
    );
    assert!(journal.len() >= before && journal.len() < 40);

    // Run 2: resumes.
    let second = submit(&names, &images, &out, "8").output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let s = summary_of(&second.stdout);
    eprintln!(
        "interrupted with {before} results and {} journaled; resumed run: {s}",
        journal.len()
    );
    assert_eq!(s["items"], 40);
    assert_eq!(s["done_before"].as_u64().unwrap() as usize, before);
    // Every item is accounted for exactly once, and nothing the first run journaled (confirmed)
    // is published again. The kill may land while one publish awaits its confirm: that job is
    // not journaled, so the rerun either finds its result in Redis (recovered) or publishes it
    // again (the documented at-most-one duplicate of a crash).
    let n = |k: &str| s[k].as_u64().unwrap() as usize;
    assert_eq!(n("published") + n("recovered") + n("resumed"), 40 - before);
    let never_confirmed = 40 - journal.len();
    assert!(
        n("published") == never_confirmed || n("published") + 1 == never_confirmed,
        "published {} with {} journaled",
        n("published"),
        journal.len()
    );
    let duplicate = usize::from(n("published") == never_confirmed);

    // Exactly 40 results, one per image, all captions.
    let lines = result_lines(&out);
    assert_eq!(lines.len(), 40);
    let items: HashSet<String> = lines
        .iter()
        .map(|l| l["item"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(items, names_in);
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 40);
    for l in &lines {
        assert_eq!(l["status"], "succeeded", "{l}");
        assert_eq!(l["task"], "caption");
        assert!(l["text"].is_string(), "{l}");
    }

    // Each job ran once across both workers (no finished job was submitted again), bar the one
    // possible unconfirmed duplicate, which a worker recomputes only if it arrives mid-run.
    let mut computed = 0.0;
    for w in [&a, &b] {
        let (_, m) = http_get(w.port, "/metrics").unwrap();
        computed += metric_sum(
            &m,
            "ddit_jobs_total",
            &[("task", "caption"), ("status", "succeeded")],
        );
    }
    assert!(
        computed >= 40.0 && computed <= 40.0 + duplicate as f64,
        "computed {computed}"
    );

    // Run 3: everything is done; nothing is published.
    let third = submit(&names, &images, &out, "8").output().unwrap();
    assert!(third.status.success());
    let s = summary_of(&third.stdout);
    assert_eq!(s["done_before"], 40);
    assert_eq!(s["published"], 0);
    assert_eq!(result_lines(&out).len(), 40);

    // Every ddit_* metric the Grafana dashboard queries is exported by a live worker.
    let (_, exposition) = http_get(a.port, "/metrics").unwrap();
    let dash =
        std::fs::read_to_string(workspace().join("deploy/grafana/ddit-worker.json")).unwrap();
    let mut used = HashSet::new();
    for (i, _) in dash.match_indices("ddit_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(used.len() >= 6, "{used:?}");
    // Except the NVML gauges (`ddit_gpu_*`): only a `gpu` build on a host with a device has them.
    for name in used.iter().filter(|n| !n.starts_with("ddit_gpu_")) {
        assert!(
            exposition
                .lines()
                .any(|l| l.starts_with(name.as_str()) && !l.starts_with('#')),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    cleanup(&names).await;
}

/// The Python interpreter with examples/python/requirements.txt installed (scripts/test.sh
/// makes it): `DDIT_PYCLIENT_PYTHON`, else `.ddit/pyclient/bin/python`.
fn pyclient_python() -> PathBuf {
    let p = std::env::var("DDIT_PYCLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join(".ddit/pyclient/bin/python"));
    assert!(
        p.exists(),
        "{} missing: scripts/test.sh installs examples/python/requirements.txt there",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_captions_answers_and_generates() {
    let python = pyclient_python();
    let names = Names::new("pyclient");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut w = Worker::start(&names, &model, dir.path(), "w", &[]);
    w.wait_ready(Duration::from_secs(60));
    let img = dir.path().join("square.png");
    write_png(&img, 3);
    let script = workspace().join("examples/python/ddit_client.py");
    let run = |args: &[&str]| {
        let o = Command::new(&python)
            .arg(&script)
            .args(args)
            .envs(ddit_e2e::service_env())
            .envs([
                ("DDIT_QUEUE", names.queue.as_str()),
                ("DDIT_REDIS_PREFIX", names.redis_prefix.as_str()),
                ("DDIT_S3_PREFIX", names.s3_prefix.as_str()),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap())
                .unwrap();
        assert_eq!(r["status"], "succeeded", "{r}");
        r
    };
    let cap = run(&["caption", "--image", img.to_str().unwrap(), "--seed", "1"]);
    assert_eq!(cap["task"], "caption");
    assert!(cap["text"].is_string());
    let vqa = run(&[
        "vqa",
        "--image",
        img.to_str().unwrap(),
        "--question",
        "what colour is the square?",
    ]);
    assert_eq!(vqa["task"], "vqa");
    let png = dir.path().join("generated.png");
    let gen = run(&[
        "generate",
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--out",
        png.to_str().unwrap(),
    ]);
    let uri = gen["outputs"][0]["uri"].as_str().unwrap();
    assert!(uri.starts_with(&format!("s3://{}/", bucket())), "{uri}");
    let decoded = image::open(&png).unwrap();
    assert_eq!(
        decoded.width(),
        gen["outputs"][0]["width"].as_u64().unwrap() as u32
    );
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_packages_travel_through_s3_verified() {
    let names = Names::new("modelstore");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let url = format!("s3://{}/{}/models/tiny", bucket(), names.s3_prefix);

    let push = client_command(&names, "push-model")
        .arg("--model")
        .arg(&model)
        .args(["--to", &url])
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );

    let fetched = dir.path().join("models/current");
    let fetch = |out: &Path| {
        client_command(&names, "fetch-model")
            .args(["--from", &url])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = fetch(&fetched);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("files verified"), "{err}");
    let mut copied = 0;
    for entry in std::fs::read_dir(&fetched).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(model.join(name)).unwrap(),
            "{}",
            p.display()
        );
        copied += 1;
    }
    let listed = serde_json::from_slice::<ddit_schemas::Manifest>(
        &std::fs::read(model.join("manifest.json")).unwrap(),
    )
    .unwrap()
    .files()
    .count();
    assert_eq!(copied, listed + 1, "every listed file and the manifest");
    // A restarted init container finds the package in place.
    let again = fetch(&fetched);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));

    // A file changed in the bucket is caught by its manifest hash, and nothing is installed.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("manifest.json")).unwrap()).unwrap();
    let victim = manifest["segments"][0]["files"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let s3 = ddit_e2e::s3_client().await;
    s3.put_object()
        .bucket(bucket())
        .key(format!("{}/models/tiny/{victim}", names.s3_prefix))
        .body(b"tampered".to_vec().into())
        .send()
        .await
        .unwrap();
    let fresh = dir.path().join("models/other");
    let bad = fetch(&fresh);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains(&victim) && err.contains("sha256"),
        "the error names the file and its hash: {err}"
    );
    assert!(!fresh.exists());
    cleanup(&names).await;
}
