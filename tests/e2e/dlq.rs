//! `ddit-worker dlq replay` against the real RabbitMQ and Redis: letters dead-lettered by the
//! broker (a rejected delivery, as the worker rejects) and one without a job id (as the worker
//! publishes it), listed by `--dry-run` without moving, moved back with `--max 1` and in full,
//! a job with a `failed` result kept until `--rerun` drops that result.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_worker::adapters::amqp::{self, Message};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use redis::AsyncCommands;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn job(id: &str) -> Vec<u8> {
    format!(r#"{{"job_id":"{id}","task":"generate","params":{{"prompt":"a red circle"}}}}"#)
        .into_bytes()
}

/// Publishes `bodies` to the work queue (`x-ddit-attempts` 4, a `traceparent`) and rejects each
/// delivery, so the broker dead-letters them with an `x-death` record; then publishes a letter
/// without a job id straight to the dead-letter exchange, as the worker does.
async fn dead_letter(names: &Names, bodies: &[Vec<u8>]) {
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-dlq-setup").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare(&ch, &cfg).await.unwrap();
    for b in bodies {
        let mut headers = FieldTable::default();
        headers.insert("x-ddit-attempts".into(), AMQPValue::LongUInt(4));
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(TRACEPARENT)),
        );
        let m = Message {
            exchange: "",
            routing_key: &cfg.queue,
            body: b,
            headers,
            expiration_ms: None,
        };
        amqp::publish(&ch, m).await.unwrap();
        let got = ch
            .basic_get(cfg.queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got.delivery.data, b);
        let reject = BasicRejectOptions { requeue: false };
        got.delivery.acker.reject(reject).await.unwrap();
    }
    let mut headers = FieldTable::default();
    headers.insert(
        "x-ddit-reason".into(),
        AMQPValue::LongString(LongString::from("not JSON")),
    );
    let m = Message {
        exchange: &cfg.dead_letter_exchange,
        routing_key: "",
        body: b"\xffnot json",
        headers,
        expiration_ms: None,
    };
    amqp::publish(&ch, m).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Waits until `queue` holds `n` messages; returns what it holds.
