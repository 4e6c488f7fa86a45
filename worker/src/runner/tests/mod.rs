//! The runner's scheduling, tested with a fake model (no ONNX Runtime): join and leave between
//! steps, grouping by shape and chunking at `max_batch`, cancellation, the caption cache, a
//! failing chunk, and batched == unbatched.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use base64::Engine as _;
use ddit_schemas::{CaptionParams, GenerateParams, Job, JobResult, Status, TaskParams, VqaParams};

use super::*;
use crate::tasks::input::LocalFetcher;

mod cache;
mod fake;
mod handoff;
mod stages;
mod timeout;

use fake::{codec, Call, Fake};

/// Jobs released one by one; `hold` keeps the rest back from a call that does not wait until the
/// model has made that many calls (a call that waits, up to a deadline or not, gets them).
struct Source {
    jobs: VecDeque<Job>,
    hold: Option<(usize, Rc<RefCell<Vec<Call>>>)>,
}

impl JobSource for Source {
    fn next_job(&mut self, wait: Wait) -> Option<Incoming> {
        if let Some((after, calls)) = &self.hold {
            if wait == Wait::No && calls.borrow().len() < *after {
                return None;
            }
        }
        self.jobs.pop_front().map(Incoming::job)
    }
}

#[derive(Default)]
struct Collect {
    results: Vec<JobResult>,
    progress: Vec<(String, usize)>,
    cancel: Option<(String, usize)>,
    pngs: Vec<(String, u32, Vec<u8>)>,
}

impl Hooks for Collect {
    fn progress(&mut self, job_id: &str, step: usize, _total: usize) {
        self.progress.push((job_id.to_string(), step));
    }
    fn canceled(&mut self, job_id: &str) -> bool {
        self.cancel.as_ref().is_some_and(|(id, after)| {
            id == job_id && self.progress.iter().filter(|(j, _)| j == id).count() >= *after
        })
    }
    fn result(&mut self, r: JobResult) {
        self.results.push(r);
    }
}

/// PNGs by (job id, index).
type Pngs = Vec<(String, u32, Vec<u8>)>;

struct Sink(Rc<RefCell<Pngs>>);
impl ImageSink for Sink {
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], _seed: u64) -> Result<String> {
        self.0
            .borrow_mut()
            .push((job_id.into(), index, png.to_vec()));
        Ok(format!("mem://{job_id}/{index}"))
    }
}

fn run(model: &mut Fake, jobs: Vec<Job>, max_batch: usize, hooks: &mut Collect) {
    run_held(model, jobs, max_batch, hooks, None)
}

fn run_held(
    model: &mut Fake,
    jobs: Vec<Job>,
    max_batch: usize,
    hooks: &mut Collect,
    hold: Option<usize>,
) {
    let cfg = RunnerConfig {
        max_batch,
        ..RunnerConfig::default()
    };
    run_with(model, jobs, cfg, hooks, hold)
}

fn run_with(
    model: &mut Fake,
    jobs: Vec<Job>,
    cfg: RunnerConfig,
    hooks: &mut Collect,
    hold: Option<usize>,
) {
    let codec = codec();
    let pngs = Rc::new(RefCell::new(Vec::new()));
    let mut src = Source {
        jobs: jobs.into(),
        hold: hold.map(|n| (n, model.calls.clone())),
    };
    Runner::new(model, &codec, &LocalFetcher, cfg).run(&mut src, &mut Sink(pngs.clone()), hooks);
    hooks.pngs = pngs.take();
}

fn job(id: &str, task: TaskParams) -> Job {
    Job {
        job_id: id.into(),
        task,
        deadline: None,
        submitted_at: None,
    }
}

fn generate(id: &str, steps: u32, width: u32, images: u32) -> Job {
    job(
        id,
        TaskParams::Generate(GenerateParams {
            prompt: format!("a red circle {id}"),
            steps: Some(steps),
            width: Some(width),
            height: Some(16),
            seed: Some(7),
            num_images: Some(images),
            ..Default::default()
        }),
    )
}

