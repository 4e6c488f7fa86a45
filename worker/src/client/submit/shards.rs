//! Dataset shards as `submit` input (the `datasets` feature), read as streams:
//! - WebDataset `.tar` shards: consecutive files sharing a `__key__` (the path without its
//!   extensions) are one sample, keyed by it; its image is the `.jpg`, `.jpeg`, `.png` or `.webp`
//!   file, and a `.txt` file is the prompt of a generate item.
//! - Parquet files: the `--image-column` holds image bytes, `{bytes, path}` structs (Hugging Face
//!   datasets) or URIs and paths (`s3://`, `data:`, or a path relative to the file's folder); the
//!   `--key-column` names the sample (default: a `key` column if there is one, else
//!   `{file}:{row}`).
//!
//! `--input` may be one path, a glob (`shards/*.tar`) or brace ranges (`shard-{000..009}.tar`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::items::{bad_input, params_for, Local, ManifestLine, Push, IMAGE_EXTENSIONS};
use super::{DefaultTask, SubmitConfig};
use crate::error::{Result, WorkerError};

/// A sample's image above this is refused (a shard is untrusted input).
const MAX_IMAGE: u64 = 64 << 20;

/// Expands brace ranges (`{000..012}`, zero-padded like the bounds) and lists (`{a,b}`) from left to
/// right, then globs each pattern; the files in order, without repeats.
pub(super) fn expand(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in braces(pattern)? {
        if p.contains(['*', '?', '[']) {
            let paths = glob::glob(&p).map_err(|e| bad_input("input", format!("`{p}`: {e}")))?;
            let mut found: Vec<PathBuf> = paths.filter_map(|r| r.ok()).collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(PathBuf::from(p));
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    if out.is_empty() {
        return Err(bad_input("input", format!("`{pattern}` matches no file")));
    }
    Ok(out)
}

fn braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| bad_input("input", format!("`{pattern}`: unclosed `{{`")))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let choices: Vec<String> = match body.split_once("..") {
        Some((a, b)) => {
            let bad = || bad_input("input", format!("`{{{body}}}` is not a range of numbers"));
            let (lo, hi): (u64, u64) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if hi < lo || hi - lo > 1_000_000 {
                return Err(bad());
            }
            let width = if a.starts_with('0') { a.len() } else { 0 };
            (lo..=hi).map(|n| format!("{n:0width$}")).collect()
        }
        None => body.split(',').map(str::to_string).collect(),
    };
    let mut out = Vec::new();
    for rest in braces(tail)? {
        out.extend(choices.iter().map(|c| format!("{head}{c}{rest}")));
    }
    out.sort();
    Ok(out)
}

/// Every sample of the shards `--input` names, in order.
pub(super) fn shard_items(cfg: &SubmitConfig, push: &mut Push<'_>) -> Result<()> {
    let pattern = cfg.input.to_string_lossy().into_owned();
    for path in expand(&pattern)? {
        if pattern.ends_with(".tar") {
            tar_items(cfg, &path, push)?;
        } else {
            parquet_items(cfg, &path, push)?;
        }
    }
    Ok(())
}

/// `dir/000123.seg.png` -> (`dir/000123`, `seg.png`): the extension starts at the basename's
/// first dot.
fn split_key(path: &str) -> (&str, &str) {
    let base = path.rfind('/').map_or(0, |i| i + 1);
    match path[base..].find('.') {
        Some(dot) => (&path[..base + dot], &path[base + dot + 1..]),
        None => (path, ""),
    }
}

/// One WebDataset sample as it is gathered: its key, image and text.
#[derive(Default)]
struct Sample {
    key: String,
    image: Option<(Vec<u8>, String)>,
    text: Option<String>,
}

fn tar_items(cfg: &SubmitConfig, path: &Path, push: &mut Push<'_>) -> Result<()> {
    let shard = path.display().to_string();
    let io = |e: std::io::Error| WorkerError::io(format!("reading {shard}"), e);
    let mut archive = tar::Archive::new(File::open(path).map_err(io)?);
    let mut sample = Sample::default();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(io)?.to_string_lossy().into_owned();
        let (key, ext) = split_key(&name);
        let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
        if key != sample.key {
            emit_sample(cfg, &shard, std::mem::take(&mut sample), push)?;
            sample.key = key;
        }
        if entry.size() > MAX_IMAGE {
            return Err(bad_input(
                format!("{shard}: {name}"),
                format!("larger than {MAX_IMAGE} bytes"),
            ));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(io)?;
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            sample.image = Some((bytes, ext));
        } else if ext == "txt" {
            sample.text = Some(String::from_utf8_lossy(&bytes).trim().to_string());
        }
    }
    emit_sample(cfg, &shard, sample, push)
}

