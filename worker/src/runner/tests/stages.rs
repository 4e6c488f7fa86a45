//! The stages around the steps: input images read off the inference thread, the prompts of jobs
//! admitted together encoded in one pass, the images of jobs finishing together decoded in one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::*;
use crate::tasks::input::{Fetched, InputFetcher};

/// A gate a slow read waits at.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Waits until it opens or `limit` passes; whether it opened.
    fn wait(&self, limit: Duration) -> bool {
        let open = self.open.lock().unwrap();
        let (open, _) = self
            .opened
            .wait_timeout_while(open, limit, |open| !*open)
            .unwrap();
        *open
    }
}

/// Reads `slow:URI` on a thread of its own once the gate opens (or after 3 s, as a slow object
/// store would answer at last), and every other URI at once.
struct SlowReads {
    gate: Arc<Gate>,
    /// Whether the slow read waited until the gate opened.
    waited_for_gate: Arc<AtomicBool>,
}

impl InputFetcher for SlowReads {
    fn fetch(&self, uri: &str, done: Fetched) {
        let Some(inner) = uri.strip_prefix("slow:") else {
            return LocalFetcher.fetch(uri, done);
        };
        let (gate, waited, inner) = (
            self.gate.clone(),
            self.waited_for_gate.clone(),
            inner.to_string(),
        );
        std::thread::spawn(move || {
            waited.store(gate.wait(Duration::from_secs(3)), Ordering::SeqCst);
            LocalFetcher.fetch(&inner, done);
        });
    }
}

/// Collects, and opens the gate when `opener`'s result comes.
struct OpenOn {
    inner: Collect,
    opener: &'static str,
    gate: Arc<Gate>,
}

impl Hooks for OpenOn {
    fn result(&mut self, r: JobResult) {
        if r.job_id == self.opener {
            self.gate.open();
        }
        self.inner.result(r);
    }
}

#[test]
fn a_slow_input_read_holds_up_only_its_own_job() {
    let mut slow = caption("c", 120, 8);
    if let TaskParams::Caption(p) = &mut slow.task {
        p.image = format!("slow:{}", p.image);
    }
    // The caption's read answers only once the generate job has its result (or after 3 s).
    let jobs = vec![slow, generate("g", 6, 16, 1)];
    let gate = Arc::new(Gate::default());
    let reads = SlowReads {
        gate: gate.clone(),
        waited_for_gate: Arc::default(),
    };
    let mut h = OpenOn {
        inner: Collect::default(),
        opener: "g",
        gate,
    };
    let (mut fake, codec) = (Fake::new(), codec());
    let mut src = Source {
        jobs: jobs.into(),
        hold: None,
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    Runner::new(&mut fake, &codec, &reads, RunnerConfig::default()).run(
        &mut src,
        &mut Sink(pngs),
        &mut h,
    );
    // Every step of g ran while the caption's image was being read, and g ended first.
    assert!(
        reads.waited_for_gate.load(Ordering::SeqCst),
        "the read blocked the runner: g could not step while it waited"
    );
    let order: Vec<&str> = h.inner.results.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(order, vec!["g", "c"]);
    let kinds: Vec<&str> = fake.calls.borrow().iter().map(|c| c.kind).collect();
    assert_eq!(kinds[..6], ["velocity"; 6]);
    assert!(kinds[6..].iter().all(|k| *k == "logits"), "{kinds:?}");
    // Both computed what they compute alone.
    for j in [caption("c", 120, 8), generate("g", 6, 16, 1)] {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j.clone()], 8, &mut alone);
        assert_eq!(outcome(&h.inner, &j.job_id), outcome(&alone, &j.job_id));
    }
}

