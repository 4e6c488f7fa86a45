//! Shared helpers: the tiny fixture model exported once per test binary, and a runner harness.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ddit_schemas::{Job, JobResult};
use ddit_worker::engine::{Engine, EngineConfig};
use ddit_worker::runner::{Hooks, ImageSink, Incoming, JobSource, Runner, RunnerConfig};
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
    [prompt, caption, vqa]: [u64; 3],
    blocks_per_segment: Option<usize>,
) {
    let mut o = ddit_export::ExportOptions::new(checkpoint.to_path_buf(), out);
    o.blocks_per_segment = blocks_per_segment;
    o.name = Some(name.into());
    o.text_lengths = ddit_schemas::TextLengths {
        prompt,
        caption,
        vqa,
    };
    ddit_export::convert(&o).unwrap();
}

pub fn engine() -> (Engine, TextCodec) {
    engine_of(package())
}

pub fn engine_of(pkg: &Path) -> (Engine, TextCodec) {
    let e = Engine::load(pkg, &EngineConfig::default()).unwrap();
    let c = TextCodec::for_package(&e.tokenizer_path, &e.manifest.values).unwrap();
    (e, c)
}

pub struct VecSource(pub std::vec::IntoIter<Incoming>);
impl JobSource for VecSource {
    fn next_job(&mut self, _wait: bool) -> Option<Incoming> {
        self.0.next()
    }
}

#[derive(Default)]
pub struct Collect {
    pub results: Vec<JobResult>,
    pub progress: Vec<(String, usize, usize)>,
    pub cancel: Vec<String>,
}
impl Hooks for Collect {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        self.progress.push((job_id.to_string(), step, total));
    }
    fn canceled(&mut self, job_id: &str) -> bool {
        self.cancel.iter().any(|c| c == job_id)
    }
    fn result(&mut self, r: JobResult) {
        self.results.push(r);
    }
}

/// Keeps PNGs in memory by (job_id, index).
#[derive(Default)]
pub struct MemSink(pub Vec<(String, u32, Vec<u8>)>);
impl ImageSink for MemSink {
    fn put(
        &mut self,
        job_id: &str,
        index: u32,
        png: &[u8],
        _seed: u64,
    ) -> ddit_worker::Result<String> {
        self.0.push((job_id.to_string(), index, png.to_vec()));
        Ok(format!("mem://{job_id}/{index}.png"))
    }
}

pub fn job(v: serde_json::Value) -> Incoming {
    Incoming::Job(Box::new(serde_json::from_value::<Job>(v).unwrap()))
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
    let mut src = VecSource(jobs.into_iter());
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
