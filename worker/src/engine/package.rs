//! A model package on disk, verified once per process by [`ddit_schemas::verify_package`]
//! (manifest version and rules, every file's size and sha256).

use std::path::{Path, PathBuf};

use ddit_schemas::{Manifest, SegmentSpec};

use super::providers::Provider;
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

    /// Refuses, from the manifest alone (before any provider library loads), a package that
    /// cannot run on the first of `providers`: int8 weights (`MatMulIntegerToFloat` or
    /// `DynamicQuantizeMatMul`, whose kernels only the CPU provider has) under a GPU provider,
    /// where those nodes would silently run on the CPU (CUDA) or split the graph (TensorRT).
    pub fn check_providers(&self, providers: &[Provider]) -> Result<()> {
        let Some(gpu) = providers.first().filter(|p| **p != Provider::Cpu) else {
            return Ok(());
        };
        let m = &self.manifest.model;
        if m.weights_dtype != "int8" {
            return Ok(());
        }
        Err(WorkerError::Provider {
            provider: gpu.name().into(),
            message: format!(
                "model package {} ({}) stores int8 weights: its integer matrix products \
                 (MatMulIntegerToFloat, DynamicQuantizeMatMul) have kernels only on the CPU \
                 provider, so under {} they would fall back to the CPU or split the graph; export the package with `--weights f32` or `f16` for a \
                 GPU, or serve this one with `--providers cpu`",
                self.dir.display(),
                m.name,
                gpu.name()
            ),
        })
    }

    pub fn path_of(&self, seg: &SegmentSpec) -> PathBuf {
        self.dir.join(&seg.files[0].path)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.path)
    }
}
