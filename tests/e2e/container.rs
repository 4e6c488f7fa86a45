//! The CPU worker image (`scripts/images.sh`), run the way `deploy/k8s/base` runs it: the
//! `fetch-model` init container, the worker and the gateway, each under the manifests' user,
//! arguments, settings, read-only root, mounts and probes, against the loopback services. Jobs go
//! through the gateway; the results, the bytes in S3 and a SIGTERM drain are checked.
//!
//! Needs podman and the image: `scripts/test.sh` runs `scripts/images.sh`, then this test with
//! `--ignored` (it is ignored in a plain `cargo test`, which builds no image).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ddit_e2e::container::{
    gpu_image, image, manifest_specs, podman, podman_run, test_settings, volume, Pod,
};
use ddit_e2e::gateway::{curl, token_line, Http};
use ddit_e2e::*;
use serde_json::{json, Value};
use sha2::Digest;

const TOKEN: &str = "container-client-token";

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

fn post(gw: &Pod, job: &Value) -> Http {
    let url = format!("http://127.0.0.1:{}/v1/jobs", gw.port("http"));
    let body = job.to_string();
    curl(&[
        "-X",
        "POST",
        "-H",
        &auth(),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
        &url,
    ])
}

fn get(gw: &Pod, path: &str) -> Http {
    curl(&[
        "-H",
        &auth(),
        &format!("http://127.0.0.1:{}{path}", gw.port("http")),
    ])
}