fn image_uri(shade: u8) -> String {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([shade, (x * 9) as u8, (y * 5) as u8])
    });
    let png = crate::image_io::encode_png(&img).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn caption(id: &str, shade: u8, steps: u32) -> Job {
    job(
        id,
        TaskParams::Caption(CaptionParams {
            image: image_uri(shade),
            steps: Some(steps),
            seed: Some(3),
            ..Default::default()
        }),
    )
}

fn vqa(id: &str, shade: u8) -> Job {
    job(
        id,
        TaskParams::Vqa(VqaParams {
            image: image_uri(shade),
            question: "what colour is the circle?".into(),
            steps: Some(8),
            seed: Some(5),
        }),
    )
}

fn result<'a>(h: &'a Collect, id: &str) -> &'a JobResult {
    h.results.iter().find(|r| r.job_id == id).unwrap()
}

/// What a job produced: image bytes or text.
fn outcome(h: &Collect, id: &str) -> (Status, Vec<String>, Option<String>) {
    let r = result(h, id);
    let images = r.outputs.iter().map(|o| o.sha256.clone()).collect();
    (r.status, images, r.text.clone())
}

fn mixed_jobs() -> Vec<Job> {
    vec![
        generate("g1", 4, 16, 2),
        caption("c1", 200, 16),
        generate("g2", 3, 16, 1),
        vqa("v1", 40),
        generate("g3", 4, 32, 1),
        caption("c2", 90, 12),
    ]
}

#[test]
fn batched_equals_unbatched_and_alone() {
    let mut batched = Collect::default();
    run(&mut Fake::new(), mixed_jobs(), 8, &mut batched);
    let mut one_row = Collect::default();
    run(&mut Fake::new(), mixed_jobs(), 1, &mut one_row);
    for j in mixed_jobs() {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j.clone()], 8, &mut alone);
        let want = outcome(&alone, &j.job_id);
        assert_eq!(want.0, Status::Succeeded, "{:?}", result(&alone, &j.job_id));
        assert_eq!(outcome(&batched, &j.job_id), want, "{}", j.job_id);
        assert_eq!(outcome(&one_row, &j.job_id), want, "{}", j.job_id);
    }
    assert_eq!(batched.results.len(), 6);
    // Batching really happened: some job shared a pass.
    assert!(batched
        .results
        .iter()
        .any(|r| r.metrics.as_ref().unwrap().batch_size > 1));
    assert!(one_row
        .results
        .iter()
        .all(|r| r.metrics.as_ref().unwrap().batch_size == 1));
}

#[test]
fn rows_group_by_shape_and_chunk_at_max_batch() {
    let mut fake = Fake::new();
    let mut h = Collect::default();
    // 16x16 (3 images, 1 image) and 32x16: two groups; max_batch 3 admits 16x16 x3 first.
    let jobs = vec![
        generate("a", 2, 16, 3),
        generate("b", 2, 32, 1),
        generate("c", 2, 16, 1),
    ];
    run(&mut fake, jobs, 3, &mut h);
    let calls = fake.calls.borrow().clone();
    let rows: Vec<(usize, usize)> = calls.iter().map(|c| (c.rows, c.shape[3])).collect();
    // Tick 1-2: job a alone (3 rows, CFG doubles them: 6). Then b (32 wide) and c (16 wide)
    // join and run in separate groups, 16-wide first (group keys sort by shape).
    assert_eq!(rows, vec![(6, 8), (6, 8), (2, 8), (2, 16), (2, 8), (2, 16)]);
    // With max_batch 2, job a's 3 rows are chunked 2 + 1 in every step.
    let mut fake = Fake::new();
    run(
        &mut fake,
        vec![generate("a", 2, 16, 3)],
        2,
        &mut Collect::default(),
    );
    let rows: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    assert_eq!(rows, vec![4, 2, 4, 2]);
}

