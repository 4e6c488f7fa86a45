//! The speed options of a generate job (solver, guidance interval, block cache, the `fast`
//! preset) on the tiny fixture model: real ONNX Runtime on real exported graphs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{job, run_jobs};
use ddit_schemas::{Job, JobResult, Role, Status};
use ddit_worker::engine::Package;
use ddit_worker::runner::Incoming;
use ddit_worker::tasks::{plan, JobLimits, Plan, SpeedOptions};
use serde_json::{json, Value};

/// A generate job with `extra` params on top of a fixed prompt, seed and 8 steps.
fn gen(id: &str, extra: Value) -> Incoming {
    job(gen_json(id, extra))
}

fn gen_json(id: &str, extra: Value) -> Value {
    let mut params = json!({"prompt": "a blue square left of a red star", "steps": 8, "seed": 3});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    json!({"job_id": id, "task": "generate", "params": params})
}

/// Each job's (result, PNG bytes of its first image).
fn run(jobs: Vec<Incoming>, max_batch: usize) -> Vec<(JobResult, Vec<u8>)> {
    let (rs, sink, _) = run_jobs(jobs, max_batch);
    rs.into_iter()
        .map(|r| {
            assert_eq!(r.status, Status::Succeeded, "{}: {:?}", r.job_id, r.error);
            let png = sink.0.iter().find(|(j, i, _)| *j == r.job_id && *i == 0);
            let png = png.map(|(_, _, b)| b.clone()).unwrap();
            (r, png)
        })
        .collect()
}

fn cached_rows(r: &JobResult) -> u32 {
    r.metrics.as_ref().unwrap().cached_rows
}

#[test]
fn a_block_cache_that_never_hits_gives_the_exact_bytes_alone_and_batched() {
    let alone = run(vec![gen("a-exact", json!({}))], 8);
    let mixed = run(
        vec![
            gen("a-exact", json!({})),
            gen("b-never", json!({"block_cache": 1e-9})),
            gen("c-cached", json!({"block_cache": 0.5, "seed": 4})),
        ],
        8,
    );
    // The cached jobs share passes with each other, not with the exact one.
    let batch = |i: usize| mixed[i].0.metrics.as_ref().unwrap().batch_size;
    assert_eq!((batch(0), batch(1), batch(2)), (1, 2, 2));
    assert_eq!(alone[0].1, mixed[0].1, "an exact job next to cached ones");
    assert_eq!(
        alone[0].1, mixed[1].1,
        "a cache that never hits, batched with one that does"
    );
    assert_eq!(cached_rows(&mixed[1].0), 0);
    assert!(cached_rows(&mixed[2].0) > 0);
}

#[test]
fn a_block_cache_skips_rows_and_stays_near_the_exact_image() {
    let rs = run(
        vec![
            gen("a-exact", json!({})),
            gen("b-cached", json!({"block_cache": 0.5})),
        ],
        1,
    );
    // 8 steps × 2 rows: the first step of each row always computes.
    let skipped = cached_rows(&rs[1].0);
    assert!((1..=14).contains(&skipped), "{skipped}");
    assert_ne!(rs[0].1, rs[1].1);
    let psnr = psnr(&rs[0].1, &rs[1].1);
    assert!(psnr > 20.0, "PSNR {psnr:.1} dB against the exact image");
}

/// Peak signal-to-noise ratio of two 8-bit images, in dB.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (
        image::load_from_memory(a).unwrap().to_rgb8(),
        image::load_from_memory(b).unwrap().to_rgb8(),
    );
    let n = a.as_raw().len() as f64;
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / n;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

#[test]
fn a_guidance_interval_outside_every_step_is_guidance_one_and_around_every_step_is_exact() {
    let jobs = || {
        vec![
            gen("a-exact", json!({})),
            gen("b-all", json!({"guidance_interval": [0.0, 1.0]})),
            gen("c-none", json!({"guidance_interval": [0.0, 0.0]})),
            gen("d-w1", json!({"guidance": 1.0})),
            gen("e-half", json!({"guidance_interval": [0.0, 0.5]})),
        ]
    };
    let (rs, alone) = (run(jobs(), 8), run(jobs(), 1));
    assert_eq!(rs[0].1, rs[1].1);
    assert_eq!(rs[2].1, rs[3].1);
    assert_ne!(rs[0].1, rs[4].1);
    assert_ne!(rs[3].1, rs[4].1);
    for (b, a) in rs.iter().zip(&alone) {
        assert_eq!(b.1, a.1, "{} batched and alone", b.0.job_id);
    }
}

