//! The gateway's submit-to-queued latency against publishing directly with confirms, on the same
//! broker in the same run. A benchmark, not a timed test: it prints the medians and their ratio.
//! Run by `scripts/bench.sh gateway` (`cargo test -p ddit-e2e --test gateway_bench -- --ignored`).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ddit_e2e::gateway::{token_line, Gateway};
use ddit_e2e::*;
use ddit_worker::adapters::amqp;
use serde_json::json;

fn median_ms(mut xs: Vec<Duration>) -> f64 {
    xs.sort();
    xs[xs.len() / 2].as_secs_f64() * 1e3
}

fn job(i: usize, prefix: &str) -> serde_json::Value {
    json!({"job_id": format!("{prefix}-{i}"), "task": "generate", "params": {"prompt": "a red circle", "steps": 4, "seed": i}})
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh gateway"]
fn gateway_submit_to_queued_latency_against_direct_publishing() {
    let n: usize = var("DDIT_BENCH_JOBS", "1000").parse().unwrap();
    let names = Names::new("gwbench");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Through the gateway, limits on (set high enough for the run): one keep-alive HTTP
    // connection from an async client on the same runtime, each POST until its 202; jobs without
    // ids (the gateway assigns them) and jobs with an Idempotency-Key (claimed before publishing).
    // Direct: one channel, each publish awaited to its confirm. The three alternate job by job,
    // so that each sees the same queue length and machine state.
    let tokens = token_line("bench", "bench-token", ":100000000:100000000");
    let gw = Gateway::start(&names, dir.path(), "gw", &tokens, &[]);
    let http = reqwest::Client::new();
    let url = gw.url("/v1/jobs");
    let post = |i: usize, key: bool| {
        let mut body = job(i, "gw");
        body.as_object_mut().unwrap().remove("job_id");
        let mut req = http.post(&url).bearer_auth("bench-token");
        if key {
            req = req.header("idempotency-key", format!("bench-{i}"));
        }
        let req = req
            .header("content-type", "application/json")
            .body(body.to_string());
        async move {
            let t = Instant::now();
            let r = req.send().await.unwrap();
            let took = t.elapsed();
            assert_eq!(r.status().as_u16(), 202);
            took
        }
    };
    let health = gw.ops_url("/healthz");
    let (direct, fresh, keyed, bare) = rt.block_on(async {
        let cfg = names.amqp();
        let conn = amqp::connect(&cfg, "bench-direct").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        amqp::declare(&ch, &cfg).await.unwrap();
        let (mut direct, mut fresh, mut keyed, mut bare) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let body = job(i, "direct").to_string();
            let t = Instant::now();
            amqp::publish_job(&ch, &cfg.queue, body.as_bytes(), None)
                .await
                .unwrap();
            direct.push(t.elapsed());
            fresh.push(post(i, false).await);
            keyed.push(post(i, true).await);
            // The floor: a bare HTTP round trip to the same server.
            let t = Instant::now();
            http.get(&health)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            bare.push(t.elapsed());
        }
        let _ = conn.close(200, "done".into()).await;
        (direct, fresh, keyed, bare)
    });
    let depth = rt.block_on(queue_depth(&names, &names.queue));
    assert_eq!(depth as usize, 3 * n, "every job is on the queue once");
    let (d, f, k) = (median_ms(direct), median_ms(fresh), median_ms(keyed));
    println!(
        "gateway bench: jobs={n} direct_median_ms={d:.3} gateway_median_ms={f:.3} ratio={:.2}",
        f / d
    );
    println!(
        "gateway bench: with Idempotency-Key: gateway_median_ms={k:.3} ratio={:.2}",
        k / d
    );
    println!(
        "gateway bench: bare HTTP round trip (/healthz) median_ms={:.3}",
        median_ms(bare)
    );
    rt.block_on(cleanup(&names));
}
