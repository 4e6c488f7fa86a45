//! The tally judged on small plans and made-up observations: each counter catches what it names.

use ddit_schemas::{ErrorInfo, ErrorKind, JobResult, ModelRef, Output, Status};

use super::super::jobs::{Expect, Msg, Plan};
use super::{Observed, Tally};

const LIMIT: u32 = 7;

fn msg(id: Option<&str>, body: &str, expect: Expect) -> Msg {
    Msg {
        body: body.as_bytes().to_vec(),
        id: id.map(str::to_string),
        expect,
    }
}

/// Two good jobs (the first published twice), one failing forever, one hostile, one fuzzed
/// message without an id.
fn plan() -> Plan {
    Plan {
        msgs: vec![
            msg(Some("job-1"), "gen-1", Expect::Succeeds),
            msg(Some("job-1"), "gen-1", Expect::Succeeds),
            msg(Some("job-2"), "cap-2", Expect::Succeeds),
            msg(Some("forever-0"), "forever-0", Expect::FailsForever),
            msg(Some("hostile-0"), "bomb-0", Expect::Refused),
            msg(None, "not json", Expect::Fuzz),
        ],
    }
}

fn result(id: &str, task: &str, status: Status) -> JobResult {
    JobResult {
        job_id: id.into(),
        status,
        task: Some(task.into()),
        outputs: vec![],
        text: None,
        metrics: None,
        error: None,
        attempts: Some(1),
        model: ModelRef {
            name: "tiny".into(),
            hash: "h".into(),
        },
        finished_at: "2026-12-07T00:00:00Z".into(),
    }
}

fn failed(id: &str, kind: ErrorKind, retryable: bool, attempts: u32) -> JobResult {
    let mut r = result(id, "caption", Status::Failed);
    r.attempts = Some(attempts);
    r.error = Some(ErrorInfo {
        kind,
        message: "no".into(),
        retryable,
    });
    r
}

/// What a run in which everything ended as planned leaves behind.
fn all_well() -> Observed {
    let mut gen = result("job-1", "generate", Status::Succeeded);
    gen.outputs = vec![Output {
        uri: "s3://b/job-1/0-aa.png".into(),
        width: 32,
        height: 32,
        sha256: "aa".into(),
        seed: 1,
    }];
    let mut cap = result("job-2", "caption", Status::Succeeded);
    cap.text = Some("a red circle".into());
    let results = [
        gen,
        cap,
        failed("forever-0", ErrorKind::Unavailable, true, LIMIT),
        failed("hostile-0", ErrorKind::InvalidInput, false, 1),
    ];
    let mut seen = Observed::default();
    for r in results {
        seen.announced.insert(r.job_id.clone(), 1);
        seen.results.insert(r.job_id.clone(), r);
    }
    for body in ["forever-0", "bomb-0", "not json"] {
        seen.dead.push((body.as_bytes().to_vec(), None));
    }
    seen.objects
        .insert("s3://b/job-1/0-aa.png".into(), Ok("aa".into()));
    seen
}

#[test]
fn a_run_that_ended_as_planned_is_clean() {
    let t = Tally::judge(&plan(), LIMIT, &all_well());
    assert!(t.clean(), "{}\n{}", t.line(), t.details);
    assert_eq!(
        t.line(),
        "soak: jobs=2 lost=0 duplicates=0 ran_twice=0 mismatched=0 without_result=0 \
         empty_success=0 good_dead_lettered=0 dead_lettered=3 panics=0"
    );
}

#[test]
fn a_success_without_an_image_or_a_text_is_an_empty_success() {
    let mut seen = all_well();
    seen.results.get_mut("job-1").unwrap().outputs.clear();
    seen.results.get_mut("job-2").unwrap().text = Some(" ".into());
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!((t.empty_success, t.lost), (2, 0), "{}", t.details);
    assert!(!t.clean());

    // An empty text the same job run locally answers too is the model's answer.
    seen.model_says_empty.insert("job-2".into());
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!(t.empty_success, 1, "{}", t.details);
}

#[test]
fn a_good_job_in_the_dead_letter_queue_is_flagged_even_when_it_succeeded() {
    let mut seen = all_well();
    seen.dead
        .push((b"cap-2".to_vec(), Some("attempts ran out".into())));
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!((t.good_dead_lettered, t.dead_lettered), (1, 4));
    assert!(!t.clean());
}

#[test]
fn jobs_that_never_ended_are_counted_from_the_plan() {
    let mut seen = all_well();
    seen.results.remove("job-2");
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!(t.without_result, 1, "{}", t.details);
    assert!(!t.clean());

    // Nothing observed at all: every planned id is without a result, every message that must
    // be dead-lettered is lost, and the good jobs are still counted.
    let t = Tally::judge(&plan(), LIMIT, &Observed::default());
    assert_eq!(
        (t.jobs, t.without_result, t.lost),
        (2, 4, 1),
        "{}",
        t.details
    );
}

#[test]
fn a_second_run_is_seen_even_when_only_one_result_was_stored() {
    let mut seen = all_well();
    seen.runs.insert("job-1".into(), 2);
    seen.runs.insert("job-2".into(), 1);
    // A forever-failing job runs on every attempt by design: not counted.
    seen.runs.insert("forever-0".into(), LIMIT);
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!((t.ran_twice, t.duplicates), (1, 0));
    assert!(t.clean(), "ran_twice alone fails nothing: {}", t.line());
}

#[test]
fn second_endings_are_duplicates() {
    let mut seen = all_well();
    seen.announced.insert("job-1".into(), 2);
    seen.unplanned_results.push("job-9".into());
    seen.dead.push((b"forever-0".to_vec(), None));
    seen.dead.push((b"never sent".to_vec(), None));
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!((t.duplicates, t.dead_lettered), (4, 3), "{}", t.details);
}

#[test]
fn wrong_endings_are_lost_and_wrong_bytes_mismatched() {
    let mut seen = all_well();
    // Retryable: a refusal must be final.
    seen.results.insert(
        "hostile-0".into(),
        failed("hostile-0", ErrorKind::Unavailable, true, 1),
    );
    seen.results.get_mut("forever-0").unwrap().attempts = Some(LIMIT - 1);
    seen.objects
        .insert("s3://b/job-1/0-aa.png".into(), Ok("bb".into()));
    seen.panics
        .push("thread 'x' panicked at src/lib.rs:1:1".into());
    let t = Tally::judge(&plan(), LIMIT, &seen);
    assert_eq!((t.lost, t.mismatched, t.panics), (2, 1, 1), "{}", t.details);
}
