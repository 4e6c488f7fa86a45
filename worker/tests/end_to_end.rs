//! The whole pipeline on the tiny fixture model: real ONNX Runtime on real exported graphs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{job, run_jobs, run_jobs_on, write_png};
use ddit_schemas::{ErrorKind, JobResult, Status};
use ddit_worker::engine::EngineConfig;
use ddit_worker::runner::{run_threads, Incoming, RunnerConfig};
use ddit_worker::tasks::input::LocalFetcher;
use ddit_worker::text::TextCodec;
use ddit_worker::WorkerError;
use serde_json::json;

fn mixed_jobs(img: &str) -> Vec<Incoming> {
    vec![
        job(
            json!({"job_id": "g1", "task": "generate", "params": {"prompt": "a red circle", "steps": 3, "seed": 1}}),
        ),
        job(
            json!({"job_id": "g2", "task": "generate", "params": {"prompt": "a blue square left of a red star", "steps": 3, "seed": 2, "num_images": 2}}),
        ),
        job(
            json!({"job_id": "g3", "task": "generate", "params": {"prompt": "two objects", "steps": 3, "seed": 3, "width": 24, "height": 12}}),
        ),
        // The speed options next to the exact jobs above: g4 (fast: the block cache) and g5
        // share passes with each other; the exact jobs keep theirs.
        job(
            json!({"job_id": "g4", "task": "generate", "params": {"prompt": "a green star", "steps": 4, "seed": 9, "speed": "fast"}}),
        ),
        job(
            json!({"job_id": "g5", "task": "generate", "params": {"prompt": "two objects", "steps": 5, "seed": 10, "num_images": 2,
                   "solver": "dpmpp2m", "guidance_interval": [0.3, 0.9], "block_cache": 0.5}}),
        ),
        job(
            json!({"job_id": "c1", "task": "caption", "params": {"image": img, "steps": 6, "seed": 4}}),
        ),
        job(
            json!({"job_id": "c2", "task": "caption", "params": {"image": img, "steps": 6, "seed": 5, "prompt": "a red"}}),
        ),
        job(
            json!({"job_id": "c3", "task": "caption", "params": {"image": img, "steps": 3, "seed": 6, "length": 6}}),
        ),
        job(
            json!({"job_id": "v1", "task": "vqa", "params": {"image": img, "question": "what colour is the square?", "steps": 5, "seed": 7}}),
        ),
        job(
            json!({"job_id": "v2", "task": "vqa", "params": {"image": img, "question": "how many objects are there?", "steps": 5, "seed": 8}}),
        ),
    ]
}

fn fingerprint(rs: &[JobResult], sink: &common::MemSink) -> Vec<String> {
    let mut v: Vec<String> = rs
        .iter()
        .map(|r| {
            let outs: Vec<String> = r
                .outputs
                .iter()
                .map(|o| format!("{}:{}x{}", o.sha256, o.width, o.height))
                .collect();
            format!(
                "{} {:?} {:?} {}",
                r.job_id,
                r.status,
                r.text,
                outs.join(",")
            )
        })
        .collect();
    let mut imgs: Vec<String> = sink
        .0
        .iter()
        .map(|(j, i, b)| format!("{j}/{i}:{}", b.len()))
        .collect();
    imgs.sort();
    v.extend(imgs);
    v
}