#[test]
fn jobs_join_and_leave_between_steps() {
    let mut fake = Fake::new();
    let mut h = Collect::default();
    // a: 6 steps; b (2 steps) and c (2 steps) are held back until the model has made 3 calls.
    let jobs = vec![
        generate("a", 6, 16, 1),
        generate("b", 2, 16, 1),
        generate("c", 2, 16, 1),
    ];
    run_held(&mut fake, jobs, 2, &mut h, Some(3));
    let rows: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    // a alone for 3 steps; b joins (max_batch 2 keeps c out) for 2; b leaves and c joins a for
    // a's last step; c finishes alone. CFG doubles every row.
    assert_eq!(rows, vec![2, 2, 2, 4, 4, 4, 2]);
    let order: Vec<&str> = h.results.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(order, vec!["b", "a", "c"]);
    assert!(h.results.iter().all(|r| r.status == Status::Succeeded));
}

#[test]
fn an_idle_runner_admits_the_jobs_arriving_in_its_batch_window_before_its_first_pass() {
    let mut fake = Fake::new();
    let mut h = Collect::default();
    let cfg = RunnerConfig {
        max_batch: 2,
        batch_window: std::time::Duration::from_millis(10),
        ..RunnerConfig::default()
    };
    // As above, but b arrives in the window a's arrival opened; c, held back until the model has
    // made 3 calls, joins only between steps (the window is over once the first pass ran).
    let jobs = vec![
        generate("a", 6, 16, 1),
        generate("b", 2, 16, 1),
        generate("c", 2, 16, 1),
    ];
    run_with(&mut fake, jobs, cfg, &mut h, Some(3));
    let rows: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    assert_eq!(rows, vec![4, 4, 2, 4, 4, 2]);
    let order: Vec<&str> = h.results.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(order, vec!["b", "c", "a"]);
}

#[test]
fn a_canceled_job_leaves_between_steps_and_the_rest_finish() {
    let mut fake = Fake::new();
    let mut h = Collect {
        cancel: Some(("a".into(), 2)),
        ..Collect::default()
    };
    run(
        &mut fake,
        vec![generate("a", 6, 16, 1), generate("b", 6, 16, 1)],
        4,
        &mut h,
    );
    assert_eq!(result(&h, "a").status, Status::Canceled);
    assert_eq!(result(&h, "b").status, Status::Succeeded);
    let rows: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    // Two shared steps, then b alone for its last four.
    assert_eq!(rows, vec![4, 4, 2, 2, 2, 2]);
    assert!(h.pngs.iter().all(|(id, _, _)| id == "b"));
}

#[test]
fn caption_steps_reuse_the_cache_without_a_forward_pass() {
    let mut fake = Fake::new();
    let mut h = Collect::default();
    run(&mut fake, vec![caption("c", 120, 64)], 8, &mut h);
    let r = result(&h, "c");
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.metrics.as_ref().unwrap().steps, 64);
    // Seven masked tokens (caption canvas 8, one for `</s>`-free text) change at most 8 times
    // in 64 steps: every other step reuses the cached probabilities.
    let passes = fake.calls.borrow().len();
    assert!(
        (1..=9).contains(&passes),
        "{passes} forward passes for 64 steps"
    );
}

#[test]
fn a_failing_chunk_fails_only_its_rows() {
    let mut fake = Fake::new();
    // max_batch 2: a and b share the first pass (call 0); c runs in call 1, which fails.
    fake.fail_call = Some(1);
    let mut h = Collect::default();
    let jobs = vec![
        generate("a", 3, 16, 1),
        generate("b", 3, 16, 1),
        generate("c", 3, 32, 1),
    ];
    run_held(&mut fake, jobs, 4, &mut h, None);
    let status = |id| result(&h, id).status;
    assert_eq!(
        (status("a"), status("b"), status("c")),
        (Status::Succeeded, Status::Succeeded, Status::Failed)
    );
    let e = result(&h, "c").error.clone().unwrap();
    assert!(e.message.contains("injected failure"), "{}", e.message);
    assert_eq!(h.results.len(), 3);
}

#[test]
fn seeded_runs_repeat_exactly() {
    let mut first = Collect::default();
    run(&mut Fake::new(), mixed_jobs(), 3, &mut first);
    let mut second = Collect::default();
    run(&mut Fake::new(), mixed_jobs(), 3, &mut second);
    for j in mixed_jobs() {
        assert_eq!(outcome(&first, &j.job_id), outcome(&second, &j.job_id));
    }
    assert_eq!(first.pngs, second.pngs);
}

