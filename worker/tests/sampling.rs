//! Samplers against diffusers' committed numbers and against their definitions.
#![allow(clippy::unwrap_used)]

mod common;

use ddit_worker::sampler::flow::{schedule, FlowState, Sampling};
use ddit_worker::sampler::rng::JobRng;

#[test]
fn flow_schedule_matches_diffusers() {
    let text =
        std::fs::read_to_string(common::workspace().join("tests/fixtures/scheduler.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for (name, c) in all.as_object().unwrap() {
        let steps = c["steps"].as_u64().unwrap() as usize;
        let shift = c["shift"].as_f64().unwrap();
        let t = c["num_train_timesteps"].as_u64().unwrap() as usize;
        let (sigmas, timesteps) = schedule(steps, shift, t);
        let want_s: Vec<f32> = c["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let want_t: Vec<f32> = c["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(sigmas, want_s, "{name}: sigmas");
        assert_eq!(timesteps, want_t, "{name}: timesteps");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn euler_with_guidance_follows_the_formula() {
    let mut rng = JobRng::new(5);
    let mut s = FlowState::new([1, 2, 2], &mut rng, 10, &Sampling::euler(3.0, 1000, 7.0));
    let x0 = s.latents.data.clone();
    let (sigmas, _) = schedule(10, 3.0, 1000);
    // v_u = 1, v_c = 2: v = 1 + 7·(2 − 1) = 8 everywhere; Σ dt = σ_end − σ_start = −1.
    while !s.done() {
        s.apply(&[1.0; 4], &[2.0; 4]);
    }
    for (a, b) in s.latents.data.iter().zip(&x0) {
        let expect = b + 8.0 * (sigmas[10] - sigmas[0]);
        assert!((a - expect).abs() < 1e-5, "{a} vs {expect}");
    }
}

#[test]
fn initial_latents_are_seeded_normals() {
    let a = FlowState::new(
        [4, 3, 5],
        &mut JobRng::new(9),
        4,
        &Sampling::euler(1.0, 1000, 1.0),
    );
    let b = FlowState::new(
        [4, 3, 5],
        &mut JobRng::new(9),
        4,
        &Sampling::euler(1.0, 1000, 1.0),
    );
    let c = FlowState::new(
        [4, 3, 5],
        &mut JobRng::new(10),
        4,
        &Sampling::euler(1.0, 1000, 1.0),
    );
    assert_eq!(a.latents, b.latents);
    assert_ne!(a.latents, c.latents);
    assert_eq!(a.latents.shape, vec![1, 4, 3, 5]);
}
