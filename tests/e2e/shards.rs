//! `submit` on dataset shards against the real services: a WebDataset shard of 1,000 ShapesEval
//! renders captioned into a Parquet file, interrupted and resumed, read back with pyarrow.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddit_e2e::*;

const SAMPLES: usize = 1000;

/// A WebDataset shard: sample `{i:06}` holds ShapesEval render `i % 300` as `.png` and a `.json`.
fn write_shard(path: &Path) -> HashSet<String> {
    let set = workspace().join("models/shapes-eval");
    let mut t = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut keys = HashSet::new();
    for i in 0..SAMPLES {
        let key = format!("{i:06}");
        let png = std::fs::read(set.join(format!("scene_{:04}.png", i % 300))).unwrap();
        let meta = format!("{{\"scene\": {}}}", i % 300);
        for (ext, body) in [("png", png.as_slice()), ("json", meta.as_bytes())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, format!("{key}.{ext}"), body).unwrap();
        }
        keys.insert(key);
    }
    t.finish().unwrap();
    keys
}

fn submit(names: &Names, input: &Path, out: &Path) -> Command {
    let mut c = client_command(names, "submit");
    c.arg("--input").arg(input).arg("--out").arg(out);
    c.args(["--ahead", "16", "--poll-ms", "50", "--no-progress"]);
    c
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_webdataset_shard_is_captioned_into_parquet_across_an_interruption() {
    let names = Names::new("shards");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let mut worker = Worker::start(
        &names,
        &model,
        dir.path(),
        "w",
        &["--max-batch", "8", "--prefetch", "16"],
    );
    worker.wait_ready(Duration::from_secs(60));
    let shard = dir.path().join("shapes-000000.tar");
    let keys = write_shard(&shard);
    let out = dir.path().join("captions.parquet");
    let results = dir.path().join("captions.parquet.jsonl");

    // Run 1: killed once a fifth of the results are in.
    let mut first = submit(&names, &shard, &out)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while lines(&results) < SAMPLES / 5 {
        assert!(
            first.try_wait().unwrap().is_none(),
            "submit ended before the interruption"
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !out.exists(),
        "the Parquet file is written only when every item is done"
    );
    let before = lines(&results);
    let journaled = lines(&dir.path().join("captions.parquet.submitted"));

    // Run 2: resumes, publishing only what run 1 never had confirmed.
    let second = submit(&names, &shard, &out).output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let text = String::from_utf8_lossy(&second.stdout).into_owned();
    let s: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    eprintln!("interrupted with {before} results, {journaled} journaled; resumed: {s}");
    let n = |k: &str| s[k].as_u64().unwrap() as usize;
    assert_eq!((n("items"), n("done_before")), (SAMPLES, before));
    assert_eq!(
        n("published") + n("recovered") + n("resumed"),
        SAMPLES - before
    );
    assert!(n("published") <= SAMPLES - journaled, "{s}");
    let (_, m) = http_get(worker.port, "/metrics").unwrap();
    let computed = metric_sum(
        &m,
        "ddit_jobs_total",
        &[("task", "caption"), ("status", "succeeded")],
    );
    assert!(
        computed >= SAMPLES as f64 && computed <= SAMPLES as f64 + 1.0,
        "computed {computed}"
    );

    // pyarrow reads 1,000 rows back, one per sample key, all captioned.
    let py = std::env::var("DDIT_PYCLIENT_PYTHON").unwrap_or_else(|_| {
        workspace()
            .join(".ddit/pyclient/bin/python")
            .display()
            .to_string()
    });
    let script = "import json, sys, pyarrow.parquet as pq\n\
        t = pq.read_table(sys.argv[1])\n\
        rows = t.to_pylist()\n\
        print(json.dumps({'rows': t.num_rows, 'columns': t.column_names,\n\
            'items': sorted({r['item'] for r in rows}),\n\
            'ok': sum(r['status'] == 'succeeded' and r['task'] == 'caption' and isinstance(r['text'], str) for r in rows)}))";
    let read = Command::new(py)
        .args(["-c", script])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(v["rows"], SAMPLES);
    assert_eq!(v["ok"], SAMPLES);
    let items: HashSet<String> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(items, keys);
    for c in [
        "item", "job_id", "status", "task", "text", "attempts", "model",
    ] {
        assert!(
            v["columns"].as_array().unwrap().iter().any(|x| x == c),
            "{c} missing: {v}"
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cleanup(&names));
}
