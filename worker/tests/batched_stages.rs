//! The stages the runner batches across jobs give each job, bit for bit, what it gets alone, on
//! real graphs (CPU, one intra-op thread): the text encoder (the prompts of the jobs admitted
//! together) and the VAE decoder (the images of the jobs that finish together).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ddit_worker::tensor::Tensor;

/// The bundled demo model exported once (wider than the tiny fixture: other kernel paths).
fn demo() -> &'static Path {
    static PKG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = PKG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        let checkpoint = common::workspace().join("models/ddit-shapes");
        ddit_export::convert(&ddit_export::ExportOptions::new(checkpoint, &pkg)).unwrap();
        (dir, pkg)
    });
    p
}

fn packages() -> [(&'static str, &'static Path); 3] {
    [
        ("tiny f32", common::package()),
        ("tiny int8", common::int8_package()),
        ("demo f32", demo()),
    ]
}

/// Largest absolute difference (a NaN on either side is infinite).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x - y).abs() {
            d if d.is_nan() => f32::INFINITY,
            d => d,
        })
        .fold(0.0, f32::max)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.data.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_text_encoder_gives_each_job_in_a_batch_its_own_streams() {
    let prompts = [
        "a red circle left of a blue square",
        "a green triangle",
        "two small yellow stars above a purple circle",
        "a red circle left of a blue square",
    ];
    for (name, pkg) in packages() {
        let (mut e, codec) = common::engine_of(pkg);
        let len = e.manifest.values.text_lengths.prompt as usize;
        // Each job's rows as the runner sends them: [negative, positive].
        let jobs: Vec<[Vec<i64>; 2]> = prompts
            .iter()
            .map(|p| {
                let neg = codec.encode_padded("", len, "n").unwrap();
                [neg, codec.encode_padded(p, len, "p").unwrap()]
            })
            .collect();
        let rows: Vec<Vec<i64>> = jobs.iter().flat_map(|j| j.iter().cloned()).collect();
        let batched = e.encode_text(&rows).unwrap();
        let mut worst = 0f32;
        for (k, job) in jobs.iter().enumerate() {
            let alone = e.encode_text(job).unwrap();
            for half in 0..2 {
                let row = batched.row(2 * k + half);
                worst = worst.max(max_diff(&row.data, &alone.row(half).data));
                assert_eq!(
                    bits(&row),
                    bits(&alone.row(half)),
                    "{name}: job {k} row {half}"
                );
            }
        }
        eprintln!("{name}: text encoder, 8 rows against 2 at a time: max |diff| {worst:e}");
    }
}

#[test]
fn the_vae_decoder_gives_each_image_in_a_batch_its_own_pixels() {
    for (name, pkg) in packages() {
        let (mut e, _) = common::engine_of(pkg);
        let v = &e.manifest.values;
        let (c, s) = (v.latent_channels as usize, v.sample_size as usize);
        let n = c * s * s;
        let latents: Vec<Tensor> = (0..3)
            .map(|k| {
                let data = (0..n).map(|i| ((i * (k + 3)) as f32 * 0.37).sin() * 1.5);
                Tensor::new(vec![1, c, s, s], data.collect()).unwrap()
            })
            .collect();
        let batched = e
            .vae_decode(&Tensor::cat(&latents.iter().collect::<Vec<_>>()).unwrap())
            .unwrap();
        let mut worst = 0f32;
        for (k, z) in latents.iter().enumerate() {
            let alone = e.vae_decode(z).unwrap();
            worst = worst.max(max_diff(&batched.row(k).data, &alone.data));
            assert_eq!(bits(&batched.row(k)), bits(&alone), "{name}: image {k}");
        }
        eprintln!("{name}: VAE decoder, 3 images against 1: max |diff| {worst:e}");
    }
}
