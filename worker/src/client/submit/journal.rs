//! What `submit` keeps on disk: the output JSONL (`item` plus the result, one line each) and the
//! journal `{out}.submitted` of job ids the broker confirmed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::{Result, WorkerError};

/// Ids (and items) already in the output file; a torn last line is ignored.
pub(super) fn finished(out: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    if !out.exists() {
        return Ok(ids);
    }
    let f =
        File::open(out).map_err(|e| WorkerError::io(format!("reading {}", out.display()), e))?;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| WorkerError::io(format!("reading {}", out.display()), e))?;
        if let Some(id) = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_string))
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

pub(super) fn journal_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.submitted", out.display()))
}

pub(super) fn read_journal(path: &Path) -> Result<HashSet<String>> {
    if !path.exists() {
        return Ok(HashSet::new());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}