fn guided(id: &str, guidance: f32) -> Job {
    let mut j = generate(id, 3, 16, 1);
    if let TaskParams::Generate(p) = &mut j.task {
        p.guidance = Some(guidance);
        p.prompt = "a red circle".into();
    }
    j
}

#[test]
fn guidance_one_or_zero_runs_only_the_row_it_needs() {
    // Alone: w = 1 needs the conditional row only, w = 0 the unconditional one, w = 7 both.
    for (w, rows) in [(1.0, 1), (0.0, 1), (7.0, 2)] {
        let mut fake = Fake::new();
        run(&mut fake, vec![guided("g", w)], 4, &mut Collect::default());
        let got: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
        assert_eq!(got, vec![rows; 3], "guidance {w}");
    }
    // Together: 2 + 1 + 1 rows a step, and each image is the one it gets alone.
    let jobs = || vec![guided("w1", 1.0), guided("w0", 0.0), guided("w7", 7.0)];
    let mut fake = Fake::new();
    let mut together = Collect::default();
    run(&mut fake, jobs(), 4, &mut together);
    let got: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    assert_eq!(got, vec![4; 3]);
    let mut images = Vec::new();
    for j in jobs() {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j.clone()], 4, &mut alone);
        let want = outcome(&alone, &j.job_id);
        assert_eq!(outcome(&together, &j.job_id), want, "{}", j.job_id);
        images.push(want.1);
    }
    // The same prompt and seed: w = 1 (v = v_c), w = 0 (v = v_u) and w = 7 differ.
    assert!(images[0] != images[1] && images[0] != images[2] && images[1] != images[2]);
}

fn asking(id: &str, shade: u8, question: &str) -> Job {
    let mut j = vqa(id, shade);
    if let TaskParams::Vqa(p) = &mut j.task {
        p.question = question.into();
    }
    j
}

#[test]
fn a_panicking_row_fails_alone_and_its_batch_mates_match_their_solo_runs() {
    let fine = || {
        vec![
            asking("a", 60, "what colour?"),
            asking("b", 90, "what shape?"),
        ]
    };
    let mut alone = Collect::default();
    run(&mut Fake::new(), fine(), 1, &mut alone);
    let mut fake = Fake::new();
    fake.poison = Some(-0.6);
    let mut h = Collect::default();
    let mut jobs = fine();
    jobs.insert(1, asking("p", 250, "is it a zebra?"));
    run(&mut fake, jobs, 4, &mut h);
    assert_eq!(h.results.len(), 3);
    let p = result(&h, "p");
    assert_eq!(p.status, Status::Failed);
    let e = p.error.clone().unwrap();
    assert!(
        e.message.contains("panic in a step: poisoned row"),
        "{}",
        e.message
    );
    for id in ["a", "b"] {
        assert_eq!(
            result(&h, id).status,
            Status::Succeeded,
            "{:?}",
            result(&h, id).error
        );
        assert_eq!(
            outcome(&h, id),
            outcome(&alone, id),
            "{id} changed by the retry"
        );
    }
    // The first pass held all three rows; after it panicked each row ran alone.
    let calls = fake.calls.borrow();
    assert_eq!(calls[0].rows, 3);
    assert!(calls[1..4].iter().all(|c| c.rows == 1), "{calls:?}");
}

#[test]
fn a_job_past_its_timeout_when_it_starts_ends_expired_unplanned() {
    let mut fake = Fake::new();
    let mut h = Collect::default();
    let cfg = RunnerConfig {
        job_timeout: Some(std::time::Duration::ZERO),
        ..RunnerConfig::default()
    };
    run_with(
        &mut fake,
        vec![generate("slow", 50, 16, 1)],
        cfg,
        &mut h,
        None,
    );
    let r = result(&h, "slow");
    assert_eq!(r.status, Status::Expired);
    let msg = &r.error.as_ref().unwrap().message;
    assert!(msg.contains("before the job started"), "{msg}");
    assert!(fake.calls.borrow().is_empty());
}
