//! Shared helpers: the tiny fixture model exported once per test binary, and a runner harness.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ddit_schemas::{Job, JobResult};
use ddit_worker::engine::{Engine, EngineConfig, Package};
use ddit_worker::runner::{Incoming, Runner, RunnerConfig};
use ddit_worker::tasks::input::LocalFetcher;
use ddit_worker::text::TextCodec;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `tiny-f32` fixture exported once (blocks split 2 + 2), kept for the whole test binary.
pub fn package() -> &'static Path {
    static PKG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = PKG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        export(
            &workspace().join("tests/fixtures/tiny-f32/checkpoint"),
            &pkg,
            "tiny-f32",
            [12, 10, 40],
            Some(2),
        );
        (dir, pkg)
    });
    p
}

/// The `tiny-f32` fixture exported with `--weights int8` (blocks split 2 + 2), kept for the whole
/// test binary.
pub fn int8_package() -> &'static Path {
    static PKG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = PKG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        export_as(
            &workspace().join("tests/fixtures/tiny-f32/checkpoint"),
            &pkg,
            ("tiny-f32", ddit_export::StoreDtype::Int8),
            [12, 10, 40],
            Some(2),
        );
        (dir, pkg)
    });
    p
}

/// A writable copy of the fixture package (a flat folder).
pub fn copy_package() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("pkg");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(package()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (dir, dst)
}

/// Exports `checkpoint` into `out` with text lengths [prompt, caption, vqa].
pub fn export(
    checkpoint: &Path,
    out: &Path,
    name: &str,
    lengths: [u64; 3],
    blocks_per_segment: Option<usize>,
) {
    let f32 = ddit_export::StoreDtype::F32;
    export_as(checkpoint, out, (name, f32), lengths, blocks_per_segment);
}

/// [`export`] with the given weight storage.
pub fn export_as(
    checkpoint: &Path,
    out: &Path,
    (name, dtype): (&str, ddit_export::StoreDtype),
    [prompt, caption, vqa]: [u64; 3],
    blocks_per_segment: Option<usize>,
) {
    let mut o = ddit_export::ExportOptions::new(checkpoint.to_path_buf(), out);
    o.blocks_per_segment = blocks_per_segment;
    o.name = Some(name.into());
    o.dtype = dtype;
    o.text_lengths = ddit_export::LengthOverrides {
        prompt: Some(prompt),
        caption: Some(caption),
        vqa: Some(vqa),
    };
    ddit_export::convert(&o).unwrap();
}

/// Verifies a package and loads its engine.
pub fn load(pkg: &Path, cfg: &EngineConfig) -> ddit_worker::Result<Engine> {
    Engine::load(&Package::open(pkg)?, cfg)
}

pub fn engine() -> (Engine, TextCodec) {
    engine_of(package())
}

pub fn engine_of(pkg: &Path) -> (Engine, TextCodec) {
    let e = load(pkg, &EngineConfig::default()).unwrap();
    let c = TextCodec::for_package(&e.tokenizer_path, &e.manifest.values).unwrap();
    (e, c)
}

pub use ddit_worker::adapters::local::memory::{Collect, MemSink, VecSource};

pub fn job(v: serde_json::Value) -> Incoming {
    Incoming::job(serde_json::from_value::<Job>(v).unwrap())
}

/// Runs jobs through a fresh engine; returns results sorted by job id, and the images.
pub fn run_jobs(jobs: Vec<Incoming>, max_batch: usize) -> (Vec<JobResult>, MemSink, Collect) {
    run_jobs_on(package(), jobs, max_batch)
}

/// [`run_jobs`] on another package.
pub fn run_jobs_on(
    pkg: &Path,
    jobs: Vec<Incoming>,
    max_batch: usize,
) -> (Vec<JobResult>, MemSink, Collect) {
    let (mut e, c) = engine_of(pkg);
    let cfg = RunnerConfig {
        max_batch,
        ..RunnerConfig::default()
    };
    let mut src = VecSource::of(jobs);
    let mut sink = MemSink::default();
    let mut hooks = Collect::default();
    Runner::new(&mut e, &c, &LocalFetcher, cfg).run(&mut src, &mut sink, &mut hooks);
    let mut rs = hooks.results.clone();
    rs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    (rs, sink, hooks)
}

/// A small PNG on disk (a coloured square on white).
pub fn write_png(path: &Path, size: u32) {
    let mut img = image::RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
    for y in size / 4..size / 2 {
        for x in size / 4..size / 2 {
            img.put_pixel(x, y, image::Rgb([220, 40, 40]));
        }
    }
    img.save(path).unwrap();
}