#[test]
fn every_task_gives_outputs_of_the_right_shape() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 40);
    let (rs, sink, hooks) = run_jobs(mixed_jobs(img.to_str().unwrap()), 8);
    assert_eq!(rs.len(), 10);
    for r in &rs {
        assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
        let m = r.metrics.as_ref().unwrap();
        assert_eq!(m.execution_provider, "cpu");
        assert!(m.batch_size >= 1);
        assert_eq!(r.model.name, "tiny-f32");
    }
    let by = |id: &str| rs.iter().find(|r| r.job_id == id).unwrap();
    assert_eq!(by("g1").outputs.len(), 1);
    assert_eq!(
        (by("g1").outputs[0].width, by("g1").outputs[0].height),
        (16, 16)
    );
    assert_eq!(by("g2").outputs.len(), 2);
    assert_eq!(by("g2").outputs[1].seed, 3);
    assert_eq!(
        (by("g3").outputs[0].width, by("g3").outputs[0].height),
        (24, 12)
    );
    for (_, _, png) in &sink.0 {
        let d = image::load_from_memory(png).unwrap();
        assert!(d.width() > 0);
    }
    assert_eq!(sink.0.len(), 7);
    // The block cache skipped rows of g5 (threshold 0.5) and only of the jobs that asked.
    let cached = |id: &str| by(id).metrics.as_ref().unwrap().cached_rows;
    assert!(cached("g5") > 0, "{:?}", by("g5").metrics);
    assert_eq!((cached("g1"), cached("g2"), cached("g3")), (0, 0, 0));
    for id in ["c1", "c2", "c3", "v1", "v2"] {
        assert!(by(id).text.is_some(), "{id}");
    }
    // A caption's text is what was written after its prompt, not an echo of the prompt.
    assert!(
        !by("c2").text.as_deref().unwrap().starts_with("a red"),
        "{:?}",
        by("c2").text
    );
    // Batching: the three generation jobs (four images) shared forward passes.
    assert!(by("g1").metrics.as_ref().unwrap().batch_size >= 3);
    assert!(!hooks.progress.is_empty());
}

#[test]
fn same_seed_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let (a, sa, _) = run_jobs(mixed_jobs(img.to_str().unwrap()), 8);
    let (b, sb, _) = run_jobs(mixed_jobs(img.to_str().unwrap()), 8);
    assert_eq!(fingerprint(&a, &sa), fingerprint(&b, &sb));
}

#[test]
fn batched_results_equal_unbatched() {
    assert_batched_equals_unbatched(common::package());
}

/// int8 too: activations are quantized per row, so a job's results do not depend on the jobs that
/// share its batch (with one scale per tensor they did).
#[test]
fn int8_batched_results_equal_unbatched() {
    assert_batched_equals_unbatched(common::int8_package());
}

/// The mixed jobs run alone (`max_batch` 1) and batched (8) on `pkg` give the same results and
/// the same PNG bytes.
fn assert_batched_equals_unbatched(pkg: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let (a, sa, _) = run_jobs_on(pkg, mixed_jobs(img.to_str().unwrap()), 1);
    let (b, sb, _) = run_jobs_on(pkg, mixed_jobs(img.to_str().unwrap()), 8);
    assert!(a
        .iter()
        .all(|r| r.metrics.as_ref().unwrap().batch_size == 1));
    assert!(b.iter().any(|r| r.metrics.as_ref().unwrap().batch_size > 1));
    assert_eq!(fingerprint(&a, &sa), fingerprint(&b, &sb));
    // PNG bytes too, not just their hashes.
    let mut pa = sa.0.clone();
    let mut pb = sb.0.clone();
    pa.sort();
    pb.sort();
    assert_eq!(pa, pb);
}

/// Results, and the threads that reported them.
#[derive(Default)]
struct ByThread {
    results: Vec<JobResult>,
    threads: std::collections::HashSet<std::thread::ThreadId>,
}

impl ddit_worker::runner::Hooks for ByThread {
    fn result(&mut self, r: JobResult) {
        self.threads.insert(std::thread::current().id());
        self.results.push(r);
    }
}

#[test]
fn runners_on_their_own_threads_give_the_results_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let (a, sa, _) = run_jobs(mixed_jobs(img.to_str().unwrap()), 4);
    let cfg = EngineConfig {
        intra_threads: 1,
        ..EngineConfig::default()
    };
    let mut engines: Vec<_> = (0..2)
        .map(|_| common::load(common::package(), &cfg).unwrap())
        .collect();
    let codec =
        TextCodec::for_package(&engines[0].tokenizer_path, &engines[0].manifest.values).unwrap();
    let mut src = common::VecSource::of(mixed_jobs(img.to_str().unwrap()));
    let mut sinks = vec![common::MemSink::default(), common::MemSink::default()];
    let mut hooks = ByThread::default();
    let runner = RunnerConfig {
        max_batch: 4,
        ..RunnerConfig::default()
    };
    run_threads(
        &mut engines,
        &codec,
        &LocalFetcher,
        &runner,
        &mut src,
        &mut sinks,
        &mut hooks,
    );
    let mut b = hooks.results.clone();
    b.sort_by(|x, y| x.job_id.cmp(&y.job_id));
    assert_eq!(hooks.threads.len(), 2, "both runners answered jobs");
    let mut sb = common::MemSink::default();
    for s in sinks {
        sb.0.extend(s.0);
    }
    assert_eq!(fingerprint(&a, &sa), fingerprint(&b, &sb));
}