fn emit_sample(cfg: &SubmitConfig, shard: &str, s: Sample, push: &mut Push<'_>) -> Result<()> {
    if s.key.is_empty() {
        return Ok(());
    }
    let where_ = format!("{shard}: sample {}", s.key);
    let line = ManifestLine {
        prompt: s.text.filter(|_| cfg.task == DefaultTask::Generate),
        ..ManifestLine::default()
    };
    let image = s.image.as_ref().map(|_| String::new());
    let params = params_for(
        cfg.task.as_str(),
        image,
        &line,
        cfg.question.as_deref(),
        &where_,
    )?;
    let local = s.image.map(|(bytes, ext)| Local::Bytes { bytes, ext });
    push.push(s.key, params, local)
}

fn parquet_items(cfg: &SubmitConfig, path: &Path, push: &mut Push<'_>) -> Result<()> {
    let file_name = path.display().to_string();
    let bad = |e: parquet::errors::ParquetError| bad_input("input", format!("{file_name}: {e}"));
    let f = File::open(path).map_err(|e| WorkerError::io(format!("reading {file_name}"), e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(bad)?
        .with_batch_size(256)
        .build()
        .map_err(bad)?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let image_col = cfg.image_column.as_deref().unwrap_or("image");
    let confine = if cfg.allow_paths_outside_shard {
        None
    } else {
        let canon = base.canonicalize();
        Some(canon.map_err(|e| WorkerError::io(format!("reading {}", base.display()), e))?)
    };
    let mut row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| bad_input("input", format!("{file_name}: {e}")))?;
        let images = batch.column_by_name(image_col).ok_or_else(|| {
            bad_input(
                "image-column",
                format!("{file_name} has no column `{image_col}`"),
            )
        })?;
        let keys = match &cfg.key_column {
            Some(k) => Some(batch.column_by_name(k).ok_or_else(|| {
                bad_input("key-column", format!("{file_name} has no column `{k}`"))
            })?),
            None => batch.column_by_name("key"),
        };
        for i in 0..batch.num_rows() {
            let where_ = format!("{file_name} row {row}");
            let key = keys
                .and_then(|k| cell_text(k, i))
                .unwrap_or_else(|| format!("{file_name}:{row}"));
            let cell = Cell {
                base: &base,
                confine: confine.as_deref(),
                at: &where_,
                column: image_col,
            };
            let (image, local) = image_cell(images, i, &cell)?;
            let params = params_for(
                cfg.task.as_str(),
                Some(image),
                &ManifestLine::default(),
                cfg.question.as_deref(),
                &where_,
            )?;
            push.push(key, params, local)?;
            row += 1;
        }
    }
    Ok(())
}

/// A key cell as text (strings and integers).
fn cell_text(col: &ArrayRef, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => col.as_string_view().value(i).to_string(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(i).to_string(),
        _ => return None,
    })
}

/// Where an image cell is: the folder its paths are relative to, the folder they must stay in
/// (unless `--allow-paths-outside-shard`), its row and its column.
struct Cell<'a> {
    base: &'a Path,
    confine: Option<&'a Path>,
    at: &'a str,
    column: &'a str,
}

/// An image cell: bytes to upload, or a URI passed on, or a local path to upload.
fn image_cell(col: &ArrayRef, i: usize, c: &Cell<'_>) -> Result<(String, Option<Local>)> {
    let where_ = c.at;
    let missing = || bad_input(format!("{where_}: image"), "no image in this row");
    if col.is_null(i) {
        return Err(missing());
    }
    let bytes = match col.data_type() {
        DataType::Binary => Some(col.as_binary::<i32>().value(i)),
        DataType::LargeBinary => Some(col.as_binary::<i64>().value(i)),
        DataType::BinaryView => Some(col.as_binary_view().value(i)),
        DataType::Struct(_) => {
            let s = col.as_struct();
            if let Some(b) = s.column_by_name("bytes").filter(|b| !b.is_null(i)) {
                return image_cell(b, i, c);
            }
            let p = s.column_by_name("path").ok_or_else(missing)?;
            let column = format!("{}.path", c.column);
            return image_cell(
                p,
                i,
                &Cell {
                    column: &column,
                    ..*c
                },
            );
        }
        _ => None,
    };
    if let Some(b) = bytes {
        let ext = sniff(b).to_string();
        return Ok((
            String::new(),
            Some(Local::Bytes {
                bytes: b.to_vec(),
                ext,
            }),
        ));
    }
    let text = cell_text(col, i).ok_or_else(|| {
        bad_input(
            format!("{where_}: image"),
            format!("a {} column holds neither bytes nor a URI", col.data_type()),
        )
    })?;
    if text.starts_with("s3://") || text.starts_with("data:") {
        return Ok((text, None));
    }
    if text.contains("://") {
        return Err(bad_input(
            format!("{where_}: image"),
            format!("`{text}`: only s3://, data: and local paths"),
        ));
    }
    let p = c.base.join(&text);
    if !p.is_file() {
        return Err(bad_input(
            format!("{where_}: image"),
            format!("{} is not a file", p.display()),
        ));
    }
    if let Some(dir) = c.confine {
        // Resolved (`..`, symlinks) before the check: what is read is what was checked.
        let real = p
            .canonicalize()
            .map_err(|e| bad_input(format!("{where_}: column `{}`", c.column), e.to_string()))?;
        if !real.starts_with(dir) {
            return Err(bad_input(
                format!("{where_}: column `{}`", c.column),
                format!(
                    "`{text}` leads out of the shard's folder {} \
                     (--allow-paths-outside-shard allows it)",
                    dir.display()
                ),
            ));
        }
        return Ok((String::new(), Some(Local::File(real))));
    }
    Ok((String::new(), Some(Local::File(p))))
}

