//! TensorRT optimization profiles, derived from the manifest and the worker's two bounds,
//! `--max-batch` and `--max-side` (the same values that refuse larger jobs at admission).
//!
//! TensorRT builds an engine for a range of input shapes: each symbolic dimension of a segment's
//! inputs gets a (min, opt, max) from what the runner can send it. Every segment input is an
//! ordinary tensor (no shape values: the image head reads the latents' shape, not a grid), so a
//! profile for each graph input is a profile for every dynamic input TensorRT sees.
//!
//! - `batch`: 1 to `2 × max_batch` rows (a generate chunk of `max_batch` images with guidance
//!   runs both halves), opt the largest; the text head gets all masked positions as one row, and
//!   the VAE one image at a time.
//! - `text_len`: 1 to the longest canvas (`MAX_CANVAS`, or longer manifest lengths), opt the
//!   prompt length; for the text head, up to `max_batch ×` that, opt the caption canvas.
//! - latent sides: the patch size to `--max-side` / VAE factor (a multiple of the patch size,
//!   never past the position table's reach, never under the native size captioning uses), opt
//!   the native sample size; `image_tokens` accordingly; pixel sides are those times the VAE
//!   factor.

use ddit_schemas::{Dim, Manifest, Role, SegmentSpec};

use super::providers::TensorRtOptions;
use crate::tasks::MAX_CANVAS;

/// One segment's profile as ONNX Runtime's `trt_profile_{min,opt,max}_shapes` strings
/// (`input:1x16,other:1x16x128`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtProfile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// (min, opt, max) of a latent side.
fn latent_side(m: &Manifest, max_side: u32) -> [u64; 3] {
    let v = &m.values;
    let (p, f) = (v.patch_size.max(1), v.vae.downsample_factor.max(1));
    let reach = v.pos_embed_max_size * p;
    let bounded = (u64::from(max_side) / f / p * p).min(reach);
    let max = bounded.max(v.sample_size.min(reach)).max(p);
    [p, v.sample_size.clamp(p, max), max]
}

/// (min, opt, max) of the symbolic dimension `dim` of a `role` segment's input.
fn range(dim: &str, role: Role, m: &Manifest, trt: &TensorRtOptions) -> Option<[u64; 3]> {
    let v = &m.values;
    let max_batch = trt.max_batch.max(1) as u64;
    let lens = &v.text_lengths;
    let longest = [lens.prompt, lens.caption, lens.vqa, u64::from(MAX_CANVAS)]
        .into_iter()
        .max()
        .unwrap_or(1);
    let (p, f) = (v.patch_size.max(1), v.vae.downsample_factor.max(1));
    let side = latent_side(m, trt.max_side);
    let tokens = |s: u64| (s / p) * (s / p);
    Some(match (dim, role) {
        ("batch", Role::TextHead | Role::VaeEncoder | Role::VaeDecoder) => [1, 1, 1],
        ("batch", _) => [1, 2 * max_batch, 2 * max_batch],
        ("text_len", Role::TextHead) => [1, max_batch * lens.caption, max_batch * longest],
        ("text_len", _) => [1, lens.prompt, longest],
        ("latent_height" | "latent_width", _) => side,
        ("image_tokens", _) => [1, tokens(side[1]), tokens(side[2])],
        ("height" | "width", _) => side.map(|s| s * f),
        _ => return None,
    })
}

