//! Running jobs handed from a busy runner to an idle one. When a burst's last jobs are running and
//! there is nothing left to admit, a runner that has run out of jobs would otherwise leave its
//! core idle while another runner still steps a full batch; instead the busy runner hands it half
//! of its jobs between two steps. A job moves with all of its state (sampler, RNG, span, times),
//! and every runner of a process holds the same model, so what a job computes does not change.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::work::Active;

/// How long an idle runner waits here before it looks at its job source again.
pub(super) const POLL: Duration = Duration::from_millis(10);

/// What the runners of one process share. A job is in exactly one place at a time: a runner's
/// active jobs or `jobs` here, moved under the lock.
#[derive(Default)]
pub struct Handoff {
    state: Mutex<State>,
    offered: Condvar,
}

#[derive(Default)]
struct State {
    /// Runners that hold jobs.
    busy: usize,
    /// Idle runners waiting in [`Handoff::take`].
    waiting: usize,
    jobs: Vec<Active>,
}

impl Handoff {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few counter updates or a `Vec` move: nothing is left half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle runners waiting for jobs here now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Whether any runner holds jobs (the caller is idle, so not the caller).
    pub(super) fn others_busy(&self) -> bool {
        self.lock().busy > 0
    }

    /// Jobs handed off, up to `max_rows` rows (at least one job): those here, or whatever another
    /// runner offers within `wait` (none, when it offers nothing).
    pub(super) fn take(&self, max_rows: usize, wait: Duration) -> Vec<Active> {
        let mut s = self.lock();
        if s.jobs.is_empty() && !wait.is_zero() {
            s.waiting += 1;
            s = self
                .offered
                .wait_timeout_while(s, wait, |s| s.jobs.is_empty())
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            s.waiting -= 1;
        }
        let mut rows = 0;
        let n = s
            .jobs
            .iter()
            .take_while(|a| {
                rows += a.rows();
                rows <= max_rows.max(a.rows())
            })
            .count();
        s.jobs.drain(..n).collect()
    }

    /// Moves the later half of `active` here when a runner is waiting for jobs.
    pub(super) fn offer(&self, active: &mut Vec<Active>) {
        if active.len() < 2 {
            return;
        }
        let mut s = self.lock();
        if s.waiting == 0 {
            return;
        }
        let half = active.split_off(active.len() - active.len() / 2);
        tracing::debug!(jobs = half.len(), "handing jobs to an idle runner");
        s.jobs.extend(half);
        self.offered.notify_all();
    }
}

/// A runner's place in a [`Handoff`]: counts it busy while it holds jobs, until dropped (also when
/// its thread unwinds), so that idle runners never wait on one that is gone.
pub(super) struct Member {
    pub handoff: Arc<Handoff>,
    busy: bool,
}

impl Member {
    pub fn new(handoff: Arc<Handoff>) -> Self {
        Self {
            handoff,
            busy: false,
        }
    }

    pub fn set_busy(&mut self, busy: bool) {
        if busy != self.busy {
            let mut s = self.handoff.lock();
            if busy {
                s.busy += 1;
            } else {
                s.busy -= 1;
            }
            self.busy = busy;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.set_busy(false);
    }
}
