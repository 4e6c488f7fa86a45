//! The block cache through the runner: per row, committed only by a step that succeeded.

use super::*;

fn cached(id: &str, seed: u64, threshold: f32) -> Job {
    job(
        id,
        TaskParams::Generate(GenerateParams {
            prompt: format!("a red circle {id}"),
            steps: Some(12),
            width: Some(16),
            height: Some(16),
            seed: Some(seed),
            block_cache: Some(threshold),
            ..Default::default()
        }),
    )
}

/// (cached rows, PNG bytes) of job `id`.
fn outcome(h: &Collect, id: &str) -> (u32, Vec<u8>) {
    let r = h.results.iter().find(|r| r.job_id == id);
    let r = r.unwrap_or_else(|| panic!("no result for {id}"));
    assert_eq!(r.status, Status::Succeeded, "{id}: {:?}", r.error);
    let png = h.pngs.iter().find(|(j, i, _)| j == id && *i == 0);
    let cached = r.metrics.as_ref().map_or(0, |m| m.cached_rows);
    (cached, png.map(|p| p.2.clone()).unwrap_or_default())
}

#[test]
fn a_cached_job_gives_its_own_bytes_alone_batched_and_after_a_failed_pass() {
    let jobs = || {
        vec![
            cached("a", 1, 0.3),
            cached("b", 2, 0.3),
            cached("c", 3, 0.0),
        ]
    };
    let mut alone = Collect::default();
    run(&mut Fake::new(), jobs(), 1, &mut alone);
    let (a_cached, _) = outcome(&alone, "a");
    assert!(a_cached > 0, "the fake's latents move slowly enough to hit");
    // Batched, and with passes that fail after the cache decisions were made: each failing
    // pass is retried row by row and must find every cache as it was.
    for fail in [None, Some(3), Some(7)] {
        let mut fake = Fake::new();
        fake.fail_call = fail;
        let mut h = Collect::default();
        run(&mut fake, jobs(), 8, &mut h);
        for id in ["a", "b", "c"] {
            assert_eq!(
                outcome(&h, id),
                outcome(&alone, id),
                "{id}, failing pass {fail:?}"
            );
        }
    }
}
