//! Per-segment and chained parity of an exported package against golden outputs (`golden.rs`,
//! `precision.rs`).

use std::collections::HashMap;
use std::path::Path;

use ddit_schemas::{Manifest, Precision, Role, SegmentSpec};

use super::{f32s, max_err, nan_max, run, Gold};

/// Bounds on the max abs error of one package: `t5` for a text encoder and `blocks` for joint
/// blocks and tails that run int8 `MatMul`s or compute in half precision, `vae` for a
/// half-precision VAE, `half` for the other half-precision segments, `velocity` and `logits` for the chained transformer, `plain` for every
/// fp32 segment without int8 `MatMul`s.
pub struct Tolerances {
    pub plain: f32,
    pub t5: f32,
    pub blocks: f32,
    pub half: f32,
    pub vae: f32,
    pub velocity: f32,
    pub logits: f32,
}

impl Tolerances {
    pub const fn all(tol: f32) -> Self {
        Self {
            plain: tol,
            t5: tol,
            blocks: tol,
            half: tol,
            vae: tol,
            velocity: tol,
            logits: tol,
        }
    }

    fn segment(&self, seg: &SegmentSpec, int8: bool) -> f32 {
        let block = matches!(
            seg.role,
            Role::JointBlocks | Role::ImageTail | Role::TextTail
        );
        match (int8, seg.precision, seg.role) {
            (true, _, Role::TextEncoder) => self.t5,
            (true, _, _) if block => self.blocks,
            (true, _, r) => panic!("{}: int8 MatMuls in a {r:?} segment", seg.name),
            (false, Precision::Fp32, _) => self.plain,
            (false, _, _) if block => self.blocks,
            (false, _, Role::VaeEncoder | Role::VaeDecoder) => self.vae,
            (false, _, _) => self.half,
        }
    }
}

/// Whether a segment's graph holds an int8 `MatMul` (`MatMulIntegerToFloat`).
pub fn has_int8(pkg: &Path, seg: &SegmentSpec) -> bool {
    let bytes = std::fs::read(pkg.join(&seg.files[0].path)).unwrap();
    let op = b"MatMulIntegerToFloat";
    bytes.windows(op.len()).any(|w| w == op)
}

pub fn inputs(seg: &ddit_schemas::SegmentSpec, vals: Vec<Gold>) -> Vec<(&str, Gold)> {
    assert_eq!(seg.inputs.len(), vals.len(), "{}: input count", seg.name);
    seg.inputs
        .iter()
        .map(|s| s.name.as_str())
        .zip(vals)
        .collect()
}

/// One comparison: (segment/output, max abs error, tolerance).
pub type Checked = (String, f32, f32);

