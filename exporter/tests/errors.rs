//! Bad checkpoints get typed errors that name the file, key or tensor, never a panic.
#![allow(clippy::unwrap_used)]

mod common;

use common::{copy_checkpoint, edit_config};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ddit_export::{convert, ExportError, ExportOptions};
use safetensors::tensor::{Dtype, TensorView};

fn export_err(ckpt: &Path) -> ExportError {
    let out = ckpt.parent().unwrap().join("pkg");
    match convert(&ExportOptions::new(ckpt, out)) {
        Ok(_) => panic!("export of a broken checkpoint succeeded"),
        Err(e) => {
            println!("{e}");
            e
        }
    }
}

/// Rewrites a safetensors file through `edit` (name -> (dtype, shape, bytes)).
fn rewrite(path: &Path, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView<'_>)> = map
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn transformer_file(ckpt: &Path) -> PathBuf {
    ckpt.join("transformer/diffusion_pytorch_model.safetensors")
}

#[test]
fn missing_file_is_named() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    std::fs::remove_file(ck.join("vae/config.json")).unwrap();
    match export_err(&ck) {
        ExportError::MissingFile { path, .. } => assert!(path.ends_with("vae/config.json")),
        e => panic!("{e:?}"),
    }
    let (_d, ck) = copy_checkpoint("tiny-f32");
    std::fs::remove_file(transformer_file(&ck)).unwrap();
    match export_err(&ck) {
        ExportError::MissingFile { path, .. } => {
            assert!(path.ends_with("diffusion_pytorch_model.safetensors"))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_tokenizer_json_mentions_spiece() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    std::fs::remove_file(ck.join("tokenizer/tokenizer.json")).unwrap();
    std::fs::write(ck.join("tokenizer/spiece.model"), b"x").unwrap();
    match export_err(&ck) {
        ExportError::MissingFile { path, what } => {
            assert!(path.ends_with("tokenizer/tokenizer.json"));
            assert!(what.contains("spiece.model"), "{what}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    rewrite(&transformer_file(&ck), |m| {
        m.remove("transformer_blocks.2.attn.to_k.weight");
    });
    match export_err(&ck) {
        ExportError::MissingTensor { key, component, .. } => {
            assert_eq!(key, "transformer_blocks.2.attn.to_k.weight");
            assert_eq!(component, "transformer");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn wrong_shape_gives_expected_and_actual() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    rewrite(&transformer_file(&ck), |m| {
        let t = m.get_mut("context_embedder.weight").unwrap();
        t.1 = vec![12, 16];
    });
    match export_err(&ck) {
        ExportError::WrongShape {
            key,
            expected,
            actual,
            ..
        } => {
            assert_eq!(key, "context_embedder.weight");
            assert_eq!(expected, vec![16, 12]);
            assert_eq!(actual, vec![12, 16]);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    rewrite(&transformer_file(&ck), |m| {
        let t = m.get_mut("image_proj_out.bias").unwrap();
        // Same byte count, reinterpreted as I32.
        t.0 = Dtype::I32;
    });
    match export_err(&ck) {
        ExportError::UnsupportedDtype { key, dtype, .. } => {
            assert_eq!(key, "image_proj_out.bias");
            assert_eq!(dtype, "I32");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn qk_norm_is_refused() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    edit_config(
        &ck.join("transformer/config.json"),
        "qk_norm",
        "rms_norm".into(),
    );
    match export_err(&ck) {
        ExportError::UnsupportedConfig { key, value, .. } => {
            assert_eq!(key, "qk_norm");
            assert_eq!(value, "\"rms_norm\"");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn dual_attention_layers_are_refused() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    edit_config(
        &ck.join("transformer/config.json"),
        "dual_attention_layers",
        serde_json::json!([0, 1]),
    );
    match export_err(&ck) {
        ExportError::UnsupportedConfig { key, .. } => assert_eq!(key, "dual_attention_layers"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn bad_config_value_names_the_key() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    edit_config(
        &ck.join("transformer/config.json"),
        "num_layers",
        serde_json::json!(-3),
    );
    match export_err(&ck) {
        ExportError::Config { key, path, .. } => {
            assert_eq!(key, "num_layers");
            assert!(path.ends_with("transformer/config.json"));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn truncated_safetensors_is_refused() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    let f = transformer_file(&ck);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    match export_err(&ck) {
        ExportError::BadSafetensors { path, .. } => assert_eq!(path, f),
        e => panic!("{e:?}"),
    }
    // A file cut inside its header, and an empty one.
    std::fs::write(&f, &bytes[..20]).unwrap();
    assert!(matches!(
        export_err(&ck),
        ExportError::BadSafetensors { .. }
    ));
    std::fs::write(&f, b"").unwrap();
    assert!(matches!(
        export_err(&ck),
        ExportError::BadSafetensors { .. }
    ));
}

#[test]
fn truncated_shard_is_refused() {
    let (_d, ck) = copy_checkpoint("tiny-sharded");
    let shard = ck.join("transformer/diffusion_pytorch_model-00003-of-00005.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    match export_err(&ck) {
        ExportError::BadSafetensors { path, .. } => assert_eq!(path, shard),
        e => panic!("{e:?}"),
    }
}

#[test]
fn shard_index_pointing_to_the_wrong_shard_is_refused() {
    let (_d, ck) = copy_checkpoint("tiny-sharded");
    let idx = ck.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    let map = v["weight_map"].as_object_mut().unwrap();
    let key = "pos_embed.proj.weight";
    let current = map[key].as_str().unwrap().to_string();
    let other = map
        .values()
        .map(|s| s.as_str().unwrap().to_string())
        .find(|s| *s != current)
        .unwrap();
    map.insert(key.into(), other.into());
    std::fs::write(&idx, serde_json::to_string(&v).unwrap()).unwrap();
    match export_err(&ck) {
        ExportError::BadShardIndex { key: k, .. } => assert_eq!(k, key),
        e => panic!("{e:?}"),
    }
}

#[test]
fn garbage_json_is_a_typed_error() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    std::fs::write(ck.join("scheduler/scheduler_config.json"), b"{not json").unwrap();
    match export_err(&ck) {
        ExportError::Json { path, .. } => {
            assert!(path.ends_with("scheduler/scheduler_config.json"))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn tokenizer_without_the_mask_token_is_refused() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    let mut o = ExportOptions::new(&ck, ck.parent().unwrap().join("pkg"));
    o.mask_token = Some("<mask>".into());
    match convert(&o) {
        Err(ExportError::Tokenizer { message, .. }) => {
            assert!(message.contains("<mask>"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_blocks_per_segment_is_an_argument_error() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    let mut o = ExportOptions::new(&ck, ck.parent().unwrap().join("pkg"));
    o.blocks_per_segment = Some(0);
    assert!(matches!(convert(&o), Err(ExportError::Argument { .. })));
}

#[test]
fn caption_prompt_must_be_a_string() {
    let (_d, ck) = copy_checkpoint("tiny-f32");
    edit_config(
        &ck.join("model_index.json"),
        "caption_prompt",
        serde_json::json!(5),
    );
    match export_err(&ck) {
        ExportError::Config { key, path, .. } => {
            assert_eq!(key, "caption_prompt");
            assert!(path.ends_with("model_index.json"));
        }
        e => panic!("{e:?}"),
    }
}