fn failure(rs: &[JobResult], id: &str) -> (Status, ErrorKind, String) {
    let r = rs
        .iter()
        .find(|r| r.job_id == id)
        .unwrap_or_else(|| panic!("no result for {id}"));
    let e = r
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("{id} has no error: {r:?}"));
    (r.status, e.kind, e.message.clone())
}

#[test]
fn bad_inputs_fail_alone_with_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("in.png");
    write_png(&good, 32);
    let good = good.to_str().unwrap().to_string();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"definitely not a png").unwrap();
    // A 20000 x 20000 PNG header: refused from its header, before any decoding.
    let bomb = dir.path().join("bomb.png");
    let big = image::ImageBuffer::<image::Luma<u8>, _>::new(20000, 20000);
    big.save(&bomb).unwrap();
    let jobs = vec![
        job(json!({"job_id": "steps", "task": "generate", "params": {"prompt": "p", "steps": 0}})),
        job(
            json!({"job_id": "guid", "task": "generate", "params": {"prompt": "p", "guidance": 99.0}}),
        ),
        job(json!({"job_id": "width", "task": "generate", "params": {"prompt": "p", "width": 18}})),
        job(
            json!({"job_id": "huge", "task": "generate", "params": {"prompt": "p", "height": 4096}}),
        ),
        job(json!({"job_id": "n", "task": "generate", "params": {"prompt": "p", "num_images": 9}})),
        job(json!({"job_id": "empty", "task": "generate", "params": {"prompt": "  "}})),
        job(
            json!({"job_id": "missing", "task": "caption", "params": {"image": dir.path().join("nope.png")}}),
        ),
        job(json!({"job_id": "garbage", "task": "caption", "params": {"image": garbage}})),
        job(json!({"job_id": "bomb", "task": "caption", "params": {"image": bomb}})),
        job(
            json!({"job_id": "b64", "task": "caption", "params": {"image": "data:image/png;base64,@@@"}}),
        ),
        job(json!({"job_id": "s3", "task": "caption", "params": {"image": "s3://bucket/key.png"}})),
        job(
            json!({"job_id": "scheme", "task": "caption", "params": {"image": "http://example/x.png"}}),
        ),
        job(json!({"job_id": "len", "task": "caption", "params": {"image": good, "length": 2000}})),
        job(
            json!({"job_id": "longq", "task": "vqa", "params": {"image": good, "question": "what ".repeat(60)}}),
        ),
        job(
            json!({"job_id": "late", "task": "generate", "params": {"prompt": "p"}, "deadline": "2001-01-01T00:00:00Z"}),
        ),
        job(
            json!({"job_id": "baddate", "task": "generate", "params": {"prompt": "p"}, "deadline": "tomorrow"}),
        ),
        job(json!({"job_id": "bad id!", "task": "generate", "params": {"prompt": "p"}})),
        Incoming::Unparseable {
            job_id: "line-3".into(),
            error: WorkerError::invalid("job", "expected value"),
        },
        job(
            json!({"job_id": "ok", "task": "generate", "params": {"prompt": "a red circle", "steps": 2}}),
        ),
    ];
    let (rs, _, _) = run_jobs(jobs, 4);
    assert_eq!(rs.len(), 19);
    let expect = [
        ("steps", ErrorKind::InvalidJob, "params.steps"),
        ("guid", ErrorKind::InvalidJob, "params.guidance"),
        ("width", ErrorKind::InvalidJob, "params.width"),
        ("huge", ErrorKind::InvalidJob, "params.height"),
        ("n", ErrorKind::InvalidJob, "params.num_images"),
        ("empty", ErrorKind::InvalidJob, "params.prompt"),
        ("missing", ErrorKind::InputNotFound, "nope.png"),
        ("garbage", ErrorKind::InvalidInput, "garbage.png"),
        ("bomb", ErrorKind::InvalidInput, "exceeds"),
        ("b64", ErrorKind::InvalidInput, "base64"),
        ("s3", ErrorKind::InvalidJob, "s3://"),
        ("scheme", ErrorKind::InvalidJob, "params.image"),
        ("len", ErrorKind::InvalidJob, "params.length"),
        ("longq", ErrorKind::InvalidJob, "params.question"),
        ("baddate", ErrorKind::InvalidJob, "deadline"),
        ("bad id!", ErrorKind::InvalidJob, "job_id"),
        ("line-3", ErrorKind::InvalidJob, "job"),
    ];
    for (id, kind, needle) in expect {
        let (status, k, msg) = failure(&rs, id);
        assert_eq!(status, Status::Failed, "{id}");
        assert_eq!(k, kind, "{id}: {msg}");
        assert!(
            msg.contains(needle),
            "{id}: `{msg}` does not name `{needle}`"
        );
    }
    assert!(failure(&rs, "steps").2.contains("1..=1000"));
    let late = rs.iter().find(|r| r.job_id == "late").unwrap();
    assert_eq!(late.status, Status::Expired);
    let ok = rs.iter().find(|r| r.job_id == "ok").unwrap();
    assert_eq!(ok.status, Status::Succeeded);
}