/// Runs every segment on its golden inputs; returns each output's error and tolerance.
pub fn check_segments(
    pkg: &Path,
    m: &Manifest,
    g: &HashMap<String, Gold>,
    tol: &Tolerances,
) -> Vec<Checked> {
    let n = m.values.num_layers as usize;
    let mut errs = Vec::new();
    let mut covered = vec![false; n];
    for seg in &m.segments {
        let (ins, want): (Vec<Gold>, Vec<Gold>) = match seg.role {
            Role::TextEncoder => (
                vec![g["t5.input_ids"].clone()],
                vec![g["t5.hidden"].clone()],
            ),
            Role::ContextEmbedder => (vec![g["t5.hidden"].clone()], vec![g["ctx.out"].clone()]),
            Role::TimestepEmbed => (vec![g["time.t"].clone()], vec![g["time.temb"].clone()]),
            Role::PatchEmbed => (
                vec![g["patch.latents"].clone()],
                vec![g["patch.tokens"].clone()],
            ),
            Role::NullImage => {
                let (s, v) = g["null.out"].f32();
                let mut rep = v.to_vec();
                rep.extend_from_slice(v);
                (
                    vec![g["blocks.temb"].clone()],
                    vec![f32s(&[2, s[1], s[2]], rep)],
                )
            }
            Role::JointBlocks | Role::ImageTail | Role::TextTail => {
                let [s, e] = seg.blocks.unwrap();
                let (s, e) = (s as usize, e as usize);
                covered[s..e].iter_mut().for_each(|c| *c = true);
                let x = g[&format!("blocks.x.{e}")].clone();
                let y = g[&format!("blocks.y.{e}")].clone();
                (
                    vec![
                        g[&format!("blocks.x.{s}")].clone(),
                        g[&format!("blocks.y.{s}")].clone(),
                        g["blocks.temb"].clone(),
                    ],
                    match seg.role {
                        Role::ImageTail => vec![x],
                        Role::TextTail => vec![y],
                        _ => vec![x, y],
                    },
                )
            }
            Role::ImageHead => (
                vec![
                    g[&format!("blocks.x.{n}")].clone(),
                    g["blocks.temb"].clone(),
                    // Latents of the velocity's shape (a 3 x 5 patch grid): only their shape
                    // is read.
                    {
                        let (shape, v) = g["image_head.out"].f32();
                        Gold::F32(shape.to_vec(), vec![0.0; v.len()])
                    },
                ],
                vec![g["image_head.out"].clone()],
            ),
            Role::TextHead => (
                vec![g[&format!("blocks.y.{n}")].clone()],
                vec![g["text_head.out"].clone()],
            ),
            Role::VaeEncoder => (
                vec![g["vae_enc.image"].clone()],
                vec![g["vae_enc.mean"].clone(), g["vae_enc.logvar"].clone()],
            ),
            Role::VaeDecoder => (
                vec![g["vae_dec.z"].clone()],
                vec![g["vae_dec.image"].clone()],
            ),
        };
        let outs = run(pkg, seg, inputs(seg, ins));
        let bound = tol.segment(seg, has_int8(pkg, seg));
        for (i, (o, w)) in outs.iter().zip(&want).enumerate() {
            let tag = format!("{}/{}", seg.name, seg.outputs[i].name);
            errs.push((tag.clone(), max_err(&tag, o, w), bound));
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "joint-block segments must cover every block"
    );
    errs
}

/// The whole transformer by chaining segments: ids -> T5 -> context; latents -> patches; blocks
/// across every joint file; heads. Returns (velocity error, logits error).
pub fn check_chain(pkg: &Path, m: &Manifest, g: &HashMap<String, Gold>) -> (f32, f32) {
    let one = |role: Role| m.by_role(role).next().unwrap();
    let seg_in =
        |seg: &ddit_schemas::SegmentSpec, vals: Vec<Gold>| run(pkg, seg, inputs(seg, vals));
    let as_gold = |o: &(Vec<usize>, Vec<f32>)| Gold::F32(o.0.clone(), o.1.clone());
    let t5 = seg_in(one(Role::TextEncoder), vec![g["full.input_ids"].clone()]);
    let ctx = seg_in(one(Role::ContextEmbedder), vec![as_gold(&t5[0])]);
    let temb = seg_in(one(Role::TimestepEmbed), vec![g["full.timestep"].clone()]);
    let mut x = seg_in(one(Role::PatchEmbed), vec![g["full.latents"].clone()]).remove(0);
    let mut y = ctx[0].clone();
    for seg in m.by_role(Role::JointBlocks) {
        let out = seg_in(seg, vec![as_gold(&x), as_gold(&y), as_gold(&temb[0])]);
        x = out[0].clone();
        y = out[1].clone();
    }
    let last = vec![as_gold(&x), as_gold(&y), as_gold(&temb[0])];
    let x = seg_in(one(Role::ImageTail), last.clone()).remove(0);
    let y = seg_in(one(Role::TextTail), last).remove(0);
    let vel = seg_in(
        one(Role::ImageHead),
        vec![as_gold(&x), as_gold(&temb[0]), g["full.latents"].clone()],
    );
    let logits = seg_in(one(Role::TextHead), vec![as_gold(&y)]);
    (
        max_err("velocity", &vel[0], &g["full.velocity"]),
        max_err("logits", &logits[0], &g["full.logits"]),
    )
}

/// Prints every error, then fails on the first one that is NaN, infinite or over its tolerance.
pub fn assert_within(variant: &str, errs: &[Checked]) {
    for (tag, e, tol) in errs {
        println!("{variant:>14} {tag:<40} max abs err {e:.3e} (tolerance {tol:.1e})");
    }
    let worst = nan_max(errs.iter().map(|e| e.1));
    println!("{variant:>14} worst {worst:.3e}");
    for (tag, e, tol) in errs {
        assert!(
            e.is_finite() && e <= tol,
            "{variant}: {tag} max abs err {e:.3e} > {tol:.1e}"
        );
    }
}

/// Every segment on its golden inputs, then the chained transformer.
pub fn check_package(
    pkg: &Path,
    m: &Manifest,
    g: &HashMap<String, Gold>,
    tol: &Tolerances,
) -> Vec<Checked> {
    let mut errs = check_segments(pkg, m, g, tol);
    let (ev, el) = check_chain(pkg, m, g);
    errs.push(("chain/velocity".into(), ev, tol.velocity));
    errs.push(("chain/logits".into(), el, tol.logits));
    errs
}
