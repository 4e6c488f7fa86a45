//! `--out x.parquet` (the `datasets` feature): results are collected into the resumable JSONL
//! `x.parquet.jsonl` as always, and once every item has its result that file is rewritten as
//! Parquet, row group by row group (memory stays bounded), through a temporary file and a rename.
//! The columns are the JSONL's: `item`, `job_id`, `status`, `task`, `text`, `attempts`,
//! `finished_at`, and `outputs`, `metrics`, `error`, `model` as JSON text.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{StringBuilder, UInt32Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

use crate::error::{Result, WorkerError};

const TEXT_COLUMNS: [&str; 6] = ["item", "job_id", "status", "task", "text", "finished_at"];
const JSON_COLUMNS: [&str; 4] = ["outputs", "metrics", "error", "model"];
const ROWS_PER_GROUP: usize = 8192;

fn schema() -> Arc<Schema> {
    let mut fields: Vec<Field> = TEXT_COLUMNS
        .iter()
        .map(|c| {
            Field::new(
                *c,
                DataType::Utf8,
                !matches!(*c, "item" | "job_id" | "status"),
            )
        })
        .collect();
    fields.push(Field::new("attempts", DataType::UInt32, true));
    fields.extend(
        JSON_COLUMNS
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true)),
    );
    Arc::new(Schema::new(fields))
}

/// Builders for one row group.
struct Group {
    text: Vec<StringBuilder>,
    attempts: UInt32Builder,
    json: Vec<StringBuilder>,
    rows: usize,
}

impl Group {
    fn new() -> Self {
        Self {
            text: TEXT_COLUMNS.iter().map(|_| StringBuilder::new()).collect(),
            attempts: UInt32Builder::new(),
            json: JSON_COLUMNS.iter().map(|_| StringBuilder::new()).collect(),
            rows: 0,
        }
    }

    fn add(&mut self, v: &Value) {
        for (b, c) in self.text.iter_mut().zip(TEXT_COLUMNS) {
            b.append_option(v.get(c).and_then(Value::as_str));
        }
        let attempts = v.get("attempts").and_then(Value::as_u64);
        self.attempts
            .append_option(attempts.and_then(|a| u32::try_from(a).ok()));
        for (b, c) in self.json.iter_mut().zip(JSON_COLUMNS) {
            b.append_option(v.get(c).filter(|x| !x.is_null()).map(Value::to_string));
        }
        self.rows += 1;
    }

    fn finish(&mut self, schema: &Arc<Schema>) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = self
            .text
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        cols.push(Arc::new(self.attempts.finish()));
        cols.extend(
            self.json
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| WorkerError::Internal(format!("parquet: {e}")))
    }
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> WorkerError + '_ {
    move |e| WorkerError::io(p.display().to_string(), e)
}

/// Rewrites the results JSONL `from` as the Parquet file `to`; returns the rows written. A torn
/// last line (a crash while writing it) is skipped, as on resume.
pub fn jsonl_to_parquet(from: &Path, to: &Path) -> Result<usize> {
    let pq = |e: parquet::errors::ParquetError| {
        WorkerError::Internal(format!("writing {}: {e}", to.display()))
    };
    let tmp = to.with_extension("parquet.partial");
    let schema = schema();
    let mut writer =
        ArrowWriter::try_new(File::create(&tmp).map_err(io(&tmp))?, schema.clone(), None)
            .map_err(pq)?;
    let mut group = Group::new();
    let mut total = 0;
    for line in BufReader::new(File::open(from).map_err(io(from))?).lines() {
        let line = line.map_err(io(from))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        group.add(&v);
        total += 1;
        if group.rows == ROWS_PER_GROUP {
            writer.write(&group.finish(&schema)?).map_err(pq)?;
            writer.flush().map_err(pq)?;
        }
    }
    if group.rows > 0 {
        writer.write(&group.finish(&schema)?).map_err(pq)?;
    }
    writer.close().map_err(pq)?;
    std::fs::rename(&tmp, to).map_err(io(to))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn every_result_line_is_one_row_and_a_torn_line_is_skipped() {
        let d = tempfile::tempdir().expect("tmp");
        let (from, to) = (d.path().join("r.jsonl"), d.path().join("r.parquet"));
        let mut text = String::new();
        for i in 0..20_000 {
            let line = serde_json::json!({"item": format!("k{i}"), "job_id": format!("j{i}"), "status": "succeeded",
                "task": "caption", "text": "a red circle", "attempts": 1, "model": {"name": "m", "hash": "h"},
                "finished_at": "2026-12-05T00:00:00Z"});
            text.push_str(&format!("{line}\n"));
        }
        text.push_str("{\"item\": \"torn");
        std::fs::write(&from, text).expect("write");
        assert_eq!(jsonl_to_parquet(&from, &to).expect("convert"), 20_000);
        let r =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&to).expect("open")).expect("read");
        assert_eq!(r.metadata().num_row_groups(), 3);
        let batches: Vec<RecordBatch> = r
            .build()
            .expect("reader")
            .map(|b| b.expect("batch"))
            .collect();
        assert_eq!(
            batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            20_000
        );
        let items = batches[0].column_by_name("item").expect("item");
        use arrow_array::cast::AsArray;
        assert_eq!(items.as_string::<i32>().value(0), "k0");
        let model = batches[0].column_by_name("model").expect("model");
        let model: Value = serde_json::from_str(model.as_string::<i32>().value(1)).expect("json");
        assert_eq!(model, serde_json::json!({"name": "m", "hash": "h"}));
        assert!(batches[0]
            .column_by_name("error")
            .expect("error")
            .is_null(0));
    }
}