/// The image format of `b` by its magic bytes (the extension its upload is named with).
fn sniff(b: &[u8]) -> &'static str {
    if b.starts_with(b"\x89PNG") {
        "png"
    } else if b.starts_with(&[0xff, 0xd8, 0xff]) {
        "jpg"
    } else if b.len() > 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        "webp"
    } else {
        "bin"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::client::submit::items::{read_items, Item};

    fn cfg(input: PathBuf) -> SubmitConfig {
        let mut c = crate::client::submit::items::tests::cfg(Path::new("."), DefaultTask::Caption);
        c.input = input;
        c
    }

    fn items(c: &SubmitConfig) -> Result<Vec<Item>> {
        let mut v = Vec::new();
        read_items(c, "t", |it| {
            v.push(it);
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn braces_and_globs_expand_in_order() {
        let b = braces("s-{08..11}.tar").expect("range");
        assert_eq!(b, ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]);
        assert_eq!(braces("{a,b}-{1..2}").expect("two").len(), 4);
        assert!(braces("s-{9..1}.tar").is_err() && braces("s-{1..x}").is_err());
        let d = tempfile::tempdir().expect("tmp");
        for n in ["b.tar", "a.tar", "c.txt"] {
            std::fs::write(d.path().join(n), b"").expect("write");
        }
        let got = expand(&format!("{}/*.tar", d.path().display())).expect("glob");
        assert_eq!(got, [d.path().join("a.tar"), d.path().join("b.tar")]);
        assert!(expand(&format!("{}/*.parquet", d.path().display())).is_err());
    }

    #[test]
    fn a_webdataset_shard_gives_one_item_per_key() {
        assert_eq!(split_key("dir/000123.seg.png"), ("dir/000123", "seg.png"));
        let d = tempfile::tempdir().expect("tmp");
        let shard = d.path().join("s-0.tar");
        let mut t = tar::Builder::new(File::create(&shard).expect("create"));
        for (name, body) in [
            ("x/001.jpg", &b"\xff\xd8\xff one"[..]),
            ("x/001.json", b"{}"),
            ("x/002.png", b"\x89PNG two"),
            ("x/002.txt", b"a caption"),
            ("x/003.webp", b"RIFF0000WEBPVP8 "),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, name, body).expect("append");
        }
        t.finish().expect("finish");
        drop(t);
        let got = items(&cfg(shard.clone())).expect("read");
        let names: Vec<&str> = got.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["x/001", "x/002", "x/003"]);
        assert!(
            matches!(&got[1].local_image, Some(Local::Bytes { ext, bytes }) if ext == "png" && bytes.starts_with(b"\x89PNG"))
        );
        // The same key in a second shard is a duplicate, named as such.
        std::fs::copy(&shard, d.path().join("s-1.tar")).expect("copy");
        let e = items(&cfg(d.path().join("s-{0..1}.tar"))).expect_err("dup");
        assert!(e.to_string().contains("`x/001` appears twice"), "{e}");
    }

    #[test]
    fn parquet_rows_give_items_keyed_by_their_column() {
        use arrow_array::{BinaryArray, RecordBatch, StringArray};
        use arrow_schema::{Field, Schema};
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("local.png"), b"\x89PNG local").expect("write");
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("jpg", DataType::Binary, true),
            Field::new("url", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["k0", "k1"])),
                Arc::new(BinaryArray::from(vec![Some(&b"\x89PNG zero"[..]), None])),
                Arc::new(StringArray::from(vec!["s3://b/k0.png", "local.png"])),
            ],
        )
        .expect("batch");
        let file = d.path().join("part-0.parquet");
        write_parquet(&file, schema, &batch);
        let mut c = cfg(file.clone());
        c.image_column = Some("url".into());
        let got = items(&c).expect("urls");
        assert_eq!(
            (got[0].name.as_str(), got[0].local_image.is_none()),
            ("k0", true)
        );
        assert_eq!(
            got[1].local_image,
            Some(Local::File(
                d.path().join("local.png").canonicalize().expect("real")
            ))
        );
        c.image_column = Some("jpg".into());
        let e = items(&c).expect_err("null image");
        assert!(e.to_string().contains("row 1: image"), "{e}");
        c.key_column = Some("id".into());
        let e = items(&c).expect_err("no key column");
        assert!(e.to_string().contains("no column `id`"), "{e}");
    }

    fn write_parquet(
        file: &Path,
        schema: Arc<arrow_schema::Schema>,
        batch: &arrow_array::RecordBatch,
    ) {
        let out = File::create(file).expect("create");
        let mut w = parquet::arrow::ArrowWriter::try_new(out, schema, None).expect("writer");
        w.write(batch).expect("write");
        w.close().expect("close");
    }

    /// A parquet file at `dir/shard/p.parquet` whose `path` column holds `cell`.
    fn path_shard(dir: &Path, cell: &str) -> PathBuf {
        use arrow_array::{RecordBatch, StringArray};
        use arrow_schema::{Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("path", DataType::Utf8, false)]));
        let cells = Arc::new(StringArray::from(vec![cell]));
        let batch = RecordBatch::try_new(schema.clone(), vec![cells]).expect("batch");
        let file = dir.join("shard/p.parquet");
        write_parquet(&file, schema, &batch);
        file
    }

    #[test]
    fn parquet_paths_stay_in_the_shards_folder_unless_allowed() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("shard/sub")).expect("mkdir");
        let secret = d.path().join("secret.png");
        std::fs::write(&secret, b"\x89PNG secret").expect("write");
        std::fs::write(d.path().join("shard/sub/in.png"), b"\x89PNG in").expect("write");
        std::os::unix::fs::symlink(&secret, d.path().join("shard/link.png")).expect("link");
        let absolute = secret.display().to_string();
        for cell in [
            "../secret.png",
            "sub/../../secret.png",
            &absolute,
            "link.png",
        ] {
            let mut c = cfg(path_shard(d.path(), cell));
            c.image_column = Some("path".into());
            let e = items(&c).expect_err(cell).to_string();
            assert!(
                e.contains("row 0: column `path`") && e.contains("leads out of the shard"),
                "{cell}: {e}"
            );
            c.allow_paths_outside_shard = true;
            let got = items(&c).expect(cell);
            assert!(got[0].local_image.is_some(), "{cell}");
        }
        // Inside the folder, `..` that stays in it included, is fine.
        let mut c = cfg(path_shard(d.path(), "sub/../sub/in.png"));
        c.image_column = Some("path".into());
        let got = items(&c).expect("inside");
        let inside = d
            .path()
            .join("shard/sub/in.png")
            .canonicalize()
            .expect("real");
        assert_eq!(got[0].local_image, Some(Local::File(inside)));
    }
}

