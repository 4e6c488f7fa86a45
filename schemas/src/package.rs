//! Verifying a model package, once for every caller (`ddit-export inspect`, the worker's load,
//! `fetch-model`): the pure checks on a manifest ([`Manifest::validate`]) and one streaming
//! sha256 of each file ([`verify_package`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::{FileEntry, Manifest, Role, SegmentSpec, TensorDtype};
use crate::MANIFEST_FORMAT_VERSION;

/// The manifest's file name inside a package folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Why a package was refused. Every variant names the offending file.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("package file {path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is unreadable or breaks a rule (version, paths, roles, blocks, hash).
    #[error("package {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("package file {path}: {bytes} bytes expected, found {actual}")]
    SizeMismatch {
        path: PathBuf,
        bytes: u64,
        actual: u64,
    },
    #[error("package file {path}: sha256 expected {expected}, found {actual}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// Lower-case hex of bytes (digests).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// sha256 (hex) and length of everything `r` yields, read in 1 MiB pieces.
pub fn sha256_stream(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((hex(&h.finalize()), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), PackageError> {
    let io = |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    };
    sha256_stream(std::fs::File::open(path).map_err(io)?).map_err(io)
}

/// The package identity: sha256 over the sorted `path sha256` lines of its files.
pub fn package_hash<'a>(files: impl Iterator<Item = &'a FileEntry>) -> String {
    let mut lines: Vec<String> = files
        .map(|f| format!("{} {}\n", f.path, f.sha256))
        .collect();
    lines.sort();
    let mut h = Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
    }
    hex(&h.finalize())
}

/// The I/O arity and dtypes each role must have (names come from the manifest).
fn contract(role: Role) -> (&'static [TensorDtype], &'static [TensorDtype]) {
    use TensorDtype::{F32, I64};
    match role {
        Role::TextEncoder => (&[I64], &[F32]),
        Role::ContextEmbedder
        | Role::TimestepEmbed
        | Role::PatchEmbed
        | Role::NullImage
        | Role::TextHead => (&[F32], &[F32]),
        Role::JointBlocks => (&[F32, F32, F32], &[F32, F32]),
        Role::ImageTail | Role::TextTail => (&[F32, F32, F32], &[F32]),
        Role::ImageHead => (&[F32, F32, F32], &[F32]),
        Role::VaeEncoder => (&[F32], &[F32, F32]),
        Role::VaeDecoder => (&[F32], &[F32]),
    }
}

fn check_contract((i, seg): (usize, &SegmentSpec)) -> Result<(), String> {
    let (ins, outs) = match (seg.role, i) {
        // T5 split by layers: the pieces after the first read the previous one's hidden states.
        (Role::TextEncoder, 1..) => (&[TensorDtype::F32][..], &[TensorDtype::F32][..]),
        (role, _) => contract(role),
    };
    // The contract's floats are of the segment's precision (f32 for fp32 segments).
    let float = seg.precision.dtype();
    let of_precision = |d: &[TensorDtype]| -> Vec<TensorDtype> {
        d.iter()
            .map(|&t| if t.is_float() { float } else { t })
            .collect()
    };
    let (ins, outs) = (of_precision(ins), of_precision(outs));
    let got_in: Vec<TensorDtype> = seg.inputs.iter().map(|t| t.dtype).collect();
    let got_out: Vec<TensorDtype> = seg.outputs.iter().map(|t| t.dtype).collect();
    if got_in != ins || got_out != outs {
        return Err(format!(
            "segment {} (role {}, precision {}): inputs {got_in:?} / outputs {got_out:?}, \
             expected {ins:?} / {outs:?}",
            seg.name, seg.role, seg.precision
        ));
    }
    Ok(())
}

