//! The service tax: `serve` with one worker (real RabbitMQ, Redis and S3 on loopback) against
//! `batch` on the same generate jobs of the demo model, with the same flags, in one run. A
//! benchmark, not a timed test: it prints both throughputs and their ratio.
//! Run by `scripts/bench.sh N service` (`cargo test -p ddit-e2e --test service_bench -- --ignored`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::{JobResult, Status};
use ddit_worker::adapters::amqp;
use serde_json::json;

/// `n` generate jobs (28 steps): the ShapesEval captions as prompts, in turn.
fn jobs(n: usize, prefix: &str) -> Vec<serde_json::Value> {
    let scenes =
        std::fs::read_to_string(workspace().join("models/shapes-eval/scenes.jsonl")).unwrap();
    let prompts: Vec<String> = scenes
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["caption"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    (0..n)
        .map(|i| {
            json!({"job_id": format!("{prefix}-{i}"), "task": "generate",
                   "params": {"prompt": prompts[i % prompts.len()], "steps": 28, "seed": i}})
        })
        .collect()
}

/// Seconds of one `ddit-worker batch` run over the job file `jobs`, as batch reports them: from
/// the loaded model to the last result written (serve's model is loaded before its rounds too).
fn batch_seconds(pkg: &Path, jobs: &Path, out: &Path, flags: &[String]) -> f64 {
    let _ = std::fs::remove_dir_all(out);
    let run = Command::new(worker_bin())
        .arg("batch")
        .arg("--model")
        .arg(pkg)
        .arg("--jobs")
        .arg(jobs)
        .arg("--out")
        .arg(out)
        .arg("--no-progress")
        .args(flags)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success(), "batch failed");
    let stderr = String::from_utf8_lossy(&run.stderr);
    stderr
        .lines()
        .find_map(|l| {
            l.split_once(" jobs in ")?
                .1
                .split_once("s: ")?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("batch printed no time: {stderr}"))
}

/// Seconds from publishing `bodies` (all at once, confirms awaited together) until every one of
/// `ids` has its result in Redis, counted from the results channel (subscribed before the first
/// publish, so none is missed): waiting costs the cores it measures nothing.
async fn serve_seconds(names: &Names, bodies: &[Vec<u8>], ids: &[String]) -> (f64, Vec<JobResult>) {
    use futures_util::StreamExt;
    use redis::AsyncCommands;
    let mut pubsub = results_subscription(names).await;
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "bench-client").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare(&ch, &cfg).await.unwrap();
    let t = Instant::now();
    let publishes = bodies
        .iter()
        .map(|b| amqp::publish_job(&ch, &cfg.queue, b, None));
    for p in futures_util::future::join_all(publishes).await {
        p.unwrap();
    }
    let mut waiting: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut stream = pubsub.on_message();
    while !waiting.is_empty() {
        let left = Duration::from_secs(900).saturating_sub(t.elapsed());
        let msg = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} results missing after 900 s", waiting.len()))
            .expect("the results subscription ended");
        waiting.remove(msg.get_payload::<String>().unwrap().as_str());
    }
    let secs = t.elapsed().as_secs_f64();
    drop(stream);
    let _ = conn.close(200, "done".into()).await;
    let keys: Vec<String> = ids
        .iter()
        .map(|i| format!("{}:result:{i}", names.redis_prefix))
        .collect();
    let vals: Vec<Option<String>> = redis().await.mget(&keys).await.unwrap();
    let results = vals
        .iter()
        .flatten()
        .map(|v| serde_json::from_str(v).unwrap())
        .collect();
    (secs, results)
}

/// (forward passes, images through them) so far, from serve's `ddit_batch_size` histogram.
fn forward_passes(worker: &Worker) -> (f64, f64) {
    let (_, m) = http_get(worker.port, "/metrics").expect("serve's /metrics");
    (
        metric_sum(&m, "ddit_batch_size_count", &[]),
        metric_sum(&m, "ddit_batch_size_sum", &[]),
    )
}

