//! One ONNX Runtime thread pool per process: loading every segment's session adds the pool's
//! threads once, not a pool per session. (Its own test binary: the pool is made with the
//! process's first engine, and no other test may run beside it while threads are counted.)
#![allow(clippy::unwrap_used)]

mod common;

use ddit_worker::engine::EngineConfig;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn every_session_runs_on_the_one_shared_pool() {
    let before = threads();
    let cfg = EngineConfig {
        intra_threads: 4,
        ..EngineConfig::default()
    };
    let engine = common::load(common::package(), &cfg).unwrap();
    let sessions = engine.manifest.segments.len();
    let added = threads() - before;
    // A pool of 4 is the caller plus 3 workers; a pool per session would add 3 per segment.
    assert!(sessions >= 6, "{sessions} segments");
    assert!(
        added <= 4,
        "{added} threads added for {sessions} sessions (intra_threads 4)"
    );
}
