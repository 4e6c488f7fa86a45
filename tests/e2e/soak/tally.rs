//! The soak test's counters: the published plan judged against what the services hold at the
//! end. Every counter starts from the plan (what was sent, and what each message must end as);
//! what was observed only answers for the planned messages, and whatever it holds beyond them
//! (a result or a dead letter nobody planned) is a duplicate.

use std::collections::{BTreeMap, HashMap, HashSet};

use ddit_schemas::{ErrorKind, JobResult, Status};

use super::jobs::{Expect, Plan};

/// What the services held when the soak ended (`observe::gather`).
#[derive(Default)]
pub struct Observed {
    /// The stored result of each planned id that has one.
    pub results: HashMap<String, JobResult>,
    /// Ids with a stored result that no planned message carries.
    pub unplanned_results: Vec<String>,
    /// How many times each id was announced on `{prefix}:results` (once per stored result).
    pub announced: HashMap<String, u32>,
    /// Every message of the dead-letter queue: body and `x-ddit-reason`.
    pub dead: Vec<(Vec<u8>, Option<String>)>,
    /// Runs of each job seen doing work: its progress stream starting over (a step at or below
    /// the one before), or a worker logging that its finished copy lost to a stored result.
    pub runs: HashMap<String, u32>,
    /// The sha256 each named output's object has (or why it could not be read), by URI.
    pub objects: HashMap<String, Result<String, String>>,
    /// Good jobs that succeeded with an empty text which the same job run locally
    /// (`ddit-worker caption`/`vqa`, same model, inputs and seed) answers with too.
    pub model_says_empty: HashSet<String>,
    /// Lines of the workers' logs that report a panic.
    pub panics: Vec<String>,
}

#[derive(Default, Debug, PartialEq, Eq)]
pub struct Tally {
    pub jobs: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub ran_twice: usize,
    pub mismatched: usize,
    pub without_result: usize,
    pub empty_success: usize,
    pub good_dead_lettered: usize,
    pub dead_lettered: usize,
    pub panics: usize,
    pub details: String,
}

/// A succeeded result with nothing in it: no image from `generate`, no text from the others.
fn empty(r: &JobResult) -> bool {
    match r.task.as_deref() {
        Some("generate") => r.outputs.is_empty() || r.outputs.iter().any(|o| o.sha256.is_empty()),
        _ => r.text.as_deref().is_none_or(|t| t.trim().is_empty()),
    }
}

/// Whether a result is the refusal a hostile job's plan expects: failed, and final.
fn refused(r: &JobResult) -> bool {
    r.status == Status::Failed && r.error.as_ref().is_some_and(|e| !e.retryable)
}

impl Tally {
    pub fn judge(plan: &Plan, delivery_limit: u32, seen: &Observed) -> Self {
        let mut t = Self {
            jobs: plan.good_ids().len(),
            ..Self::default()
        };
        t.endings(plan, delivery_limit, seen);
        t.dead_letters(plan, seen);
        t.second_results(plan, seen);
        t.second_runs(plan, seen);
        t.outputs(seen);
        t.panics = seen.panics.len();
        for l in &seen.panics {
            t.note(format!("panic: {l}"));
        }
        t
    }

    fn note(&mut self, line: String) {
        self.details.push_str(&line);
        self.details.push('\n');
    }

    /// Each planned id against the ending its plan names.
    fn endings(&mut self, plan: &Plan, limit: u32, seen: &Observed) {
        let mut judged = HashSet::new();
        for m in &plan.msgs {
            let Some(id) = &m.id else { continue };
            if !judged.insert(id) {
                continue; // the second copy of a job published twice
            }
            let Some(r) = seen.results.get(id) else {
                self.without_result += 1;
                self.note(format!("{id}: no result ({:?})", m.expect));
                continue;
            };
            let ok = match m.expect {
                Expect::Succeeds if seen.model_says_empty.contains(id) => {
                    self.note(format!("{id}: an empty text, as the same job run locally"));
                    r.status == Status::Succeeded
                }
                Expect::Succeeds if r.status == Status::Succeeded && empty(r) => {
                    self.empty_success += 1;
                    self.note(format!("{id}: succeeded with nothing in it: {r:?}"));
                    continue;
                }
                Expect::Succeeds => r.status == Status::Succeeded,
                Expect::FailsForever => {
                    r.status == Status::Failed
                        && r.attempts == Some(limit)
                        && (r.error.as_ref()).is_some_and(|e| e.kind == ErrorKind::Unavailable)
                }
                Expect::Refused => refused(r),
                Expect::Fuzz => true,
            };
            if !ok {
                self.lost += 1;
                self.note(format!(
                    "{id}: ended {:?} after {:?} attempts: {:?}",
                    r.status, r.attempts, r.error
                ));
            }
        }
    }