/// The profile of `spec`, or `None` when it has no symbolic input dimension. An input dimension
/// this module does not know is an error naming it: TensorRT would otherwise build for whatever
/// shape comes first.
pub fn trt_profile(
    spec: &SegmentSpec,
    m: &Manifest,
    trt: &TensorRtOptions,
) -> Result<Option<TrtProfile>, String> {
    let mut parts: [Vec<String>; 3] = Default::default();
    for input in &spec.inputs {
        if input.shape.iter().all(|d| matches!(d, Dim::Fixed(_))) {
            continue;
        }
        let mut dims: [Vec<String>; 3] = Default::default();
        for d in &input.shape {
            let r = match d {
                Dim::Fixed(n) => [*n; 3],
                Dim::Sym(s) => range(s, spec.role, m, trt).ok_or_else(|| {
                    format!(
                        "segment {} input {}: no profile for dimension `{s}`",
                        spec.name, input.name
                    )
                })?,
            };
            for (k, n) in r.iter().enumerate() {
                dims[k].push(n.to_string());
            }
        }
        for (k, d) in dims.iter().enumerate() {
            parts[k].push(format!("{}:{}", input.name, d.join("x")));
        }
    }
    if parts[0].is_empty() {
        return Ok(None);
    }
    let [min, opt, max] = parts.map(|p| p.join(","));
    Ok(Some(TrtProfile { min, opt, max }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest of the bundled demo model, exported here with `edit` applied to the options.
    fn export(edit: impl FnOnce(&mut ddit_export::ExportOptions)) -> Manifest {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = tempfile::tempdir().expect("tmp");
        let mut o = ddit_export::ExportOptions::new(root.join("models/ddit-shapes"), out.path());
        edit(&mut o);
        ddit_export::convert(&o).expect("export")
    }

    fn manifest() -> Manifest {
        export(|_| {})
    }

    fn trt(max_batch: usize, max_side: u32) -> TensorRtOptions {
        TensorRtOptions {
            max_batch,
            max_side,
            ..TensorRtOptions::default()
        }
    }

    fn profile(m: &Manifest, role: Role, max_batch: usize) -> TrtProfile {
        let spec = m.by_role(role).next().expect("segment");
        trt_profile(spec, m, &trt(max_batch, 1024))
            .expect("known dims")
            .expect("symbolic dims")
    }

    #[test]
    fn profiles_cover_what_the_runner_sends() {
        let m = manifest();
        let blocks = profile(&m, Role::JointBlocks, 8);
        assert_eq!(
            blocks.min,
            "image_tokens:1x1x128,text_tokens:1x1x128,temb:1x128"
        );
        assert_eq!(
            blocks.opt,
            "image_tokens:16x64x128,text_tokens:16x16x128,temb:16x128"
        );
        assert_eq!(
            blocks.max,
            "image_tokens:16x256x128,text_tokens:16x1024x128,temb:16x128"
        );
        let head = profile(&m, Role::TextHead, 4);
        assert_eq!(
            (head.min.as_str(), head.opt.as_str(), head.max.as_str()),
            (
                "text_tokens:1x1x128",
                "text_tokens:1x64x128",
                "text_tokens:1x4096x128"
            )
        );
        let vae = profile(&m, Role::VaeEncoder, 8);
        assert_eq!(
            (vae.min.as_str(), vae.opt.as_str(), vae.max.as_str()),
            ("image:1x3x4x4", "image:1x3x32x32", "image:1x3x64x64")
        );
        // The image head reads the latents for their shape: profiled like every other input.
        let head = profile(&m, Role::ImageHead, 1);
        assert_eq!(
            head.max,
            "image_tokens:2x256x128,temb:2x128,latents:2x4x16x16"
        );
    }

    #[test]
    fn max_side_bounds_the_image_dimensions_but_never_below_the_native_size() {
        let m = manifest();
        let spec = |role| m.by_role(role).next().expect("segment");
        // The demo model: VAE factor 4, patch 1, native latent 8, position reach 16.
        let at = |side| {
            let p = trt_profile(spec(Role::ImageHead), &m, &trt(1, side));
            p.expect("known").expect("symbolic").max
        };
        assert_eq!(
            at(40),
            "image_tokens:2x100x128,temb:2x128,latents:2x4x10x10"
        );
        assert_eq!(at(8), "image_tokens:2x64x128,temb:2x128,latents:2x4x8x8");
        assert_eq!(at(1 << 20), at(64));
        let vae = trt_profile(spec(Role::VaeDecoder), &m, &trt(1, 40));
        assert_eq!(
            vae.expect("known").expect("symbolic").max,
            "latent:1x4x10x10"
        );
    }

    /// Every input of every segment with a symbolic dimension gets a profile that names it, for
    /// the default package, the TensorRT target and a package split into many files.
    #[test]
    fn every_dynamic_input_of_every_exported_segment_has_a_profile() {
        let packages = [
            manifest(),
            export(|o| o.target = ddit_export::Target::TensorRt),
            export(|o| {
                o.target = ddit_export::Target::TensorRt;
                o.max_file_bytes = 2_500_000;
            }),
        ];
        for m in &packages {
            for spec in &m.segments {
                let p = trt_profile(spec, m, &trt(8, 1024)).expect("known dims");
                for input in &spec.inputs {
                    let dynamic = input.shape.iter().any(|d| matches!(d, Dim::Sym(_)));
                    let named = |s: &str| {
                        s.split(',')
                            .any(|e| e.starts_with(&format!("{}:", input.name)))
                    };
                    let p = p.as_ref();
                    assert_eq!(
                        p.is_some_and(|p| named(&p.min) && named(&p.opt) && named(&p.max)),
                        dynamic,
                        "segment {} input {}",
                        spec.name,
                        input.name
                    );
                }
            }
        }
        // The split package really is split (block files of one block each; T5 pieces are
        // covered by worker/tests/packages.rs, on a checkpoint whose T5 layers are large enough).
        assert_eq!(packages[2].by_role(Role::JointBlocks).count(), 3);
    }

    #[test]
    fn an_unknown_dimension_is_named() {
        let mut m = manifest();
        let seg = m
            .segments
            .iter_mut()
            .find(|s| s.role == Role::TextEncoder)
            .expect("text encoder");
        seg.inputs[0].shape[1] = Dim::Sym("mystery".into());
        let spec = m.by_role(Role::TextEncoder).next().expect("segment");
        let err = trt_profile(spec, &m, &trt(8, 1024)).expect_err("unknown dim");
        assert!(
            err.contains("mystery") && err.contains("input_ids"),
            "{err}"
        );
    }
}