impl Manifest {
    /// Parses `manifest.json` text, refusing any other format version before reading the rest.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let version = raw.get("format_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(MANIFEST_FORMAT_VERSION)) {
            return Err(format!(
                "format_version: expected {MANIFEST_FORMAT_VERSION}, found {version:?}"
            ));
        }
        serde_json::from_value(raw).map_err(|e| format!("invalid manifest: {e}"))
    }

    /// The checks that need no file: paths stay inside the package, one segment per role (one or
    /// more joint-block files covering every layer in order; one or more T5 pieces, covering
    /// consecutive layers when more than one), each role's I/O contract, and the
    /// package hash over the listed file hashes.
    pub fn validate(&self) -> Result<(), String> {
        for f in self.files() {
            let p = &f.path;
            if p.is_empty() || p.contains(['/', '\\']) || p.contains("..") {
                return Err(format!("file path `{p}` leaves the package"));
            }
        }
        for role in Role::ALL {
            let n = self.by_role(role).count();
            let (ok, want) = match role {
                Role::JointBlocks => (true, "any number of"),
                Role::TextEncoder => (n >= 1, "one or more"),
                _ => (n == 1, "one"),
            };
            if !ok {
                return Err(format!(
                    "expected {want} segment(s) of role {role}, found {n}"
                ));
            }
        }
        for role in Role::ALL {
            self.by_role(role)
                .enumerate()
                .try_for_each(check_contract)?;
        }
        if self.by_role(Role::TextEncoder).count() > 1 {
            let mut next = 0;
            for seg in self.by_role(Role::TextEncoder) {
                match seg.blocks {
                    Some([s, e]) if s == next && e > s => next = e,
                    b => {
                        return Err(format!(
                            "text encoder piece {} covers layers {b:?} but layer {next} is next",
                            seg.name
                        ))
                    }
                }
            }
        }
        let mut next = 0;
        for seg in self.by_role(Role::JointBlocks) {
            let [s, e] = seg
                .blocks
                .ok_or_else(|| format!("segment {} has no block range", seg.name))?;
            if s != next || e <= s {
                return Err(format!(
                    "segment {} covers blocks [{s}, {e}) but block {next} is next",
                    seg.name
                ));
            }
            next = e;
        }
        let layers = self.values.num_layers;
        if layers == 0 || next + 1 != layers {
            return Err(format!(
                "joint blocks cover {next} of {layers} layers; the last belongs to the tails"
            ));
        }
        for role in [Role::ImageTail, Role::TextTail] {
            let seg = self.by_role(role).next().map(|s| (&s.name, s.blocks));
            if let Some((name, blocks)) = seg.filter(|(_, b)| *b != Some([next, layers])) {
                return Err(format!(
                    "segment {name} covers blocks {blocks:?}; the tails are block [{next}, {layers})"
                ));
            }
        }
        let h = package_hash(self.files());
        if h != self.model.hash {
            return Err(format!(
                "model.hash expected {h} (from the file hashes), found {}",
                self.model.hash
            ));
        }
        Ok(())
    }
}

/// Reads `dir/manifest.json`, validates it, and checks every file's size and sha256.
pub fn verify_package(dir: &Path) -> Result<Manifest, PackageError> {
    let mpath = dir.join(MANIFEST_FILE);
    let invalid = |message: String| PackageError::Invalid {
        path: mpath.clone(),
        message,
    };
    let text = std::fs::read_to_string(&mpath).map_err(|source| PackageError::Io {
        path: mpath.clone(),
        source,
    })?;
    let m = Manifest::parse(&text).map_err(invalid)?;
    m.validate().map_err(invalid)?;
    for f in m.files() {
        verify_file(dir, f)?;
    }
    Ok(m)
}

/// Checks one listed file's size and sha256.
pub fn verify_file(dir: &Path, f: &FileEntry) -> Result<(), PackageError> {
    let path = dir.join(&f.path);
    let (sha, bytes) = sha256_file(&path)?;
    if bytes != f.bytes {
        return Err(PackageError::SizeMismatch {
            path,
            bytes: f.bytes,
            actual: bytes,
        });
    }
    if sha != f.sha256 {
        return Err(PackageError::HashMismatch {
            path,
            expected: f.sha256.clone(),
            actual: sha,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_stream() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        let (h, n) = sha256_stream(&b"abc"[..]).unwrap_or_default();
        assert_eq!(n, 3);
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn package_hash_ignores_order() {
        let f = |p: &str, s: &str| FileEntry {
            path: p.into(),
            sha256: s.into(),
            bytes: 1,
        };
        let (a, b) = (f("a.onnx", "01"), f("b.onnx", "02"));
        assert_eq!(
            package_hash([&a, &b].into_iter()),
            package_hash([&b, &a].into_iter())
        );
    }
}
