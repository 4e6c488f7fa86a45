//! `ddit-worker parity`: every segment of a package on the same seeded inputs under two provider
//! lists (`--providers`, the reference, and `--against`), printing each segment's largest absolute
//! difference and where `--against` placed the nodes. `scripts/gpu-check.sh` runs it.
//!
//! Output, tab-separated: `placement PROVIDER NODES` lines, then one `parity SEGMENT MAX_ABS_DIFF
//! MAX_ABS_REFERENCE` line per segment (`parity SEGMENT error: WHY` when `--against` failed it).
//! Each segment gets the reference's outputs of the segments before it as inputs, so a line
//! measures that segment alone.

use clap::Args;
use ddit_worker::engine::{parse_providers, Engine, Package, Stream};
use ddit_worker::error::{Result as WResult, WorkerError};
use ddit_worker::tensor::Tensor;
use rand_core::{RngCore, SeedableRng};

use super::engine::EngineArgs;

#[derive(Args)]
pub struct ParityArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The provider list compared against `--providers`, e.g. `cuda` or `tensorrt,cuda`.
    #[arg(long, env = "DDIT_PARITY_AGAINST")]
    against: String,
}

/// Rows of every input.
const ROWS: usize = 2;

pub fn run(a: ParityArgs) -> anyhow::Result<()> {
    super::init_logging(&a.engine.log);
    let pkg = Package::open(&a.engine.model)?;
    let threads = a.engine.threads(&pkg.manifest, Some(1))?;
    let reference = a.engine.config(ROWS, threads.intra)?;
    let mut other = reference.clone();
    other.providers = parse_providers(&a.against)?;
    // A node that falls back to the CPU is reported below, not refused.
    other.strict_placement = Some(false);
    let mut r = Engine::load(&pkg, &reference)?;
    let mut o = Engine::load(&pkg, &other)?;
    for (ep, nodes) in &o.placement().by_provider {
        println!("placement\t{ep}\t{}", nodes.len());
    }
    for (segment, outcome) in compare(&mut r, &mut o, ROWS)? {
        match outcome {
            Ok((diff, scale)) => println!("parity\t{segment}\t{diff:.3e}\t{scale:.3e}"),
            Err(e) => println!("parity\t{segment}\terror: {e}"),
        }
    }
    Ok(())
}

/// Seeded values in [-1, 1).
struct Inputs(rand_chacha::ChaCha8Rng);

impl Inputs {
    fn tensor(&mut self, shape: Vec<usize>) -> anyhow::Result<Tensor> {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| (self.0.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect();
        Ok(Tensor::new(shape, data)?)
    }
}

/// (largest |a - b|, largest |a|), or why `b` is missing or of another shape. A NaN on either
/// side is an infinite difference (an overflow must not read as a match).
fn diff(a: &Tensor, b: WResult<Tensor>) -> Result<(f32, f32), String> {
    let b = b.map_err(|e| e.to_string())?;
    if a.shape != b.shape {
        return Err(format!("shapes {:?} and {:?}", a.shape, b.shape));
    }
    let d = a.data.iter().zip(&b.data).map(|(x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            d
        }
    });
    let scale = a.data.iter().map(|x| x.abs()).fold(0.0, f32::max);
    Ok((d.fold(0.0, f32::max), scale))
}