    /// Each dead letter is matched to a planned message by its body. A message must be there
    /// when it has no usable id or its job ended `failed`, and must not be when its job is a
    /// good one; a dead letter no planned message accounts for is a second ending.
    fn dead_letters(&mut self, plan: &Plan, seen: &Observed) {
        let mut left: HashMap<&[u8], usize> = HashMap::new();
        for (body, _) in &seen.dead {
            *left.entry(body.as_slice()).or_default() += 1;
        }
        for m in &plan.msgs {
            let failed = (m.id.as_ref())
                .and_then(|id| seen.results.get(id))
                .is_some_and(|r| r.status == Status::Failed);
            let must = m.id.is_none() || (failed && m.expect != Expect::Succeeds);
            let there = left.get_mut(m.body.as_slice()).filter(|n| **n > 0);
            let shown = String::from_utf8_lossy(&m.body[..m.body.len().min(80)]).into_owned();
            match there {
                Some(n) => {
                    *n -= 1;
                    self.dead_lettered += 1;
                    if m.expect == Expect::Succeeds {
                        self.good_dead_lettered += 1;
                        self.note(format!("a good job dead-lettered: {shown}"));
                    }
                }
                None if must => {
                    self.lost += 1;
                    self.note(format!("not dead-lettered: {shown:?}"));
                }
                None => {}
            }
        }
        let extra: usize = left.values().sum();
        if extra > 0 {
            self.duplicates += extra;
            self.note(format!(
                "{extra} dead letters no planned message accounts for"
            ));
        }
        let reasonless = seen.dead.iter().filter(|(_, r)| r.is_none()).count();
        self.note(format!(
            "dead letters: {} ({reasonless} without an x-ddit-reason: failed jobs, whose reason is their result)",
            seen.dead.len()
        ));
    }

    /// A planned id announced more than once stored a second result; a result under an id no
    /// planned message carries is one too.
    fn second_results(&mut self, plan: &Plan, seen: &Observed) {
        let planned: HashSet<String> = plan.result_ids().into_iter().collect();
        let announced: BTreeMap<&String, &u32> = seen.announced.iter().collect();
        for (id, n) in announced {
            if *n > 1 && planned.contains(id.as_str()) {
                self.duplicates += (*n - 1) as usize;
                self.note(format!("{id}: {n} results announced"));
            }
        }
        for id in &seen.unplanned_results {
            self.duplicates += 1;
            self.note(format!("a result nobody asked for: {id}"));
        }
    }

    /// Good jobs that more than one run worked on (informational: a SIGKILL makes some).
    fn second_runs(&mut self, plan: &Plan, seen: &Observed) {
        let mut twice: Vec<(&str, u32)> = plan
            .good_ids()
            .into_iter()
            .filter_map(|id| Some((id, *seen.runs.get(id)?)))
            .filter(|(_, n)| *n > 1)
            .collect();
        twice.sort_unstable();
        self.ran_twice = twice.len();
        let some: Vec<_> = twice.iter().take(8).collect();
        self.note(format!("ran more than once: {} {some:?}", twice.len()));
    }

    /// Every output a stored result names is in S3 with its sha256.
    fn outputs(&mut self, seen: &Observed) {
        let mut named: Vec<(&String, &String)> = (seen.results.values())
            .flat_map(|r| &r.outputs)
            .map(|o| (&o.uri, &o.sha256))
            .collect();
        named.sort_unstable();
        for (uri, sha) in named {
            let found = seen.objects.get(uri).cloned();
            let found = found.unwrap_or_else(|| Err("never read".into()));
            if found.as_ref() != Ok(sha) {
                self.mismatched += 1;
                self.note(format!("{uri}: {found:?} but the result says {sha}"));
            }
        }
    }

    pub fn clean(&self) -> bool {
        self.lost
            + self.duplicates
            + self.mismatched
            + self.without_result
            + self.empty_success
            + self.good_dead_lettered
            + self.panics
            == 0
    }

    pub fn line(&self) -> String {
        format!(
            "soak: jobs={} lost={} duplicates={} ran_twice={} mismatched={} without_result={} \
             empty_success={} good_dead_lettered={} dead_lettered={} panics={}",
            self.jobs,
            self.lost,
            self.duplicates,
            self.ran_twice,
            self.mismatched,
            self.without_result,
            self.empty_success,
            self.good_dead_lettered,
            self.dead_lettered,
            self.panics
        )
    }
}

#[cfg(test)]
#[path = "tally_tests.rs"]
mod tests;
