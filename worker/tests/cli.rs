//! The `ddit-worker` binary in local mode: batch (with a bad line, resume), generate, caption, vqa.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use ddit_schemas::{JobResult, Status};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddit-worker"));
    c.env_remove("DDIT_MODEL").env("DDIT_INTRA_THREADS", "1");
    c
}

fn results(path: &std::path::Path) -> Vec<JobResult> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn batch_records_bad_jobs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    common::write_png(&img, 24);
    let mut lines = vec![];
    for i in 0..4 {
        lines.push(format!(r#"{{"job_id":"g{i}","task":"generate","params":{{"prompt":"a red circle","steps":2,"seed":{i}}}}}"#));
    }
    lines.push(
        r#"{"job_id":"c0","task":"caption","params":{"image":"IMG","steps":3}}"#
            .replace("IMG", img.to_str().unwrap()),
    );
    lines.push(r#"{"job_id":"v0","task":"vqa","params":{"image":"IMG","question":"what colour is the square?","steps":3}}"#.replace("IMG", img.to_str().unwrap()));
    lines.push(r#"{"job_id":"broken","task":"generate","params":{"prompt":"p","bogus":1}}"#.into());
    lines.push("this is not json".into());
    lines.push(
        r#"{"job_id":"g0","task":"generate","params":{"prompt":"duplicate id","steps":2}}"#.into(),
    );
    let jobs = dir.path().join("jobs.jsonl");
    // First run: only the first three lines.
    std::fs::write(&jobs, lines[..3].join("\n")).unwrap();
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let o = bin()
            .args(["batch", "--model"])
            .arg(common::package())
            .arg("--jobs")
            .arg(&jobs)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run(&["--max-batch", "2"]);
    assert_eq!(results(&out.join("results.jsonl")).len(), 3);
    // Second run with every line: the three done jobs are skipped, the rest complete.
    std::fs::write(&jobs, lines.join("\n")).unwrap();
    let log = run(&["--max-batch", "4"]);
    assert!(log.contains("skipped"), "{log}");
    let rs = results(&out.join("results.jsonl"));
    let ids: Vec<&str> = rs.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(ids.len(), 8, "{ids:?}");
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 8, "duplicate results: {ids:?}");
    let by = |id: &str| rs.iter().find(|r| r.job_id == id).unwrap();
    assert_eq!(by("broken").status, Status::Failed);
    assert_eq!(by("line-8").status, Status::Failed);
    for id in ["g0", "g1", "g2", "g3", "c0", "v0"] {
        assert_eq!(by(id).status, Status::Succeeded, "{id}");
    }
    for o in &by("g3").outputs {
        let png = std::fs::read(out.join(&o.uri)).unwrap();
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&png)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, o.sha256);
    }
    // Every line validates against the result schema.
    let schema: serde_json::Value = serde_json::from_str(ddit_schemas::RESULT_SCHEMA).unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    for line in std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v.is_valid(&value), "{line}");
    }
}

#[test]
fn single_commands_print_results_and_read_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("g.png");
    let o = bin()
        .args([
            "generate",
            "--prompt",
            "a red circle",
            "--seed",
            "3",
            "--steps",
            "2",
            "--out",
        ])
        .arg(&png)
        .env("DDIT_MODEL", common::package())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(image::open(&png).is_ok());
    let o = bin()
        .args(["caption", "--seed", "1", "--steps", "3", "--image"])
        .arg(&png)
        .env("DDIT_MODEL", common::package())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args([
            "vqa",
            "--question",
            "what colour is it?",
            "--steps",
            "3",
            "--image",
        ])
        .arg(&png)
        .env("DDIT_MODEL", common::package())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A bad image is a clean error and a non-zero exit.
    let o = bin()
        .args(["caption", "--image", "/nonexistent.png"])
        .env("DDIT_MODEL", common::package())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("input not found"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
