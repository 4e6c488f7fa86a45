//! The manifest contract and `inspect`'s hash verification.
#![allow(clippy::unwrap_used)]

mod common;

use common::{copy_checkpoint, edit_config, export};
use ddit_export::{verify, ExportError};
use ddit_schemas::PackageError;
use ddit_schemas::{Dim, Role, TensorDtype};

#[test]
fn manifest_is_valid_against_schema_and_complete() {
    let (dir, m) = export("tiny-f32", |o| o.blocks_per_segment = Some(3));
    let text = std::fs::read_to_string(dir.path().join("pkg/manifest.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let schema: serde_json::Value = serde_json::from_str(ddit_schemas::MANIFEST_SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");

    let v = &m.values;
    assert_eq!(
        (
            v.tokens.mask_token.as_str(),
            v.tokens.mask_id,
            v.tokens.pad_id,
            v.tokens.eos_id
        ),
        ("<extra_id_0>", 46, 0, 1)
    );
    assert_eq!(
        (v.vocab_size, v.latent_channels, v.patch_size, v.hidden_size),
        (47, 4, 2, 16)
    );
    assert_eq!(
        (
            v.vae.scaling_factor,
            v.vae.shift_factor,
            v.vae.downsample_factor
        ),
        (1.5305, 0.0609, 2)
    );
    assert_eq!(
        (v.scheduler.shift, v.scheduler.num_train_timesteps),
        (3.0, 1000)
    );
    assert_eq!(
        (
            v.text_lengths.prompt,
            v.text_lengths.caption,
            v.text_lengths.vqa
        ),
        (256, 128, 128)
    );
    for role in Role::ALL {
        assert!(m.by_role(role).count() >= 1, "no segment for {role}");
    }
    let te = m.by_role(Role::TextEncoder).next().unwrap();
    assert_eq!(te.inputs[0].dtype, TensorDtype::I64);
    assert_eq!(
        te.inputs[0].shape,
        vec![Dim::Sym("batch".into()), Dim::Sym("text_len".into())]
    );
    let jb = m.by_role(Role::JointBlocks).next().unwrap();
    assert_eq!(jb.inputs[0].shape[1], Dim::Sym("image_tokens".into()));
    // Parameter counts add up to the checkpoint's: every transformer tensor is used once, except
    // that both tails hold the last block's modulation, keys and values, and each tail only its own
    // stream's queries.
    let exported: u64 = m
        .segments
        .iter()
        .filter(|s| {
            !matches!(
                s.role,
                Role::TextEncoder | Role::VaeEncoder | Role::VaeDecoder | Role::TextTail
            )
        })
        .map(|s| s.parameters)
        .sum();
    let store = ddit_export::checkpoint::WeightStore::open(
        &common::checkpoint("tiny-f32").join("transformer"),
        "diffusion_pytorch_model",
    )
    .unwrap();
    let size = |k: &str| store.shape_of(k).unwrap().iter().product::<usize>() as u64;
    let in_checkpoint: u64 = store.keys().map(|k| size(k)).sum();
    let text_only: u64 = store
        .keys()
        .filter(|k| {
            ["ff_context.", "attn.to_add_out.", "attn.add_q_proj."]
                .iter()
                .any(|p| k.starts_with(&format!("transformer_blocks.3.{p}")))
        })
        .map(|k| size(k))
        .sum();
    assert!(text_only > 0);
    assert_eq!(exported + text_only, in_checkpoint);
}

#[test]
fn inspect_detects_a_changed_file() {
    let (dir, m) = export("tiny-f32", |_| {});
    let pkg = dir.path().join("pkg");
    verify(&pkg).unwrap();
    let target = pkg.join(&m.by_role(Role::TextHead).next().unwrap().files[0].path);
    let mut bytes = std::fs::read(&target).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&target, bytes).unwrap();
    match verify(&pkg) {
        Err(ExportError::Verify(PackageError::HashMismatch { path, .. })) => {
            assert_eq!(path, target)
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
}

#[test]
fn export_refuses_to_overwrite_without_force() {
    let (dir, _) = export("tiny-f32", |_| {});
    let mut o =
        ddit_export::ExportOptions::new(common::checkpoint("tiny-f32"), dir.path().join("pkg"));
    assert!(matches!(
        ddit_export::convert(&o),
        Err(ExportError::Argument { .. })
    ));
    o.force = true;
    ddit_export::convert(&o).unwrap();
}

#[test]
fn caption_prompt_comes_from_the_checkpoint_unless_overridden() {
    let (dir, ck) = copy_checkpoint("tiny-f32");
    let convert = |sub: &str, prompt: Option<&str>| {
        let mut o = ddit_export::ExportOptions::new(&ck, dir.path().join(sub));
        o.caption_prompt = prompt.map(String::from);
        ddit_export::convert(&o).unwrap().values.caption_prompt
    };
    // The published D-DiT has none.
    assert_eq!(convert("plain", None), None);
    edit_config(
        &ck.join("model_index.json"),
        "caption_prompt",
        serde_json::json!("Describe the image."),
    );
    assert_eq!(
        convert("from-checkpoint", None).as_deref(),
        Some("Describe the image.")
    );
    assert_eq!(convert("none", Some("")), None);
    assert_eq!(
        convert("flag", Some("a photo of")).as_deref(),
        Some("a photo of")
    );
    // Recorded in manifest.json, which still validates against the schema.
    let text = std::fs::read_to_string(dir.path().join("flag/manifest.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["values"]["caption_prompt"], "a photo of");
    let schema: serde_json::Value = serde_json::from_str(ddit_schemas::MANIFEST_SCHEMA).unwrap();
    assert!(jsonschema::validator_for(&schema).unwrap().is_valid(&value));
}

#[test]
fn canvas_lengths_come_from_the_checkpoint_unless_overridden() {
    let (dir, ck) = copy_checkpoint("tiny-f32");
    let convert = |sub: &str, vqa: Option<u64>| {
        let mut o = ddit_export::ExportOptions::new(&ck, dir.path().join(sub));
        o.text_lengths.vqa = vqa;
        let t = ddit_export::convert(&o).unwrap().values.text_lengths;
        (t.prompt, t.caption, t.vqa)
    };
    // The published D-DiT's lengths when the checkpoint names none.
    assert_eq!(convert("plain", None), (256, 128, 128));
    edit_config(
        &ck.join("model_index.json"),
        "text_lengths",
        serde_json::json!({"prompt": 16, "caption": 12}),
    );
    assert_eq!(convert("from-checkpoint", None), (16, 12, 128));
    assert_eq!(convert("flag", Some(40)), (16, 12, 40));
    // A bad value names the key.
    edit_config(
        &ck.join("model_index.json"),
        "text_lengths",
        serde_json::json!({"caption": 0}),
    );
    let mut o = ddit_export::ExportOptions::new(&ck, dir.path().join("bad"));
    o.force = true;
    let e = ddit_export::convert(&o).unwrap_err().to_string();
    assert!(e.contains("text_lengths.caption"), "{e}");
}