#[test]
fn canceled_job_ends_with_a_canceled_result() {
    let (mut e, c) = common::engine();
    let mut hooks = common::Collect {
        cancel: vec!["slow".into()],
        ..Default::default()
    };
    let mut src = common::VecSource::of([
        job(json!({"job_id": "slow", "task": "generate", "params": {"prompt": "p", "steps": 50}})),
        job(json!({"job_id": "fast", "task": "generate", "params": {"prompt": "p", "steps": 2}})),
    ]);
    let mut sink = common::MemSink::default();
    ddit_worker::runner::Runner::new(
        &mut e,
        &c,
        &ddit_worker::tasks::input::LocalFetcher,
        Default::default(),
    )
    .run(&mut src, &mut sink, &mut hooks);
    let slow = hooks.results.iter().find(|r| r.job_id == "slow").unwrap();
    assert_eq!(slow.status, Status::Canceled);
    assert!(slow.outputs.is_empty());
    assert_eq!(
        hooks
            .results
            .iter()
            .find(|r| r.job_id == "fast")
            .unwrap()
            .status,
        Status::Succeeded
    );
}

/// A copy of the fixture package whose manifest names a default caption prompt.
fn package_with_caption_prompt(prompt: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, pkg) = common::copy_package();
    let path = pkg.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["values"]["caption_prompt"] = json!(prompt);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    (dir, pkg)
}

#[test]
fn caption_jobs_without_a_prompt_use_the_models_caption_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    write_png(&img, 32);
    let img = img.to_str().unwrap();
    let (_d, pkg) = package_with_caption_prompt("a red");
    let caption = |id: &str, prompt: Option<&str>| {
        let mut params = json!({"image": img, "steps": 6, "seed": 5});
        if let Some(p) = prompt {
            params["prompt"] = json!(p);
        }
        job(json!({"job_id": id, "task": "caption", "params": params}))
    };
    let jobs = vec![
        caption("default", None),
        caption("explicit", Some("a red")),
        caption("other", Some("a blue")),
    ];
    let (rs, _, _) = common::run_jobs_on(&pkg, jobs, 4);
    let text = |id: &str| {
        let r = rs.iter().find(|r| r.job_id == id).unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        r.text.clone().unwrap()
    };
    // Same canvas, same seed: the default is the manifest's prompt.
    assert_eq!(text("default"), text("explicit"));
    // The caption is the text written after the prefix, not an echo of it.
    assert!(!text("default").starts_with("a red"), "{}", text("default"));
    assert!(!text("other").starts_with("a blue"), "{}", text("other"));
}

#[test]
fn a_caption_prompt_longer_than_the_caption_canvas_is_a_package_error() {
    // The fixture's caption canvas is 10 tokens.
    let (_d, pkg) = package_with_caption_prompt(&"red ".repeat(12));
    let e = common::load(&pkg, &Default::default()).unwrap();
    let err = ddit_worker::text::TextCodec::for_package(&e.tokenizer_path, &e.manifest.values)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::ModelError);
    assert!(err.to_string().contains("values.caption_prompt"), "{err}");
}
