//! Safetensors weights of one checkpoint component: a single file or shards with an index.
//!
//! Files are memory-mapped, so a 2-billion-parameter transformer or a T5-XXL encoder is never
//! held in memory as a whole: each tensor is converted when its segment is written.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{ExportError, Result};

/// One mapped safetensors file, validated at open.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    /// Tensor name -> (dtype, shape, absolute byte range).
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ExportError::io(path, e))?;
        // SAFETY: the checkpoint files are opened read-only and must not be modified while an
        // export runs (documented in the README); the map is only ever read through slices
        // bounds-checked against the header validated below.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ExportError::io(path, e))?;
        let bad = |message: String| ExportError::BadSafetensors {
            path: path.to_path_buf(),
            message,
        };
        // Full validation: header, dtypes, offsets against the file length (catches truncation).
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            tensors.insert(
                name,
                (
                    view.dtype(),
                    view.shape().to_vec(),
                    start..start + data.len(),
                ),
            );
        }
        drop(st);
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }
}

/// A reference to one tensor in a mapped file.
#[derive(Clone)]
pub struct TensorRef {
    file: Arc<MappedFile>,
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

impl TensorRef {
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor as f32 values, converted from F32, F16 or BF16.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let bytes = &self.file.map[self.range.clone()];
        let out = match self.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ExportError::UnsupportedDtype {
                    key: self.key.clone(),
                    path: self.path().to_path_buf(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(out)
    }
}

/// The weights of one component (`transformer/`, `text_encoder/`, `vae/`).
pub struct WeightStore {
    component: String,
    files: Vec<Arc<MappedFile>>,
    index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightStore {
    /// Opens `dir/{stem}.safetensors`, or the shards listed in `dir/{stem}.safetensors.index.json`.
    pub fn open(dir: &Path, stem: &str) -> Result<Self> {
        let component = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let single = dir.join(format!("{stem}.safetensors"));
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if single.exists() {
            let f = Arc::new(MappedFile::open(&single)?);
            for k in f.tensors.keys() {
                index.insert(k.clone(), 0);
            }
            files.push(f);
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| ExportError::io(&index_path, e))?;
            let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| ExportError::Json {
                path: index_path.clone(),
                source: e,
            })?;
            let mut shard_pos: HashMap<String, usize> = HashMap::new();
            for (key, shard) in &idx.weight_map {
                if shard.contains('/') || shard.contains("..") {
                    return Err(ExportError::BadShardIndex {
                        path: index_path.clone(),
                        key: key.clone(),
                        shard: shard.clone(),
                    });
                }
                let pos = match shard_pos.get(shard) {
                    Some(&p) => p,
                    None => {
                        let f = MappedFile::open(&dir.join(shard))?;
                        files.push(Arc::new(f));
                        shard_pos.insert(shard.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[pos].tensors.contains_key(key) {
                    return Err(ExportError::BadShardIndex {
                        path: index_path.clone(),
                        key: key.clone(),
                        shard: shard.clone(),
                    });
                }
                index.insert(key.clone(), pos);
            }
        } else {
            return Err(ExportError::MissingFile {
                path: single,
                what: format!(
                    "no weights for `{component}` (nor a shard index {})",
                    index_path.display()
                ),
            });
        }
        Ok(Self {
            component,
            files,
            index,
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    fn files_desc(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The tensor `key`, checked against `expected` shape and for a supported dtype.
    pub fn get(&self, key: &str, expected: &[usize]) -> Result<TensorRef> {
        let Some(&pos) = self.index.get(key) else {
            return Err(ExportError::MissingTensor {
                component: self.component.clone(),
                key: key.to_string(),
                files: self.files_desc(),
            });
        };
        let file = &self.files[pos];
        let Some((dtype, shape, range)) = file.tensors.get(key) else {
            return Err(ExportError::MissingTensor {
                component: self.component.clone(),
                key: key.to_string(),
                files: file.path.display().to_string(),
            });
        };
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(ExportError::UnsupportedDtype {
                key: key.to_string(),
                path: file.path.clone(),
                dtype: format!("{dtype:?}"),
            });
        }
        if shape.as_slice() != expected {
            return Err(ExportError::WrongShape {
                key: key.to_string(),
                path: file.path.clone(),
                expected: expected.to_vec(),
                actual: shape.clone(),
            });
        }
        Ok(TensorRef {
            file: file.clone(),
            key: key.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
            range: range.clone(),
        })
    }

    /// The shape of `key`, if present (for configs that leave a size implicit).
    pub fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        let pos = *self.index.get(key)?;
        self.files[pos].tensors.get(key).map(|t| t.1.clone())
    }
}