/// A segment and its (difference, scale), or why it could not be compared.
type Row = (&'static str, Result<(f32, f32), String>);

/// Each segment on `r` (the reference, whose failure ends the comparison) and on `o` (whose
/// failure is that segment's row), on `r`'s outputs of the segments before it.
fn compare(r: &mut Engine, o: &mut Engine, b: usize) -> anyhow::Result<Vec<Row>> {
    let v = r.manifest.values.clone();
    let mut inputs = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |name: &'static str, x: &Tensor, y: WResult<Tensor>| {
        rows.push((name, diff(x, y)));
    };
    let (len, vocab) = (v.text_lengths.prompt as usize, v.vocab_size.max(2));
    let ids: Vec<Vec<i64>> = (0..b)
        .map(|_| {
            let row = (0..len).map(|_| (inputs.0.next_u64() % vocab) as i64);
            row.collect()
        })
        .collect();
    let ctx = r.encode_text(&ids)?;
    push("text_encoder+context_embedder", &ctx, o.encode_text(&ids));
    let steps = v.scheduler.num_train_timesteps as f32;
    let t: Vec<f32> = (0..b)
        .map(|i| steps * (i as f32 + 0.5) / b as f32)
        .collect();
    let temb = r.time_embed(&t)?;
    push("timestep_embed", &temb, o.time_embed(&t));
    let (c, s) = (v.latent_channels as usize, v.sample_size as usize);
    let latents = inputs.tensor(vec![b, c, s, s])?;
    let x = r.patch_embed(&latents)?;
    push("patch_embed", &x, o.patch_embed(&latents));
    let xi = r.blocks(&x, &ctx, &temb, Stream::Image)?;
    let other = o.blocks(&x, &ctx, &temb, Stream::Image);
    push("joint_blocks+image_tail", &xi, other);
    let yt = r.blocks(&x, &ctx, &temb, Stream::Text)?;
    let other = o.blocks(&x, &ctx, &temb, Stream::Text);
    push("joint_blocks+text_tail", &yt, other);
    let vel = r.image_head(&xi, &temb, &latents)?;
    push("image_head", &vel, o.image_head(&xi, &temb, &latents));
    push("text_head", &r.text_head(&yt)?, o.text_head(&yt));
    let image = r.vae_decode(&latents)?;
    push("vae_decoder", &image, o.vae_decode(&latents));
    let clamped = image.data.iter().map(|p| p.clamp(-1.0, 1.0)).collect();
    let image = Tensor::new(image.shape.clone(), clamped)?;
    let (mean, logvar) = r.vae_encode(&image)?;
    let (om, ol) = match o.vae_encode(&image) {
        Ok((m, l)) => (Ok(m), Ok(l)),
        Err(e) => (
            Err(e),
            Err(WorkerError::Internal("vae_encoder failed".into())),
        ),
    };
    push("vae_encoder (mean)", &mean, om);
    push("vae_encoder (logvar)", &logvar, ol);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ddit_worker::engine::EngineConfig;

    use super::*;

    /// A NaN on either side is an infinite difference, never a match.
    #[test]
    fn a_nan_output_is_an_infinite_difference() {
        let a = Tensor::new(vec![3], vec![1.0, 2.0, 3.0]).unwrap();
        let nan = Tensor::new(vec![3], vec![1.0, f32::NAN, 3.0]).unwrap();
        assert_eq!(diff(&a, Ok(a.clone())).unwrap().0, 0.0);
        assert_eq!(diff(&a, Ok(nan.clone())).unwrap().0, f32::INFINITY);
        assert_eq!(diff(&nan, Ok(a)).unwrap().0, f32::INFINITY);
    }

    /// Every segment runs on both engines, and two CPU engines of one thread agree exactly.
    #[test]
    fn every_segment_is_compared_and_two_cpu_engines_agree() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let checkpoint = root.join("tests/fixtures/tiny-f32/checkpoint");
        let o = ddit_export::ExportOptions::new(checkpoint, dir.path().join("pkg"));
        ddit_export::convert(&o).unwrap();
        let pkg = Package::open(&dir.path().join("pkg")).unwrap();
        let cfg = EngineConfig::default();
        let (mut r, mut o) = (
            Engine::load(&pkg, &cfg).unwrap(),
            Engine::load(&pkg, &cfg).unwrap(),
        );
        let rows = compare(&mut r, &mut o, ROWS).unwrap();
        assert_eq!(rows.len(), 10, "{rows:?}");
        for (segment, outcome) in rows {
            let (diff, scale) = outcome.unwrap();
            assert_eq!(diff, 0.0, "{segment}");
            assert!(scale > 0.0, "{segment}: all zeros");
        }
    }
}