async fn settle(names: &Names, queue: &str, n: u32) -> u32 {
    let start = Instant::now();
    loop {
        let d = queue_depth(names, queue).await;
        if d == n || start.elapsed() > Duration::from_secs(10) {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `dlq replay` with `args`; returns its stdout lines (the last is the summary).
fn replay(names: &Names, args: &[&str]) -> Vec<String> {
    let out = client_command(names, "dlq")
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(String::from).collect()
}

fn count(lines: &[String], prefix: &str) -> usize {
    lines.iter().filter(|l| l.starts_with(prefix)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_letters_back_with_their_bodies() {
    let names = Names::new("dlq");
    let ids = ["gw:alice:1", "plain-2", "failed-3"].map(|i| format!("{i}-{}", names.id));
    let bodies: Vec<Vec<u8>> = ids.iter().map(|i| job(i)).collect();
    let mut r = redis().await;
    let p = &names.redis_prefix;
    let failed = format!(
        r#"{{"job_id":"{}","status":"failed","error":{{"kind":"model_error","message":"x","retryable":false}}}}"#,
        ids[2]
    );
    let _: () = r
        .set(format!("{p}:result:{}", ids[2]), failed)
        .await
        .unwrap();
    let _: () = r.set(format!("{p}:attempts:{}", ids[0]), 5).await.unwrap();
    dead_letter(&names, &bodies).await;
    assert_eq!(settle(&names, &names.dlq, 4).await, 4);

    // The dry run lists every letter and moves nothing.
    let lines = replay(&names, &["--dry-run"]);
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert_eq!(count(&lines, "would-replay "), 2, "{lines:#?}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with(&format!("would-replay {} ", ids[0]))
            && l.contains("reason=rejected deaths=1")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with(&format!("kept {} ", ids[2]))
            && l.contains("result=failed:model_error")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("kept - reason=not JSON")));
    assert!(
        lines[4].contains("4 waiting, 4 read, 2 replayed"),
        "{}",
        lines[4]
    );
    assert_eq!(settle(&names, &names.dlq, 4).await, 4);
    assert_eq!(queue_depth(&names, &names.queue).await, 0);
    let attempts: Option<u32> = r.get(format!("{p}:attempts:{}", ids[0])).await.unwrap();
    assert_eq!(attempts, Some(5), "a dry run deletes nothing");

    // `--max 1` reads one letter.
    let lines = replay(&names, &["--max", "1"]);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[1].contains("4 waiting, 1 read"), "{}", lines[1]);
    let moved = count(&lines, "replayed ") as u32;
    assert_eq!(settle(&names, &names.dlq, 4 - moved).await, 4 - moved);
    assert_eq!(settle(&names, &names.queue, moved).await, moved);

    // A full run moves the rest of the jobs without a result; the failed one and the one
    // without an id stay.
    let lines = replay(&names, &[]);
    assert_eq!(count(&lines, "replayed "), 2 - moved as usize, "{lines:#?}");
    assert!(lines
        .last()
        .unwrap()
        .contains("1 kept with a result, 1 kept without a job id"));
    assert_eq!(settle(&names, &names.dlq, 2).await, 2);
    assert_eq!(settle(&names, &names.queue, 2).await, 2);
    let attempts: Option<u32> = r.get(format!("{p}:attempts:{}", ids[0])).await.unwrap();
    assert_eq!(attempts, None, "a replay starts the attempts over");

    // `--rerun` drops the failed result and replays that job; a larger --max reads only what waits.
    let lines = replay(&names, &["--rerun", "--max", "100"]);
    assert!(
        lines.iter().any(
            |l| l.starts_with(&format!("replayed {} ", ids[2])) && l.contains("result dropped")
        ),
        "{lines:#?}"
    );
    assert!(lines
        .last()
        .unwrap()
        .contains("2 waiting, 2 read, 1 replayed (1 results dropped)"));
    let result: Option<String> = r.get(format!("{p}:result:{}", ids[2])).await.unwrap();
    assert_eq!(result, None);
    assert_eq!(settle(&names, &names.dlq, 1).await, 1);
    assert_eq!(settle(&names, &names.queue, 3).await, 3);

    // The work queue holds the same bodies, without death or attempt headers.
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-dlq-check").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    let opts = BasicGetOptions { no_ack: true };
    while let Some(m) = ch.basic_get(cfg.queue.as_str().into(), opts).await.unwrap() {
        let props = &m.delivery.properties;
        assert_eq!(
            amqp::header(props, "traceparent").as_deref(),
            Some(TRACEPARENT)
        );
        assert_eq!(amqp::header_count(props, "x-ddit-attempts"), None);
        let h = props.headers().clone().unwrap_or_default();
        assert!(!h.contains_key("x-death"), "{h:?}");
        got.push(m.delivery.data.clone());
    }
    let _ = conn.close(200, "done".into()).await;
    got.sort();
    let mut want = bodies.clone();
    want.sort();
    assert_eq!(got, want);
    cleanup(&names).await;
}

/// A worker that stored a job's `failed` result and died before rejecting its delivery leaves a
/// redelivered message: the next worker sends it to the dead-letter queue, as the first would
/// have, instead of acking it away. A fresh copy of a job that already failed (not a
/// redelivery) is acked: one dead letter per failed job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_failed_job_is_dead_lettered_and_a_fresh_copy_acked() {
    let names = Names::new("dlq-redelivered");
    let ids = ["died-1", "copy-2"].map(|i| format!("{i}-{}", names.id));
    let mut r = redis().await;
    for id in &ids {
        let failed = format!(
            r#"{{"job_id":"{id}","status":"failed","error":{{"kind":"invalid_job","message":"x","retryable":false}},"model":{{"name":"m","hash":"h"}},"finished_at":"2026-12-07T00:00:00Z"}}"#
        );
        let key = format!("{}:result:{id}", names.redis_prefix);
        let _: () = r.set(key, failed).await.unwrap();
    }
    publish(&names, &[job(&ids[0])]).await;
    // The dying worker: takes the delivery and goes away without settling it.
    let cfg = names.amqp();
    let conn = amqp::connect(&cfg, "e2e-dying").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(cfg.queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap();
    assert!(got.is_some());
    let _ = conn.close(200, "died".into()).await;
    publish(&names, &[job(&ids[1])]).await;

    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut w = Worker::start(&names, &model, dir.path(), "w", &[]);
    w.wait_ready(Duration::from_secs(60));
    let start = Instant::now();
    while queue_depth(&names, &names.queue).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(settle(&names, &names.dlq, 1).await, 1, "{}", w.log_text());
    let letters = take_dead_letters(&names).await;
    let bodies: Vec<Vec<u8>> = letters.into_iter().map(|(b, _)| b).collect();
    assert_eq!(bodies, vec![job(&ids[0])], "{}", w.log_text());
    w.sigterm();
    cleanup(&names).await;
}
