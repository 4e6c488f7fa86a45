//! A job's cost bounds: the job timeout counted from the delivery, and the caps of `JobLimits`.

use std::time::{Duration, Instant};

use ddit_schemas::ErrorKind;

use super::*;
use crate::tasks::JobLimits;

/// Collects, sleeping `pause` at each progress report (a slow step).
struct Slow {
    inner: Collect,
    pause: Duration,
}

impl Hooks for Slow {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        std::thread::sleep(self.pause);
        self.inner.progress(job_id, step, total);
    }
    fn result(&mut self, r: JobResult) {
        self.inner.result(r);
    }
}

/// Gives each job once, delivered `ago` before it is taken.
struct Delivered {
    jobs: VecDeque<Job>,
    ago: Duration,
}

impl JobSource for Delivered {
    fn next_job(&mut self, _wait: Wait) -> Option<Incoming> {
        let job = self.jobs.pop_front()?;
        let received = Instant::now().checked_sub(self.ago);
        Some(Incoming::Job {
            job: Box::new(job),
            span: tracing::Span::none(),
            received,
        })
    }
}

fn timeout(secs: f64) -> RunnerConfig {
    RunnerConfig {
        job_timeout: Some(Duration::from_secs_f64(secs)),
        ..RunnerConfig::default()
    }
}

fn run_delivered(fake: &mut Fake, job: Job, ago: Duration, cfg: RunnerConfig) -> Collect {
    let codec = codec();
    let mut h = Collect::default();
    let mut src = Delivered {
        jobs: vec![job].into(),
        ago,
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    Runner::new(fake, &codec, &LocalFetcher, cfg).run(&mut src, &mut Sink(pngs), &mut h);
    h
}

#[test]
fn a_job_past_its_timeout_ends_expired_between_steps() {
    let mut fake = Fake::new();
    let codec = codec();
    let mut h = Slow {
        inner: Collect::default(),
        pause: Duration::from_millis(60),
    };
    let mut src = Source {
        jobs: vec![generate("slow", 50, 16, 1)].into(),
        hold: None,
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    Runner::new(&mut fake, &codec, &LocalFetcher, timeout(0.3)).run(
        &mut src,
        &mut Sink(pngs),
        &mut h,
    );
    let r = result(&h.inner, "slow");
    assert_eq!(r.status, Status::Expired);
    let msg = &r.error.as_ref().unwrap().message;
    assert!(
        msg.contains("after the delivery") && msg.contains("of 50"),
        "{msg}"
    );
    let steps = fake.calls.borrow().len();
    assert!(steps > 0 && steps < 50, "{steps} steps ran");
}

#[test]
fn the_job_timeout_counts_from_the_delivery_not_from_the_start() {
    // Delivered 2 s ago, a 1 s timeout: it never starts.
    let mut fake = Fake::new();
    let h = run_delivered(
        &mut fake,
        generate("waited", 4, 16, 1),
        Duration::from_secs(2),
        timeout(1.0),
    );
    let r = result(&h, "waited");
    assert_eq!(r.status, Status::Expired);
    let e = r.error.as_ref().unwrap();
    assert!(!e.retryable);
    assert!(
        e.message.contains("before the job started"),
        "{}",
        e.message
    );
    assert!(fake.calls.borrow().is_empty());

    // With time left it runs.
    let mut fake = Fake::new();
    let h = run_delivered(
        &mut fake,
        generate("in-time", 4, 16, 1),
        Duration::from_secs(2),
        timeout(60.0),
    );
    assert_eq!(result(&h, "in-time").status, Status::Succeeded);
}

fn limited(limits: JobLimits) -> RunnerConfig {
    RunnerConfig {
        limits,
        ..RunnerConfig::default()
    }
}

#[test]
fn a_job_over_a_cap_fails_once_naming_the_field_before_the_model_runs() {
    let limits = JobLimits {
        max_pixels: 16 * 16,
        max_side: 24,
        max_images: 2,
        max_steps: 10,
        max_text_tokens: 12,
        max_text_chars: 30,
    };
    let long_canvas = job(
        "canvas",
        TaskParams::Caption(CaptionParams {
            image: image_uri(9),
            length: Some(16),
            ..Default::default()
        }),
    );
    let mut long_prompt = generate("chars", 4, 16, 1);
    if let TaskParams::Generate(p) = &mut long_prompt.task {
        p.prompt = "a red circle left of a blue square".into();
    }
    let cases = [
        (generate("pixels", 4, 20, 1), "params.width × params.height"),
        (generate("side", 4, 28, 1), "params.width"),
        (generate("images", 4, 16, 3), "params.num_images"),
        (generate("steps", 11, 16, 1), "params.steps"),
        (caption("caption-steps", 9, 11), "params.steps"),
        (long_canvas, "params.length"),
        (long_prompt, "params.prompt"),
    ];
    for (job, field) in cases {
        let mut fake = Fake::new();
        let id = job.job_id.clone();
        let h = run_delivered(&mut fake, job, Duration::ZERO, limited(limits));
        let r = result(&h, &id);
        assert_eq!(r.status, Status::Failed, "{id}");
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidJob, "{id}");
        assert!(!e.retryable, "{id}");
        assert!(
            e.message.contains(&format!("`{field}`")),
            "{id}: {}",
            e.message
        );
        assert!(
            e.message.contains("this worker allows"),
            "{id}: {}",
            e.message
        );
        assert!(fake.calls.borrow().is_empty(), "{id}: the model ran");
    }
}

#[test]
fn a_job_within_the_caps_computes_what_it_would_without_them() {
    let jobs = || vec![generate("g", 10, 16, 2), caption("c", 9, 10)];
    let at_caps = JobLimits {
        max_pixels: 16 * 16,
        max_side: 16,
        max_images: 2,
        max_steps: 10,
        max_text_tokens: 8,
        max_text_chars: 30,
    };
    let wide = JobLimits {
        max_pixels: u64::MAX,
        max_side: u32::MAX,
        max_images: u32::MAX,
        max_steps: u32::MAX,
        max_text_tokens: u32::MAX,
        max_text_chars: usize::MAX,
    };
    let mut outputs = Vec::new();
    for limits in [at_caps, wide] {
        let mut h = Collect::default();
        run_with(&mut Fake::new(), jobs(), limited(limits), &mut h, None);
        assert!(h.results.iter().all(|r| r.status == Status::Succeeded));
        let text = result(&h, "c").text.clone();
        outputs.push((h.pngs, text));
    }
    assert_eq!(outputs[0], outputs[1]);
}