#[test]
fn a_job_canceled_while_its_input_is_read_ends_canceled_without_a_step() {
    let mut slow = caption("c", 120, 8);
    if let TaskParams::Caption(p) = &mut slow.task {
        p.image = format!("slow:{}", p.image);
    }
    let gate = Arc::new(Gate::default());
    let reads = SlowReads {
        gate: gate.clone(),
        waited_for_gate: Arc::default(),
    };
    // Canceled after its admission (the one progress-free check), while its read waits.
    struct CancelAfterAdmission(Collect, usize);
    impl Hooks for CancelAfterAdmission {
        fn canceled(&mut self, _job_id: &str) -> bool {
            self.1 += 1;
            self.1 > 1
        }
        fn result(&mut self, r: JobResult) {
            self.0.result(r);
        }
    }
    let mut h = CancelAfterAdmission(Collect::default(), 0);
    let (mut fake, codec) = (Fake::new(), codec());
    let mut src = Source {
        jobs: vec![slow].into(),
        hold: None,
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    Runner::new(&mut fake, &codec, &reads, RunnerConfig::default()).run(
        &mut src,
        &mut Sink(pngs),
        &mut h,
    );
    gate.open();
    assert_eq!(h.0.results.len(), 1);
    assert_eq!(result(&h.0, "c").status, Status::Canceled);
    assert!(fake.calls.borrow().is_empty());
    assert!(fake.stages.borrow().is_empty());
}

/// Drops every read unanswered, as a read task that panicked does.
struct LostReads;

impl InputFetcher for LostReads {
    fn fetch(&self, _uri: &str, done: Fetched) {
        drop(done);
    }
}

#[test]
fn a_read_that_never_answers_fails_its_job_as_transient() {
    let (mut fake, codec) = (Fake::new(), codec());
    let mut h = Collect::default();
    let mut src = Source {
        jobs: vec![vqa("v", 40), generate("g", 2, 16, 1)].into(),
        hold: None,
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    // Without an answer it would wait for its job timeout, and end expired.
    let cfg = RunnerConfig {
        job_timeout: Some(Duration::from_secs(3)),
        ..RunnerConfig::default()
    };
    Runner::new(&mut fake, &codec, &LostReads, cfg).run(&mut src, &mut Sink(pngs), &mut h);
    let e = result(&h, "v").error.clone().unwrap();
    assert!(
        e.retryable && e.message.contains("without an answer"),
        "{e:?}"
    );
    assert_eq!(result(&h, "g").status, Status::Succeeded);
}

fn stages(fake: &Fake, kind: &str) -> Vec<(usize, Vec<usize>)> {
    let stages = fake.stages.borrow();
    let of_kind = stages.iter().filter(|c| c.kind == kind);
    of_kind.map(|c| (c.rows, c.shape.clone())).collect()
}

#[test]
fn the_prompts_of_jobs_admitted_together_share_one_text_encoder_pass() {
    let jobs = || {
        vec![
            generate("a", 2, 16, 1),
            vqa("v", 40),
            generate("b", 3, 32, 2),
            generate("c", 2, 16, 1),
        ]
    };
    let mut fake = Fake::new();
    let mut h = Collect::default();
    run(&mut fake, jobs(), 8, &mut h);
    // [negative, positive] for each of a, b and c, the prompt length 8.
    assert_eq!(stages(&fake, "encode_text"), vec![(6, vec![6, 8])]);
    // max_batch 2: a and v are admitted (two rows), then b (two images), then c.
    let mut fake = Fake::new();
    let mut two = Collect::default();
    run(&mut fake, jobs(), 2, &mut two);
    let rows: Vec<usize> = stages(&fake, "encode_text").iter().map(|s| s.0).collect();
    assert_eq!(rows, vec![2, 2, 2]);
    for j in jobs() {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j.clone()], 8, &mut alone);
        assert_eq!(outcome(&h, &j.job_id), outcome(&alone, &j.job_id));
        assert_eq!(outcome(&two, &j.job_id), outcome(&alone, &j.job_id));
    }
}

#[test]
fn the_images_of_jobs_finishing_together_are_decoded_together() {
    let jobs = || {
        vec![
            generate("a", 3, 16, 2),
            generate("b", 3, 32, 1),
            caption("c", 90, 3),
            generate("d", 3, 16, 1),
            generate("e", 5, 16, 1),
        ]
    };
    let mut fake = Fake::new();
    let mut h = Collect::default();
    run(&mut fake, jobs(), 8, &mut h);
    // a and d (three 16-wide images) in one pass, b (32 wide) in another; e two steps later.
    assert_eq!(
        stages(&fake, "vae_decode"),
        vec![
            (3, vec![3, 4, 8, 8]),
            (1, vec![1, 4, 8, 16]),
            (1, vec![1, 4, 8, 8])
        ]
    );
    // At most `decode_batch` images a pass.
    let mut fake = Fake::new();
    let mut two = Collect::default();
    let cfg = RunnerConfig {
        decode_batch: 2,
        ..RunnerConfig::default()
    };
    run_with(&mut fake, jobs(), cfg, &mut two, None);
    let rows: Vec<usize> = stages(&fake, "vae_decode").iter().map(|s| s.0).collect();
    assert_eq!(rows, vec![2, 1, 1, 1]);
    // At most `decode_pixels` pixels a pass: two 16 × 16 images, or one 32 × 16.
    let mut fake = Fake::new();
    let mut small = Collect::default();
    let cfg = RunnerConfig {
        decode_pixels: 2 * 16 * 16,
        ..RunnerConfig::default()
    };
    run_with(&mut fake, jobs(), cfg, &mut small, None);
    let rows: Vec<usize> = stages(&fake, "vae_decode").iter().map(|s| s.0).collect();
    assert_eq!(rows, vec![2, 1, 1, 1]);
    for j in jobs() {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j.clone()], 1, &mut alone);
        let want = outcome(&alone, &j.job_id);
        assert_eq!(want.0, Status::Succeeded);
        assert_eq!(outcome(&h, &j.job_id), want, "{}", j.job_id);
        assert_eq!(outcome(&two, &j.job_id), want, "{}", j.job_id);
        assert_eq!(outcome(&small, &j.job_id), want, "{}", j.job_id);
    }
    // The PNGs themselves, in the order each job stored them.
    let mut alone_pngs = Vec::new();
    for j in jobs() {
        let mut alone = Collect::default();
        run(&mut Fake::new(), vec![j], 1, &mut alone);
        alone_pngs.extend(alone.pngs);
    }
    let mut batched = h.pngs.clone();
    batched.sort();
    alone_pngs.sort();
    assert_eq!(batched, alone_pngs);
}

#[test]
fn an_input_read_in_place_adds_no_wait_for_more_jobs() {
    // v2 is held back from a call that does not wait until the model has made one call: v1's
    // image (a data URI) is read at its admission, so the runner asks without waiting and steps
    // v1 alone first.
    let mut fake = Fake::new();
    let mut h = Collect::default();
    run_held(
        &mut fake,
        vec![vqa("v1", 40), vqa("v2", 90)],
        8,
        &mut h,
        Some(1),
    );
    let rows: Vec<usize> = fake.calls.borrow().iter().map(|c| c.rows).collect();
    assert_eq!(rows[..2], [1, 2], "{rows:?}");
    assert!(h.results.iter().all(|r| r.status == Status::Succeeded));
}
