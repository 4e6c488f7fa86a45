//! The serde types and the JSON Schema files describe the same messages.
#![allow(clippy::unwrap_used)]

use ddit_schemas::*;
use serde_json::{json, Value};

fn validator(schema: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&serde_json::from_str::<Value>(schema).unwrap()).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, value: &Value) {
    let errs: Vec<String> = v
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errs.is_empty(), "{value}: {errs:#?}");
}

fn jobs() -> Vec<Value> {
    vec![
        json!({"job_id": "g-1", "task": "generate", "params": {"prompt": "a red circle"}}),
        json!({"job_id": "g-2", "task": "generate", "params": {"prompt": "a red circle", "negative_prompt": "blue",
               "steps": 10, "guidance": 4.5, "width": 32, "height": 32, "seed": 7, "num_images": 2,
               "speed": "fast", "solver": "dpmpp2m", "guidance_interval": [0.25, 0.875], "block_cache": 0.125},
               "deadline": "2026-12-01T00:00:00Z", "submitted_at": "2026-11-30T00:00:00Z"}),
        json!({"job_id": "c-1", "task": "caption", "params": {"image": "s3://in/a.png", "steps": 16, "length": 16,
               "prompt": "a", "seed": 1}}),
        json!({"job_id": "v-1", "task": "vqa", "params": {"image": "data:image/png;base64,AAAA", "question": "what colour?"}}),
    ]
}

#[test]
fn valid_jobs_pass_both_schema_and_serde_and_round_trip() {
    let v = validator(JOB_SCHEMA);
    for j in jobs() {
        assert_valid(&v, &j);
        let parsed: Job = serde_json::from_value(j.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), j);
    }
}

#[test]
fn invalid_jobs_fail_both() {
    let v = validator(JOB_SCHEMA);
    let bad = vec![
        json!({"job_id": "x", "task": "paint", "params": {}}),
        json!({"job_id": "x", "task": "generate", "params": {}}),
        json!({"job_id": "x", "task": "generate", "params": {"prompt": "p", "colour": "red"}}),
        json!({"job_id": "x", "task": "generate", "params": {"prompt": "p", "speed": "fastest"}}),
        json!({"job_id": "x", "task": "generate", "params": {"prompt": "p", "solver": "heun"}}),
        json!({"job_id": "x", "task": "generate", "params": {"prompt": "p", "guidance_interval": [0.2]}}),
        json!({"job_id": "x", "task": "caption", "params": {"question": "q"}}),
        json!({"job_id": "x", "task": "vqa", "params": {"image": "a.png"}}),
        json!({"task": "generate", "params": {"prompt": "p"}}),
        json!({"job_id": "x", "task": "generate", "params": {"prompt": "p"}, "extra": 1}),
    ];
    for j in bad {
        assert!(!v.is_valid(&j), "schema accepted {j}");
        assert!(
            serde_json::from_value::<Job>(j.clone()).is_err(),
            "serde accepted {j}"
        );
    }
}

fn results() -> Vec<JobResult> {
    let model = ModelRef {
        name: "m".into(),
        hash: "ab".into(),
    };
    vec![
        JobResult {
            job_id: "g-1".into(),
            status: Status::Succeeded,
            task: Some("generate".into()),
            outputs: vec![Output {
                uri: "s3://out/p/g-1/0-0000.png".into(),
                width: 32,
                height: 32,
                sha256: "0".repeat(64),
                seed: 3,
            }],
            text: None,
            metrics: Some(Metrics {
                queue_ms: 5,
                run_ms: 100,
                steps: 28,
                batch_size: 4,
                execution_provider: "cpu".into(),
                cached_rows: 12,
            }),
            error: None,
            attempts: Some(3),
            model: model.clone(),
            finished_at: "2026-11-30T00:00:00Z".into(),
        },
        JobResult {
            job_id: "c-1".into(),
            status: Status::Failed,
            task: Some("caption".into()),
            outputs: vec![],
            text: None,
            metrics: None,
            error: Some(ErrorInfo {
                kind: ErrorKind::InvalidInput,
                message: "bad png".into(),
                retryable: false,
            }),
            attempts: None,
            model: model.clone(),
            finished_at: "2026-11-30T00:00:00Z".into(),
        },
        JobResult {
            job_id: "v-1".into(),
            status: Status::Succeeded,
            task: Some("vqa".into()),
            outputs: vec![],
            text: Some("red".into()),
            metrics: None,
            error: None,
            attempts: None,
            model,
            finished_at: "2026-11-30T00:00:00Z".into(),
        },
    ]
}

#[test]
fn results_serialise_to_schema_valid_json() {
    let v = validator(RESULT_SCHEMA);
    for r in results() {
        let value = serde_json::to_value(&r).unwrap();
        assert_valid(&v, &value);
        assert_eq!(serde_json::from_value::<JobResult>(value).unwrap(), r);
    }
}

#[test]
fn every_error_kind_and_status_is_in_the_schema() {
    let schema: Value = serde_json::from_str(RESULT_SCHEMA).unwrap();
    let kinds = schema
        .pointer("/properties/error/properties/kind/enum")
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let all = [
        ErrorKind::InvalidJob,
        ErrorKind::InvalidInput,
        ErrorKind::InputNotFound,
        ErrorKind::ModelError,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];
    assert_eq!(kinds, all.len());
    for k in all {
        assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
    }
}

#[test]
fn manifest_schema_lists_every_role() {
    let schema: Value = serde_json::from_str(MANIFEST_SCHEMA).unwrap();
    let roles = schema
        .pointer("/properties/segments/items/properties/role/enum")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(roles.len(), Role::ALL.len());
    for r in Role::ALL {
        assert!(roles.contains(&json!(r.as_str())), "{r}");
        assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
    }
}

#[test]
fn progress_events_agree() {
    let v = validator(PROGRESS_SCHEMA);
    let p = Progress {
        job_id: "j".into(),
        step: 3,
        total: 28,
    };
    let value = serde_json::to_value(&p).unwrap();
    assert_valid(&v, &value);
    assert_eq!(serde_json::from_value::<Progress>(value).unwrap(), p);
    let bad = json!({"job_id": "j", "step": -1, "total": 2});
    assert!(!v.is_valid(&bad));
    assert!(serde_json::from_value::<Progress>(bad).is_err());
}
