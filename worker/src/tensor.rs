//! A plain row-major f32 tensor: what flows between segments and samplers.

use crate::error::{Result, WorkerError};

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(WorkerError::Internal(format!(
                "tensor shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Size of one item along the first (batch) axis.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Item `i` along the batch axis, keeping a batch axis of 1.
    pub fn row(&self, i: usize) -> Tensor {
        let n = self.row_len();
        let mut shape = self.shape.clone();
        shape[0] = 1;
        Tensor {
            shape,
            data: self.data[i * n..(i + 1) * n].to_vec(),
        }
    }

    /// Concatenates tensors along the batch axis; all must share the other dims.
    pub fn cat(parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts
            .first()
            .ok_or_else(|| WorkerError::Internal("concatenating no tensors".into()))?;
        let mut shape = first.shape.clone();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        let mut b = 0;
        for p in parts {
            if p.shape[1..] != first.shape[1..] {
                return Err(WorkerError::Internal(format!(
                    "cannot batch shapes {:?} and {:?}",
                    first.shape, p.shape
                )));
            }
            b += p.shape[0];
            data.extend_from_slice(&p.data);
        }
        shape[0] = b;
        Ok(Tensor { shape, data })
    }

    /// Repeats a batch-1 tensor `n` times.
    pub fn repeat(&self, n: usize) -> Tensor {
        let mut shape = self.shape.clone();
        shape[0] *= n;
        let mut data = Vec::with_capacity(self.data.len() * n);
        for _ in 0..n {
            data.extend_from_slice(&self.data);
        }
        Tensor { shape, data }
    }
}
