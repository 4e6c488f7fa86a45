//! Loading a model package: manifest version, every file hash, and each role's I/O contract.

use std::io::Read;
use std::path::{Path, PathBuf};

use ddit_schemas::{Manifest, Role, SegmentSpec, TensorDtype, MANIFEST_FORMAT_VERSION};
use sha2::{Digest, Sha256};

use crate::error::{Result, WorkerError};

fn err(path: &Path, message: impl Into<String>) -> WorkerError {
    WorkerError::Package {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| err(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        Role::ImageHead => (&[F32, F32, I64], &[F32]),
        Role::VaeEncoder => (&[F32], &[F32, F32]),
        Role::VaeDecoder => (&[F32], &[F32]),
    }
}

/// A verified package on disk.
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Package {
    /// Reads and verifies `dir/manifest.json`: version, hashes, role contracts, block coverage.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath)
            .map_err(|e| err(&mpath, format!("cannot read: {e}")))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(&mpath, format!("invalid JSON: {e}")))?;
        let version = raw.get("format_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(MANIFEST_FORMAT_VERSION)) {
            return Err(err(
                &mpath,
                format!("format_version: expected {MANIFEST_FORMAT_VERSION}, found {version:?}"),
            ));
        }
        let manifest: Manifest = serde_json::from_value(raw)
            .map_err(|e| err(&mpath, format!("invalid manifest: {e}")))?;
        for f in manifest.files() {
            if f.path.contains('/') || f.path.contains('\\') || f.path.contains("..") {
                return Err(err(&mpath, format!("file `{}` leaves the package", f.path)));
            }
            let p = dir.join(&f.path);
            let actual = sha256_file(&p)?;
            if actual != f.sha256 {
                return Err(err(
                    &p,
                    format!("sha256 expected {}, found {actual}", f.sha256),
                ));
            }
        }
        for role in ddit_schemas::Role::ALL {
            let n = manifest.by_role(role).count();
            let ok = if role == Role::JointBlocks {
                n >= 1
            } else {
                n == 1
            };
            if !ok {
                return Err(err(
                    &mpath,
                    format!(
                        "expected {} segment(s) of role {role}, found {n}",
                        if role == Role::JointBlocks {
                            "one or more"
                        } else {
                            "one"
                        }
                    ),
                ));
            }
        }
        for seg in &manifest.segments {
            check_contract(&mpath, seg)?;
        }
        let mut next = 0;
        for seg in manifest.by_role(Role::JointBlocks) {
            let [s, e] = seg
                .blocks
                .ok_or_else(|| err(&mpath, format!("segment {} has no block range", seg.name)))?;
            if s != next || e <= s {
                return Err(err(
                    &mpath,
                    format!(
                        "segment {} covers blocks [{s}, {e}) but block {next} is next",
                        seg.name
                    ),
                ));
            }
            next = e;
        }
        if next != manifest.values.num_layers {
            return Err(err(
                &mpath,
                format!(
                    "joint blocks cover {next} of {} layers",
                    manifest.values.num_layers
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn path_of(&self, seg: &SegmentSpec) -> PathBuf {
        self.dir.join(&seg.files[0].path)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.path)
    }
}

fn check_contract(mpath: &Path, seg: &SegmentSpec) -> Result<()> {
    let (ins, outs) = contract(seg.role);
    let got_in: Vec<TensorDtype> = seg.inputs.iter().map(|t| t.dtype).collect();
    let got_out: Vec<TensorDtype> = seg.outputs.iter().map(|t| t.dtype).collect();
    if got_in != ins || got_out != outs {
        return Err(err(
            mpath,
            format!(
                "segment {} (role {}): inputs {got_in:?} / outputs {got_out:?}, expected {ins:?} / {outs:?}",
                seg.name, seg.role
            ),
        ));
    }
    Ok(())
}