/// Streaming, measured: a shard of 1,000,000 samples read through [`read_items`] (what `submit`
/// runs on its reader thread). Prints the peak resident memory; run with
/// `cargo test -p ddit-worker --release -- --ignored a_million_samples`.
#[cfg(test)]
mod million {
    use super::tests_support::*;

    #[test]
    #[ignore = "writes a 1 GB shard; run by hand"]
    fn a_million_samples_stream_in_bounded_memory() {
        let d = tempfile::tempdir().expect("tmp");
        let shard = d.path().join("big.tar");
        write_tiny_shard(&shard, 1_000_000);
        let before = peak_rss_kib();
        let n = count_items(&shard);
        let after = peak_rss_kib();
        println!("million: {n} items; peak RSS {before} KiB before, {after} KiB after reading");
        assert_eq!(n, 1_000_000);
        // The names' 64-bit hashes (about 32 MB for a million) are all that grows.
        assert!(
            after - before < 200 * 1024,
            "peak RSS grew {} KiB",
            after - before
        );
    }
}

#[cfg(test)]
mod tests_support {
    use std::path::Path;

    use crate::client::submit::items::{read_items, tests::cfg};
    use crate::client::submit::DefaultTask;

    pub fn write_tiny_shard(path: &Path, n: usize) {
        let f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
        let mut t = tar::Builder::new(f);
        for i in 0..n {
            let body = b"\x89PNG tiny";
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, format!("{i:07}.png"), &body[..])
                .expect("append");
        }
        t.finish().expect("finish");
    }

    pub fn count_items(shard: &Path) -> usize {
        let mut c = cfg(Path::new("."), DefaultTask::Caption);
        c.input = shard.to_path_buf();
        let mut n = 0;
        read_items(&c, "t", |_| {
            n += 1;
            Ok(())
        })
        .expect("read");
        n
    }

    /// VmHWM of this process, in KiB.
    pub fn peak_rss_kib() -> i64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}
