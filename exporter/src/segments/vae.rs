//! The VAE (diffusers `AutoencoderKL`): encoder to posterior mean/logvar, decoder to pixels.

use crate::checkpoint::{VaeConfig, WeightStore};
use crate::error::Result;
use crate::onnx::{Attr, Dim, Graph, Value};

use super::{Ctx, Form};

const EPS: f32 = 1e-6;

fn resnet(
    c: &mut Ctx<'_>,
    x: &str,
    p: &str,
    cin: usize,
    cout: usize,
    groups: usize,
) -> Result<Value> {
    let h = c.group_norm(x, &format!("{p}.norm1"), cin, groups, EPS)?;
    let h = c.g.silu(&h);
    let h = c.conv(&h, &format!("{p}.conv1"), (cin, cout), 3, 1, 1)?;
    let h = c.group_norm(&h, &format!("{p}.norm2"), cout, groups, EPS)?;
    let h = c.g.silu(&h);
    let h = c.conv(&h, &format!("{p}.conv2"), (cout, cout), 3, 1, 1)?;
    let skip = if cin != cout {
        c.conv(x, &format!("{p}.conv_shortcut"), (cin, cout), 1, 1, 0)?
    } else {
        x.to_string()
    };
    Ok(c.g.add(&skip, &h))
}

/// Single-head (per `attention_head_dim = channels`) spatial self-attention with residual.
fn attention(c: &mut Ctx<'_>, x: &str, p: &str, ch: usize, groups: usize) -> Result<Value> {
    let n = c.group_norm(x, &format!("{p}.group_norm"), ch, groups, EPS)?;
    let shape = c.g.shape(x);
    let flat = c.g.reshape(&n, &[0, ch as i64, -1]);
    let tokens = c.g.transpose(&flat, &[0, 2, 1]);
    let q = c.linear(&tokens, &format!("{p}.to_q"), ch, ch, true)?;
    let k = c.linear(&tokens, &format!("{p}.to_k"), ch, ch, true)?;
    let v = c.linear(&tokens, &format!("{p}.to_v"), ch, ch, true)?;
    let o = c.attention(&q, &k, &v, 1, Some(1.0 / (ch as f32).sqrt()), None);
    let o = c.linear(&o, &format!("{p}.to_out.0"), ch, ch, true)?;
    let o = c.g.transpose(&o, &[0, 2, 1]);
    let o = c.g.reshape_to(&o, &shape);
    Ok(c.g.add(&o, x))
}

fn mid_block(c: &mut Ctx<'_>, x: &str, p: &str, cfg: &VaeConfig) -> Result<Value> {
    let ch = *cfg.block_out_channels.last().unwrap_or(&1);
    let mut h = resnet(c, x, &format!("{p}.resnets.0"), ch, ch, cfg.groups)?;
    if cfg.mid_attention {
        h = attention(c, &h, &format!("{p}.attentions.0"), ch, cfg.groups)?;
    }
    resnet(c, &h, &format!("{p}.resnets.1"), ch, ch, cfg.groups)
}

fn image_dims(ch: usize, h: &'static str, w: &'static str) -> Vec<Dim> {
    vec![
        Dim::Sym("batch"),
        Dim::Fixed(ch as i64),
        Dim::Sym(h),
        Dim::Sym(w),
    ]
}

