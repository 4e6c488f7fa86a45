//! A model package on disk, verified once per process by [`ddit_schemas::verify_package`]
//! (manifest version and rules, every file's size and sha256).

use std::path::{Path, PathBuf};

use ddit_schemas::{Manifest, Precision, SegmentSpec};

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
    /// where those nodes would silently run on the CPU (CUDA) or split the graph (TensorRT); bf16
    /// segments on the CPU provider, which has no bf16 kernels.
    pub fn check_providers(&self, providers: &[Provider]) -> Result<()> {
        let first = providers.first().unwrap_or(&Provider::Cpu);
        let m = &self.manifest.model;
        if *first == Provider::Cpu {
            return self.check_cpu_precision();
        }
        if m.weights_dtype != "int8" {
            return Ok(());
        }
        Err(WorkerError::Provider {
            provider: first.name().into(),
            message: format!(
                "model package {} ({}) stores int8 weights: its integer matrix products \
                 (MatMulIntegerToFloat, DynamicQuantizeMatMul) have kernels only on the CPU \
                 provider, so under {} they would fall back to the CPU or split the graph; export the package with `--weights f32` or `f16` for a \
                 GPU, or serve this one with `--providers cpu`",
                self.dir.display(),
                m.name,
                first.name()
            ),
        })
    }

    /// ONNX Runtime 1.31's CPU provider has bf16 kernels for `Cast` and little else (`Add`,
    /// `Mul`, `Sigmoid`, `ReduceMax`, ... are not implemented): a bf16 segment would fail to
    /// load with a missing-kernel error, so it is refused up front, naming the segment.
    fn check_cpu_precision(&self) -> Result<()> {
        let bf16 = self
            .manifest
            .segments
            .iter()
            .find(|s| s.precision == Precision::Bf16);
        let Some(seg) = bf16 else {
            return Ok(());
        };
        Err(WorkerError::Provider {
            provider: Provider::Cpu.name().into(),
            message: format!(
                "model package {} ({}): segment {} computes in bf16, and ONNX Runtime's CPU \
                 provider has no bf16 kernels (Add, Mul, MatMul, ...); serve it with \
                 `--providers cuda` or `tensorrt`, or export it with `--precision fp16` or \
                 `fp32` for the CPU",
                self.dir.display(),
                self.manifest.model.name,
                seg.name
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
