//! Jobs handed between the runners of one process (`runner::Handoff`).

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// Collects, and holds its runner before the first step until `go` is set (a minute at most).
/// The runner asks `canceled` once per job at admission, then before each step: the hold
/// comes after the admissions (`admissions` of them).
struct Held {
    inner: Collect,
    go: Option<Arc<AtomicBool>>,
    admissions: usize,
}

impl Hooks for Held {
    fn canceled(&mut self, _job_id: &str) -> bool {
        if self.admissions > 0 {
            self.admissions -= 1;
            return false;
        }
        let t = std::time::Instant::now();
        if let Some(go) = self.go.take() {
            while !go.load(Ordering::SeqCst) && t.elapsed().as_secs() < 60 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        false
    }
    fn result(&mut self, result: JobResult) {
        self.inner.result(result)
    }
}

/// Runs `jobs` (and with `handed`, jobs already running) on a runner of its own model that shares
/// `handoff`: its results (images in `pngs`) and the rows of each of its forward passes.
fn run_sharing(
    jobs: Vec<Job>,
    handed: Vec<Active>,
    handoff: Arc<Handoff>,
    go: Option<Arc<AtomicBool>>,
) -> (Collect, Vec<usize>) {
    let (mut fake, codec) = (Fake::new(), codec());
    let mut h = Held {
        inner: Collect::default(),
        go,
        admissions: jobs.len(),
    };
    let pngs = Rc::new(RefCell::new(Vec::new()));
    let cfg = RunnerConfig {
        max_batch: 2,
        ..RunnerConfig::default()
    };
    let mut src = Source {
        jobs: jobs.into(),
        hold: None,
    };
    let mut runner = Runner::new(&mut fake, &codec, &LocalFetcher, cfg).with_handoff(handoff);
    runner.active = handed;
    runner.run(&mut src, &mut Sink(pngs.clone()), &mut h);
    h.inner.pngs = pngs.take();
    let rows = fake.calls.borrow().iter().map(|c| c.rows).collect();
    (h.inner, rows)
}

#[test]
fn an_idle_runner_takes_half_of_a_busy_runners_jobs_and_each_job_ends_once_as_it_would_alone() {
    let jobs = || vec![generate("a", 20, 16, 1), generate("b", 20, 16, 1)];
    let mut alone = Collect::default();
    run(&mut Fake::new(), jobs(), 2, &mut alone);

    // An idle runner: it waits on the handoff (as a runner does while another is busy, there in
    // short slices) until jobs come, then steps them on its own model.
    // The busy runner is held before its first step until the idle one has taken what it handed
    // over (a runner left alone would take back jobs that nobody took).
    let handoff = Handoff::new();
    let go = Arc::new(AtomicBool::new(false));
    let idle = std::thread::spawn({
        let (handoff, go) = (handoff.clone(), go.clone());
        move || {
            let handed = handoff.take(2, std::time::Duration::from_secs(60));
            go.store(true, Ordering::SeqCst);
            let ids: Vec<String> = handed.iter().map(|a| a.job.job_id.clone()).collect();
            (ids, run_sharing(vec![], handed, handoff, None))
        }
    });
    let t = std::time::Instant::now();
    while handoff.waiting() == 0 {
        assert!(t.elapsed().as_secs() < 60, "the idle runner never waited");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (busy, busy_rows) = run_sharing(jobs(), vec![], handoff.clone(), Some(go));
    let (handed, (idle, idle_rows)) = idle.join().unwrap();

    // The busy runner admitted both, kept a and handed b over before its first step; b's steps
    // ran on the other runner (one row and its CFG twin a pass); each job has one result.
    assert_eq!(handed, vec!["b"]);
    let ids = |h: &Collect| {
        h.results
            .iter()
            .map(|r| r.job_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&busy), vec!["a"]);
    assert_eq!(ids(&idle), vec!["b"]);
    assert_eq!((busy_rows, idle_rows), (vec![2; 20], vec![2; 20]));
    for h in [&busy, &idle] {
        for r in &h.results {
            assert_eq!(r.status, Status::Succeeded);
            assert_eq!(r.outputs, result(&alone, &r.job_id).outputs);
        }
        for png in &h.pngs {
            assert!(
                alone.pngs.contains(png),
                "{} differs from its run alone",
                png.0
            );
        }
    }
    assert_eq!(busy.pngs.len() + idle.pngs.len(), alone.pngs.len());
}