#[test]
fn the_second_order_solver_is_seeded_and_batch_independent() {
    let jobs = || {
        vec![
            gen("a-dpm", json!({"solver": "dpmpp2m"})),
            gen("b-euler", json!({"seed": 9})),
        ]
    };
    let (alone, batched, again) = (run(jobs(), 1), run(jobs(), 8), run(jobs(), 8));
    for i in 0..2 {
        assert_eq!(
            alone[i].1, batched[i].1,
            "{} alone and batched",
            alone[i].0.job_id
        );
        assert_eq!(batched[i].1, again[i].1, "{} run twice", alone[i].0.job_id);
    }
    let euler = run(vec![gen("a-euler", json!({}))], 1);
    assert_ne!(alone[0].1, euler[0].1);
}

fn plan_of(v: Value, m: &ddit_schemas::Manifest) -> ddit_worker::Result<Plan> {
    plan(
        &serde_json::from_value::<Job>(v).unwrap(),
        m,
        &JobLimits::DEFAULT,
    )
}

#[test]
fn the_fast_preset_sets_its_steps_unless_the_job_does() {
    let m = Package::open(common::package()).unwrap().manifest;
    let steps = |extra| match plan_of(gen_json("p", extra), &m).unwrap() {
        Plan::Generate(g) => (g.steps, g.speed),
        _ => unreachable!(),
    };
    let mut no_steps = gen_json("p", json!({"speed": "fast"}));
    no_steps["params"].as_object_mut().unwrap().remove("steps");
    let Plan::Generate(g) = plan_of(no_steps, &m).unwrap() else {
        unreachable!()
    };
    assert_eq!(
        (g.steps, g.speed),
        (SpeedOptions::FAST_STEPS, SpeedOptions::FAST)
    );
    assert_eq!(steps(json!({"speed": "fast"})), (8, SpeedOptions::FAST));
    // The documented preset (README, docs/fast-modes.md, the job schema).
    assert_eq!(SpeedOptions::FAST_STEPS, 16);
    assert_eq!(SpeedOptions::FAST.block_cache, 0.1);
    assert_eq!(SpeedOptions::FAST.solver, ddit_schemas::Solver::Euler);
    assert_eq!(SpeedOptions::FAST.guidance_interval, None);
    assert_eq!(steps(json!({})), (8, SpeedOptions::EXACT));
}

#[test]
fn a_package_without_block_0_alone_refuses_the_block_cache_and_runs_fast_without_it() {
    let mut m = Package::open(common::package()).unwrap().manifest;
    let first = m
        .segments
        .iter_mut()
        .find(|s| s.role == Role::JointBlocks)
        .unwrap();
    assert_eq!(
        first.blocks,
        Some([0, 1]),
        "the exporter writes block 0 alone"
    );
    first.blocks = Some([0, 2]);
    let err = plan_of(gen_json("p", json!({"block_cache": 0.1})), &m).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("params.block_cache") && msg.contains("blocks 0 to 1"),
        "{msg}"
    );
    assert!(plan_of(gen_json("p", json!({})), &m).is_ok());
    let Plan::Generate(g) = plan_of(gen_json("p", json!({"speed": "fast"})), &m).unwrap() else {
        unreachable!()
    };
    assert_eq!(
        (g.speed.block_cache, g.steps),
        (0.0, 8),
        "fast without the cache"
    );
}

#[test]
fn bad_speed_options_fail_the_job_naming_the_field() {
    let (rs, _, _) = run_jobs(
        vec![
            job(gen_json("a", json!({"guidance_interval": [0.9, 0.1]}))),
            job(gen_json("b", json!({"block_cache": 2.0}))),
        ],
        8,
    );
    for (r, field) in rs
        .iter()
        .zip(["params.guidance_interval", "params.block_cache"])
    {
        assert_eq!(r.status, Status::Failed);
        let e = r.error.as_ref().unwrap();
        assert!(e.message.contains(field), "{}: {}", r.job_id, e.message);
    }
}