/// One round of the service side: a fresh `serve` (ready before the first publish), `n` jobs
/// through it, every result and S3 object checked; (seconds, forward passes and images).
fn serve_round(
    rt: &tokio::runtime::Runtime,
    names: &Names,
    pkg: &Path,
    dir: &Path,
    serve_flags: &[&str],
    n: usize,
    round: usize,
) -> (f64, (f64, f64)) {
    let mut worker = Worker::start(names, pkg, dir, "bench", serve_flags);
    worker.wait_ready(Duration::from_secs(120));
    let serve_jobs = jobs(n, &format!("{}-serve{round}", names.queue));
    let ids: Vec<String> = serve_jobs
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    let bodies: Vec<Vec<u8>> = serve_jobs
        .iter()
        .map(|j| j.to_string().into_bytes())
        .collect();
    let (serve, results) = rt.block_on(serve_seconds(names, &bodies, &ids));
    assert_eq!(results.len(), n, "a result is missing");
    assert!(results
        .iter()
        .all(|r| r.status == Status::Succeeded && r.outputs.len() == 1));
    rt.block_on(assert_outputs_match(&results));
    let passes = forward_passes(&worker);
    worker.sigterm();
    let _ = worker.child.wait();
    (serve, passes)
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh N service"]
fn serve_throughput_against_batch_on_the_same_jobs() {
    let n: usize = var("DDIT_BENCH_JOBS", "96").parse().unwrap();
    let rounds: usize = var("DDIT_BENCH_ROUNDS", "6").parse().unwrap();
    let cores = std::thread::available_parallelism()
        .map_or(2, |c| c.get())
        .to_string();
    let threads = var("DDIT_BENCH_THREADS", &cores);
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    let mut o = ddit_export::ExportOptions::new(workspace().join("models/ddit-shapes"), &pkg);
    o.name = Some("ddit-shapes".into());
    ddit_export::convert(&o).unwrap();

    // The same flags on both sides (more in DDIT_BENCH_FLAGS). `--prefetch` is serve's default
    // for them, 2 × max batch × inference threads (the demo model is narrow: a runner per
    // thread), passed because the test harness's own default is 4; or DDIT_BENCH_PREFETCH.
    let threads_n: usize = threads.parse().unwrap();
    let prefetch = var("DDIT_BENCH_PREFETCH", &(2 * 8 * threads_n).to_string());
    let mut flags: Vec<String> = ["--max-batch", "8", "--threads", &threads]
        .iter()
        .map(|s| s.to_string())
        .collect();
    flags.extend(
        var("DDIT_BENCH_FLAGS", "")
            .split_whitespace()
            .map(str::to_string),
    );
    let names = Names::new("svcbench");
    let mut serve_flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    serve_flags.extend(["--log", "warn"]);
    serve_flags.extend(["--prefetch", &prefetch]);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let out = dir.path().join("out");
    println!(
        "service bench: {n} generate jobs (28 steps, demo model), flags {}, serve --prefetch {}",
        flags.join(" "),
        prefetch
    );
    // Both sides start cold in every round: `batch` is a new process, and so is `serve` (its
    // model load excluded: it is ready before the jobs are published). Rounds alternate which
    // side goes first, so that both see the same drifts of this shared machine; the verdict is
    // over all rounds together.
    let (mut batch_total, mut serve_total, mut ratios) = (0.0, 0.0, vec![]);
    for round in 0..rounds {
        let run_batch = || {
            let batch_jobs = jobs(n, &format!("batch{round}"));
            let file = dir.path().join("jobs.jsonl");
            let lines: Vec<String> = batch_jobs.iter().map(|j| j.to_string()).collect();
            std::fs::write(&file, lines.join("\n") + "\n").unwrap();
            batch_seconds(&pkg, &file, &out, &flags)
        };
        let run_serve = || serve_round(&rt, &names, &pkg, dir.path(), &serve_flags, n, round);
        let (batch, (serve, passes)) = if round % 2 == 0 {
            let b = run_batch();
            (b, run_serve())
        } else {
            let s = run_serve();
            (run_batch(), s)
        };
        println!(
            "service bench: round {round} ({} first): batch {:.2} jobs/s ({batch:.2} s, model load \
             excluded), serve {:.2} jobs/s ({serve:.2} s publish to last result, {:.2} images a \
             forward pass): serve/batch = {:.3}",
            if round % 2 == 0 { "batch" } else { "serve" },
            n as f64 / batch,
            n as f64 / serve,
            passes.1 / passes.0.max(1.0),
            batch / serve
        );
        (batch_total, serve_total) = (batch_total + batch, serve_total + serve);
        ratios.push(batch / serve);
    }
    ratios.sort_by(f64::total_cmp);
    let jobs_all = (n * rounds) as f64;
    println!(
        "service bench: all {rounds} rounds: batch {:.2} jobs/s, serve {:.2} jobs/s: serve/batch = {:.3} \
         (median of the rounds {:.3})",
        jobs_all / batch_total,
        jobs_all / serve_total,
        batch_total / serve_total,
        ratios[ratios.len() / 2]
    );
    rt.block_on(cleanup(&names));
}
