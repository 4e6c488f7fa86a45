//! The circuit breaker: `--breaker-threshold` consecutive forward passes or job preparations
//! that fail with a device fault ([`WorkerError::Device`]) open it, and it stays open until the
//! process ends. Open, the worker stops consuming, its runners give back every job they hold
//! (requeued without charging an attempt), and `/healthz` and `/readyz` fail, so that the
//! orchestrator restarts the pod on a fresh device context. A successful forward pass resets the
//! count; other errors (a job's own, an allocation that failed) neither count nor reset it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::error::WorkerError;

pub struct Breaker {
    /// Consecutive device faults that open it; 0: never opens.
    threshold: u32,
    run: AtomicU32,
    open: AtomicBool,
    /// The fault that opened it.
    cause: Mutex<Option<String>>,
}

impl Breaker {
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold,
            run: AtomicU32::new(0),
            open: AtomicBool::new(false),
            cause: Mutex::new(None),
        }
    }

    /// A forward pass succeeded.
    pub fn success(&self) {
        self.run.store(0, Ordering::SeqCst);
    }

    /// Counts `e` if it is a device fault; returns whether this call opened the breaker.
    pub fn failure(&self, e: &WorkerError) -> bool {
        if !matches!(e, WorkerError::Device { .. }) || self.threshold == 0 {
            return false;
        }
        let run = self.run.fetch_add(1, Ordering::SeqCst).saturating_add(1);
        if run < self.threshold || self.open.swap(true, Ordering::SeqCst) {
            return false;
        }
        if let Ok(mut c) = self.cause.lock() {
            *c = Some(e.to_string());
        }
        tracing::error!(
            consecutive = run,
            "circuit breaker open: stopping consumption and giving back the jobs in hand: {e}"
        );
        true
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// Why it is open (for `/healthz` and `/readyz`), or `None` while closed.
    pub fn problem(&self) -> Option<String> {
        if !self.is_open() {
            return None;
        }
        let cause = self.cause.lock().ok().and_then(|c| c.clone());
        Some(format!(
            "circuit breaker open after {} consecutive device faults (last: {}); restart the worker",
            self.threshold,
            cause.unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> WorkerError {
        WorkerError::runtime(
            "joint_blocks",
            "CUDA failure 719: unspecified launch failure",
        )
    }

    #[test]
    fn consecutive_device_faults_open_it_and_a_success_resets_the_count() {
        let b = Breaker::new(3);
        assert!(!b.failure(&device()));
        assert!(!b.failure(&device()));
        b.success();
        assert!(!b.failure(&device()));
        assert!(!b.failure(&device()));
        // Neither a job's out-of-memory nor a model error counts or resets.
        assert!(!b.failure(&WorkerError::runtime("x", "CUDA failure 2: out of memory")));
        assert!(!b.failure(&WorkerError::runtime("x", "invalid dimensions")));
        assert!(b.problem().is_none());
        assert!(b.failure(&device()), "the third in a row opens it");
        assert!(b.is_open());
        assert!(!b.failure(&device()), "it opens once");
        b.success();
        assert!(b.is_open(), "it stays open");
        let p = b.problem().unwrap_or_default();
        assert!(
            p.contains("3 consecutive") && p.contains("unspecified launch failure"),
            "{p}"
        );
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let b = Breaker::new(0);
        for _ in 0..100 {
            assert!(!b.failure(&device()));
        }
        assert!(!b.is_open());
    }
}
