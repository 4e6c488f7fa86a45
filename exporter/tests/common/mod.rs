//! Shared helpers for the exporter's tests: fixtures, ONNX Runtime, comparisons.
#![allow(dead_code, clippy::unwrap_used)]

pub mod parity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ddit_export::{convert, ExportOptions};
use ddit_schemas::{Manifest, SegmentSpec, TensorDtype};
use half::{bf16, f16};
use ort::session::Session;
use ort::value::Tensor;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures")
}

/// A writable copy of a fixture checkpoint.
pub fn copy_checkpoint(variant: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("ckpt");
    copy_dir(&checkpoint(variant), &dst);
    (dir, dst)
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

pub fn edit_config(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

pub fn checkpoint(variant: &str) -> PathBuf {
    fixtures().join(variant).join("checkpoint")
}

/// The ONNX Runtime environment, loaded from `ORT_DYLIB_PATH` or `.ddit/ort` (`scripts/ort.sh`).
pub fn env() -> &'static ort::environment::Environment {
    static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join(".ddit/ort/libonnxruntime.so.1.31.1"));
        assert!(
            path.exists(),
            "ONNX Runtime not found at {}: run scripts/ort.sh",
            path.display()
        );
        ort::init_from(&path)
            .expect("load onnxruntime")
            .build()
            .expect("ort environment")
    })
}

/// A golden tensor, as f32 (floats) or i64 (ids).
#[derive(Clone)]
pub enum Gold {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

impl Gold {
    pub fn f32(&self) -> (&[usize], &[f32]) {
        match self {
            Gold::F32(s, v) => (s, v),
            Gold::I64(..) => panic!("expected f32"),
        }
    }
}

pub fn load_golden(path: &Path) -> HashMap<String, Gold> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let shape = v.shape().to_vec();
            let g = match v.dtype() {
                safetensors::Dtype::F32 => Gold::F32(
                    shape,
                    v.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                safetensors::Dtype::I64 => Gold::I64(
                    shape,
                    v.data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                d => panic!("unexpected golden dtype {d:?}"),
            };
            (k, g)
        })
        .collect()
}

pub fn golden(variant: &str) -> HashMap<String, Gold> {
    load_golden(&fixtures().join(variant).join("golden.safetensors"))
}

pub fn export(
    variant: &str,
    tweak: impl FnOnce(&mut ExportOptions),
) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = ExportOptions::new(checkpoint(variant), dir.path().join("pkg"));
    o.name = Some(variant.into());
    tweak(&mut o);
    let m = convert(&o).unwrap_or_else(|e| panic!("export {variant}: {e}"));
    (dir, m)
}

/// Runs one segment on named inputs; returns its outputs in manifest order as (shape, data).
/// f32 inputs are rounded to the element type the manifest declares (f16, bf16: to nearest,
/// ties to even, as PyTorch's `.to()`), and half-precision outputs widened to f32.
pub fn run(
    pkg: &Path,
    seg: &SegmentSpec,
    inputs: Vec<(&str, Gold)>,
) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut session: Session = Session::builder(env())
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(pkg.join(&seg.files[0].path))
        .unwrap_or_else(|e| panic!("load {}: {e}", seg.name));
    let feeds: Vec<(
        std::borrow::Cow<'_, str>,
        ort::session::SessionInputValue<'_>,
    )> = inputs
        .into_iter()
        .map(|(name, g)| {
            let spec = seg.inputs.iter().find(|s| s.name == name).unwrap();
            (
                std::borrow::Cow::Owned(name.to_string()),
                feed(g, spec.dtype),
            )
        })
        .collect();
    let out = session
        .run(feeds)
        .unwrap_or_else(|e| panic!("run {}: {e}", seg.name));
    seg.outputs
        .iter()
        .map(|o| read(&out[o.name.as_str()], o.dtype))
        .collect()
}

/// A golden input as a tensor of `dtype`.
fn feed(g: Gold, dtype: TensorDtype) -> ort::session::SessionInputValue<'static> {
    match (g, dtype) {
        (Gold::F32(s, d), TensorDtype::F16) => {
            let d: Vec<f16> = d.iter().map(|&v| f16::from_f32(v)).collect();
            Tensor::from_array((s, d)).unwrap().into()
        }
        (Gold::F32(s, d), TensorDtype::Bf16) => {
            let d: Vec<bf16> = d.iter().map(|&v| bf16::from_f32(v)).collect();
            Tensor::from_array((s, d)).unwrap().into()
        }
        (Gold::F32(s, d), _) => Tensor::from_array((s, d)).unwrap().into(),
        (Gold::I64(s, d), _) => Tensor::from_array((s, d)).unwrap().into(),
    }
}

/// An output of `dtype` as f32.
fn read(v: &ort::value::DynValue, dtype: TensorDtype) -> (Vec<usize>, Vec<f32>) {
    let (shape, data): (&[i64], Vec<f32>) = match dtype {
        TensorDtype::F16 => {
            let (s, d) = v.try_extract_tensor::<f16>().unwrap();
            (&s[..], d.iter().map(|x| x.to_f32()).collect())
        }
        TensorDtype::Bf16 => {
            let (s, d) = v.try_extract_tensor::<bf16>().unwrap();
            (&s[..], d.iter().map(|x| x.to_f32()).collect())
        }
        _ => {
            let (s, d) = v.try_extract_tensor::<f32>().unwrap();
            (&s[..], d.to_vec())
        }
    };
    (shape.iter().map(|&d| d as usize).collect(), data)
}

/// Max absolute error, after checking shapes agree. NaN when any element of either side is NaN
/// (or when an infinity meets anything other than the same infinity): `f32::max` drops NaN, so
/// a plain fold would score an all-NaN output 0.
pub fn max_err(tag: &str, got: &(Vec<usize>, Vec<f32>), want: &Gold) -> f32 {
    let (ws, wv) = want.f32();
    assert_eq!(got.0.as_slice(), ws, "{tag}: shape");
    nan_max(got.1.iter().zip(wv).map(|(a, b)| {
        if a == b {
            0.0 // equal infinities
        } else {
            (a - b).abs()
        }
    }))
}

/// The largest value, NaN if any is NaN (0 for none).
pub fn nan_max(values: impl IntoIterator<Item = f32>) -> f32 {
    values.into_iter().fold(0.0, |m, e| {
        if m.is_nan() || e.is_nan() {
            f32::NAN
        } else {
            m.max(e)
        }
    })
}

pub fn f32s(s: &[usize], v: Vec<f32>) -> Gold {
    Gold::F32(s.to_vec(), v)
}

/// One protobuf field: (number, varint value or length-delimited bytes).
pub fn fields(mut b: &[u8]) -> Vec<(u64, Option<&[u8]>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = b.split_first().unwrap();
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        match key & 7 {
            0 => {
                varint(&mut b);
                out.push((key >> 3, None));
            }
            2 => {
                let n = varint(&mut b) as usize;
                out.push((key >> 3, Some(&b[..n])));
                b = &b[n..];
            }
            5 => b = &b[4..],
            1 => b = &b[8..],
            w => panic!("wire type {w}"),
        }
    }
    out
}
