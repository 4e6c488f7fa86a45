//! A model package on disk, verified once per process by [`ddit_schemas::verify_package`]
//! (manifest version and rules, every file's size and sha256).

use std::path::{Path, PathBuf};

use ddit_schemas::{Manifest, SegmentSpec};

use crate::error::{Result, WorkerError};

/// A verified package: hand it to every engine of the process instead of re-hashing.
#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Package {
    /// Reads and verifies `dir/manifest.json` and every file it lists.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = ddit_schemas::verify_package(dir).map_err(|e| WorkerError::Package {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
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
