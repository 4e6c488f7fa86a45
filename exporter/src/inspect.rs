//! `ddit-export inspect`: verify a package (the one verifier in `ddit-schemas`) and summarize it.

use std::path::Path;

use ddit_schemas::Manifest;

use crate::error::Result;

/// Verifies `pkg` (manifest rules, every file's size and sha256, the package hash).
pub fn verify(pkg: &Path) -> Result<Manifest> {
    Ok(ddit_schemas::verify_package(pkg)?)
}

/// A printable summary of a verified package (`ddit-export inspect`).
pub fn summary(m: &Manifest) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} ({} weights, opset {}), hash {}",
        m.model.name, m.model.weights_dtype, m.model.opset, m.model.hash
    );
    let v = &m.values;
    let _ = writeln!(
        s,
        "hidden {} x {} layers, {} heads, patch {}, {} latent channels, vocab {}, mask id {} ({}), pad {}, eos {}",
        v.hidden_size, v.num_layers, v.num_heads, v.patch_size, v.latent_channels, v.vocab_size,
        v.tokens.mask_id, v.tokens.mask_token, v.tokens.pad_id, v.tokens.eos_id
    );
    let _ = writeln!(
        s,
        "text canvases: prompt {}, caption {}, vqa {} tokens; caption prompt {}",
        v.text_lengths.prompt,
        v.text_lengths.caption,
        v.text_lengths.vqa,
        v.caption_prompt
            .as_deref()
            .map_or("none".to_string(), |p| format!("{p:?}"))
    );
    let _ = writeln!(
        s,
        "{:<24} {:<16} {:<9} {:>14} {:>14}  files",
        "segment", "role", "precision", "parameters", "bytes"
    );
    let (mut tp, mut tb) = (0u64, 0u64);
    for seg in &m.segments {
        let bytes: u64 = seg.files.iter().map(|f| f.bytes).sum();
        tp += seg.parameters;
        tb += bytes;
        let files: Vec<&str> = seg.files.iter().map(|f| f.path.as_str()).collect();
        let _ = writeln!(
            s,
            "{:<24} {:<16} {:<9} {:>14} {:>14}  {}",
            seg.name,
            seg.role.as_str(),
            seg.precision.as_str(),
            seg.parameters,
            bytes,
            files.join(" + ")
        );
    }
    let _ = writeln!(
        s,
        "{:<24} {:<16} {:<9} {:>14} {:>14}",
        "total",
        "",
        "",
        tp,
        tb + m.tokenizer.bytes
    );
    let _ = writeln!(s, "all {} file hashes verified", m.files().count());
    s
}