/// Polls the job until it has a result.
fn wait_result(gw: &Pod, id: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let st = get(gw, &format!("/v1/jobs/{id}")).json();
        if st.get("result").is_some() {
            return st;
        }
        assert!(start.elapsed() < timeout, "no result for {id}: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn png_b64() -> String {
    use base64::Engine as _;
    let mut img = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
    for (x, y) in (8..24).flat_map(|x| (8..24).map(move |y| (x, y))) {
        img.put_pixel(x, y, image::Rgb([220, 40, 40]));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

/// The folders behind the pods' volumes (models and tmp: emptyDir), and the Secrets' files under
/// the key names the manifests give them.
fn volumes(dir: &Path, specs: &BTreeMap<String, Value>) -> BTreeMap<String, std::path::PathBuf> {
    let ca = var("DDIT_TEST_TLS_CA_FILE", "/var/lib/ddit-tls/ca.pem");
    let content = BTreeMap::from([
        ("ca.pem", std::fs::read(ca).unwrap()),
        ("tokens", token_line("container", TOKEN, "").into_bytes()),
    ]);
    let mut v = BTreeMap::new();
    for m in specs.values().flat_map(|s| s["mounts"].as_array().unwrap()) {
        let name = m["volume"].as_str().unwrap();
        let path = volume(dir, name, &specs["worker"]);
        for key in m["keys"].as_array().unwrap() {
            let key = key.as_str().unwrap();
            let bytes = content
                .get(key)
                .unwrap_or_else(|| panic!("the manifests' Secret key {key}: no test content"));
            std::fs::write(path.join(key), bytes).unwrap();
        }
        v.insert(name.to_string(), path);
    }
    v
}

/// Pushes the image's own demo package to S3, where the manifests' init container fetches it.
fn push_model(names: &Names, settings: &[(String, String)], ca: &Path, url: &str) {
    let mut c = podman_run();
    c.args(["--network", "slirp4netns:allow_host_loopback=true"]);
    c.args(["-v", &format!("{}:/etc/ddit/tls:ro", ca.display())]);
    c.args(["-e", "DDIT_TLS_CA_FILE=/etc/ddit/tls/ca.pem"]);
    for (k, v) in settings {
        c.args(["-e", &format!("{k}={v}")]);
    }
    c.args([
        &image(),
        "push-model",
        "--model",
        "/opt/ddit/models/ddit-shapes",
        "--to",
        url,
    ]);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "push-model ({}): {}",
        names.id,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs podman and the image from scripts/images.sh (scripts/test.sh runs it)"]
fn the_image_runs_as_the_manifests_say() {
    let names = Names::new("ctr");
    let dir = tempfile::tempdir().unwrap();
    let specs = manifest_specs();
    let model_url = format!("s3://{}/{}/model", bucket(), names.s3_prefix);
    let settings = test_settings(&names, &model_url);
    let vols = volumes(dir.path(), &specs);
    push_model(&names, &settings, &vols["tls-ca"], &model_url);

    // Public CA roots, for S3 or a broker with a publicly trusted certificate.
    let roots = podman_run()
        .args(["--network", "none", "--entrypoint", "test", &image()])
        .args(["-s", "/etc/ssl/certs/ca-certificates.crt"])
        .status()
        .unwrap();
    assert!(roots.success(), "no CA roots in the image");
    // The init container fills the models volume; the worker then reads it read-only.
    let (_, out) = Pod::run(
        &format!("{}-fetch", names.id),
        &specs["fetch-model"],
        &vols,
        &settings,
        false,
    );
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "fetch-model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vols["models"].join("current/manifest.json").exists());

    let (worker, _) = Pod::run(
        &format!("{}-worker", names.id),
        &specs["worker"],
        &vols,
        &settings,
        true,
    );
    worker.wait_probe("startup");
    worker.wait_probe("liveness");
    worker.wait_probe("readiness");
    // The image's own HEALTHCHECK passes too (compose and podman use it).
    let hc = podman()
        .args(["healthcheck", "run", &worker.name])
        .output()
        .unwrap();
    assert!(
        hc.status.success(),
        "HEALTHCHECK: {}",
        String::from_utf8_lossy(&hc.stderr)
    );
    let (gw, _) = Pod::run(
        &format!("{}-gateway", names.id),
        &specs["gateway"],
        &vols,
        &settings,
        true,
    );
    gw.wait_probe("liveness");
    gw.wait_probe("readiness");

    jobs_succeed_with_their_bytes_in_s3(&gw);
    sigterm_drains(&names, &worker, &gw, &vols, &specs["worker"], &settings);
}

fn jobs_succeed_with_their_bytes_in_s3(gw: &Pod) {
    let image = format!("data:image/png;base64,{}", png_b64());
    let jobs = [
        json!({"task": "generate", "params": {"prompt": "a red circle", "steps": 8, "seed": 5}}),
        json!({"task": "caption", "params": {"image": image, "steps": 8, "seed": 1}}),
        json!({"task": "vqa", "params": {"image": image, "question": "what colour is it?", "steps": 8}}),
    ];
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| {
            let r = post(gw, j);
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["job_id"].as_str().unwrap().to_string()
        })
        .collect();
    let gen = wait_result(gw, &ids[0], Duration::from_secs(120));
    assert_eq!(gen["state"], "succeeded", "{gen}");
    let outputs = gen["result"]["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{gen}");
    let img = get(gw, &format!("/v1/jobs/{}/outputs/0", ids[0]));
    assert_eq!(
        (img.status, img.header("content-type")),
        (200, Some("image/png"))
    );
    let sha = ddit_schemas::hex(&sha2::Sha256::digest(&img.body));
    assert_eq!(sha, outputs[0]["sha256"].as_str().unwrap());
    assert!(image::load_from_memory(&img.body).is_ok());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let in_s3 = rt.block_on(async {
        let s3 = s3_client().await;
        object_sha256(&s3, s3_key(outputs[0]["uri"].as_str().unwrap())).await
    });
    assert_eq!(in_s3.as_deref(), Ok(sha.as_str()));
    for id in &ids[1..] {
        let st = wait_result(gw, id, Duration::from_secs(120));
        assert_eq!(st["state"], "succeeded", "{st}");
        assert!(
            !st["result"]["text"].as_str().unwrap().trim().is_empty(),
            "{st}"
        );
    }
}

/// SIGTERM while jobs run: the worker stops taking deliveries, finishes or requeues what it
/// holds, and exits 0 within the manifests' grace period. A second worker then ends every job
/// with exactly one result.
fn sigterm_drains(
    names: &Names,
    worker: &Pod,
    gw: &Pod,
    vols: &BTreeMap<String, std::path::PathBuf>,
    spec: &Value,
    settings: &[(String, String)],
) {
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let job = json!({"task": "generate", "params": {"prompt": "a blue square", "steps": 250, "num_images": 4, "seed": i}});
            let r = post(gw, &job);
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["job_id"].as_str().unwrap().to_string()
        })
        .collect();
    // Wait for the first job to be running.
    let start = Instant::now();
    while get(gw, &format!("/v1/jobs/{}", ids[0])).json()["state"] == "queued" {
        assert!(start.elapsed() < Duration::from_secs(60), "never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Probed as the kubelet would while it works: a busy worker stays live and ready.
    std::thread::sleep(Duration::from_secs(1));
    for kind in ["liveness", "readiness"] {
        assert!(
            worker.probe_ok(kind),
            "{kind} failed under load: {}",
            worker.logs()
        );
    }
    let unfinished = ids
        .iter()
        .filter(|id| {
            get(gw, &format!("/v1/jobs/{id}"))
                .json()
                .get("result")
                .is_none()
        })
        .count();
    assert!(
        unfinished > 0,
        "every job ended before the SIGTERM: the drain had nothing to do"
    );
    let code = worker.sigterm_and_wait();
    assert_eq!(
        code,
        Some(0),
        "not drained within the grace period: {}",
        worker.logs()
    );
    assert!(worker.logs().contains("stopped"), "{}", worker.logs());
    eprintln!(
        "container: SIGTERM with {unfinished} of {} jobs unfinished; exit 0",
        ids.len()
    );

    let (second, _) = Pod::run(&format!("{}-worker2", names.id), spec, vols, settings, true);
    second.wait_probe("readiness");
    for id in &ids {
        let st = wait_result(gw, id, Duration::from_secs(300));
        assert_eq!(st["state"], "succeeded", "{st}");
    }
    // Exactly one stored result per job, in the Redis the containers use (the TLS listener).
    assert_eq!(tls_result_count(names), 6 + 3, "{}", second.logs());
}

/// The results stored under the test's prefix; then removes the test's keys.
fn tls_result_count(names: &Names) -> usize {
    let url = var("DDIT_TEST_REDISS_URL", "rediss://localhost:6390");
    let ca =
        std::fs::read_to_string(var("DDIT_TEST_TLS_CA_FILE", "/var/lib/ddit-tls/ca.pem")).unwrap();
    let client = ddit_worker::adapters::redis::client(&url, Some(&ca)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut r = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> =
            redis::AsyncCommands::keys(&mut r, format!("{}:*", names.redis_prefix))
                .await
                .unwrap();
        let results = format!("{}:result:", names.redis_prefix);
        let n = keys.iter().filter(|k| k.starts_with(&results)).count();
        if !keys.is_empty() {
            let _: () = redis::AsyncCommands::del(&mut r, &keys).await.unwrap();
        }
        n
    })
}

/// The GPU Dockerfile's image, built on a Debian stand-in for NVIDIA's base (`scripts/images.sh
/// gpu`): its binary and the `onnxruntime-gpu` wheel's library run the CPU provider, and a GPU
/// provider whose libraries cannot load (no CUDA in the stand-in) fails the start with an error
/// that names the provider and the missing library; no crash, no silent fallback.
#[test]
#[ignore = "needs podman and the image from scripts/images.sh gpu (scripts/test.sh runs it)"]
fn the_gpu_image_runs_on_cpu_and_refuses_a_provider_it_cannot_load() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = export_model(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    for p in [&pkg, &out] {
        let ok = std::process::Command::new("chmod")
            .args(["-R", "a+rwX", p.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let generate = |providers: &str| {
        let mut c = podman_run();
        c.args(["--network", "none", "--read-only"]);
        c.args(["-v", &format!("{}:/models/current:ro", pkg.display())]);
        c.args(["-v", &format!("{}:/out", out.display())]);
        c.args([&gpu_image(), "generate"]);
        c.args([
            "--model",
            "/models/current",
            "--prompt",
            "a red circle",
            "--steps",
            "2",
        ]);
        c.args(["--out", "/out/g.png", "--providers", providers]);
        c.output().unwrap()
    };
    let cpu = generate("cpu");
    assert!(
        cpu.status.success(),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    assert!(image::open(out.join("g.png")).is_ok());
    for providers in ["cuda,cpu", "tensorrt,cuda,cpu"] {
        let r = generate(providers);
        let err = String::from_utf8_lossy(&r.stderr);
        // 1: the worker's own error exit; an abort inside ONNX Runtime would be 134.
        assert_eq!(r.status.code(), Some(1), "{providers}: {err}");
        let first = providers.split(',').next().unwrap();
        assert!(
            err.contains(&format!(
                "execution provider `{first}` could not be registered"
            )) && err.contains("cannot open shared object file"),
            "{providers}: {err}"
        );
    }
}