/// `image [batch, 3, height, width] in [-1, 1] -> (latent_mean, latent_logvar)`.
pub fn encoder(cfg: &VaeConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let mut c = Ctx::new("vae_encoder", w, form);
    let chans = &cfg.block_out_channels;
    let x = c.g.input(
        "image",
        c.g.float,
        image_dims(cfg.in_channels, "height", "width"),
    );
    let mut h = c.conv(&x, "encoder.conv_in", (cfg.in_channels, chans[0]), 3, 1, 1)?;
    let mut cin = chans[0];
    for (i, &cout) in chans.iter().enumerate() {
        c.g.push_scope(&format!("down{i}"));
        for j in 0..cfg.layers_per_block {
            h = resnet(
                &mut c,
                &h,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                cin,
                cout,
                cfg.groups,
            )?;
            cin = cout;
        }
        if i + 1 < chans.len() {
            // Downsample2D(padding=0): pad right and bottom by one, then a stride-2 conv.
            let pads = c.g.const_i64(&[0, 0, 0, 0, 0, 0, 1, 1]);
            let padded = c.g.op(
                "Pad",
                &[&h, &pads],
                vec![("mode", Attr::Str("constant".into()))],
            );
            h = c.conv(
                &padded,
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                (cout, cout),
                3,
                2,
                0,
            )?;
        }
        c.g.pop_scope();
    }
    h = mid_block(&mut c, &h, "encoder.mid_block", cfg)?;
    h = c.group_norm(&h, "encoder.conv_norm_out", cin, cfg.groups, EPS)?;
    h = c.g.silu(&h);
    let lc = cfg.latent_channels;
    h = c.conv(&h, "encoder.conv_out", (cin, 2 * lc), 3, 1, 1)?;
    if cfg.use_quant_conv {
        h = c.conv(&h, "quant_conv", (2 * lc, 2 * lc), 1, 1, 0)?;
    }
    let parts = c.g.split_equal(&h, 1, 2);
    let lo = c.g.scalar(-30.0);
    let hi = c.g.scalar(20.0);
    let logvar = c.g.op("Clip", &[&parts[1], &lo, &hi], vec![]);
    c.g.output(
        &parts[0],
        "latent_mean",
        c.g.float,
        image_dims(lc, "latent_height", "latent_width"),
    );
    c.g.output(
        &logvar,
        "latent_logvar",
        c.g.float,
        image_dims(lc, "latent_height", "latent_width"),
    );
    Ok(c.g)
}

/// `latent [batch, C, h, w]` (VAE space: `z/scale + shift` already applied) -> image in [-1, 1].
pub fn decoder(cfg: &VaeConfig, w: &WeightStore, form: Form) -> Result<Graph> {
    let mut c = Ctx::new("vae_decoder", w, form);
    let lc = cfg.latent_channels;
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let z = c.g.input(
        "latent",
        c.g.float,
        image_dims(lc, "latent_height", "latent_width"),
    );
    let mut h = z.clone();
    if cfg.use_post_quant_conv {
        h = c.conv(&h, "post_quant_conv", (lc, lc), 1, 1, 0)?;
    }
    h = c.conv(&h, "decoder.conv_in", (lc, rev[0]), 3, 1, 1)?;
    h = mid_block(&mut c, &h, "decoder.mid_block", cfg)?;
    let mut cin = rev[0];
    for (i, &cout) in rev.iter().enumerate() {
        c.g.push_scope(&format!("up{i}"));
        for j in 0..=cfg.layers_per_block {
            h = resnet(
                &mut c,
                &h,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                cout,
                cfg.groups,
            )?;
            cin = cout;
        }
        if i + 1 < rev.len() {
            let empty = String::new();
            let scales = c.g.const_f32(&[1.0, 1.0, 2.0, 2.0], vec![4]);
            h = c.g.op(
                "Resize",
                &[&h, &empty, &scales],
                vec![
                    ("mode", Attr::Str("nearest".into())),
                    (
                        "coordinate_transformation_mode",
                        Attr::Str("asymmetric".into()),
                    ),
                    ("nearest_mode", Attr::Str("floor".into())),
                ],
            );
            h = c.conv(
                &h,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                (cout, cout),
                3,
                1,
                1,
            )?;
        }
        c.g.pop_scope();
    }
    h = c.group_norm(&h, "decoder.conv_norm_out", cin, cfg.groups, EPS)?;
    h = c.g.silu(&h);
    h = c.conv(&h, "decoder.conv_out", (cin, cfg.out_channels), 3, 1, 1)?;
    c.g.output(
        &h,
        "image",
        c.g.float,
        image_dims(cfg.out_channels, "height", "width"),
    );
    Ok(c.g)
}
