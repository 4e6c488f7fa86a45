//! The one place the worker converts between its f32 tensors and the element type a segment
//! declares for an input or output (f32, f16 or bf16, from the manifest). Samplers, batching,
//! images and everything between segments stay f32: a half-precision segment's inputs are rounded
//! to its type (to nearest, ties to even) when they are fed, its outputs widened (exactly) when
//! they are read.

use ddit_schemas::TensorDtype;
use half::{bf16, f16};
use ort::memory::AllocationDevice;
use ort::value::{DynTensorValueType, DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use crate::error::{Result, WorkerError};
use crate::tensor::Tensor;

/// ONNX Runtime's element type for a manifest dtype.
pub fn element(d: TensorDtype) -> TensorElementType {
    match d {
        TensorDtype::F32 => TensorElementType::Float32,
        TensorDtype::F16 => TensorElementType::Float16,
        TensorDtype::Bf16 => TensorElementType::Bfloat16,
        TensorDtype::I64 => TensorElementType::Int64,
    }
}

/// An owned ONNX Runtime tensor holding `t` in `dtype` (a float type).
pub fn host_value(t: &Tensor, dtype: TensorDtype, what: &str) -> Result<DynValue> {
    let shape = t.shape.clone();
    let value = match dtype {
        TensorDtype::F32 => OrtTensor::from_array((shape, t.data.clone())).map(|v| v.into_dyn()),
        TensorDtype::F16 => {
            let data: Vec<f16> = t.data.iter().map(|&v| f16::from_f32(v)).collect();
            OrtTensor::from_array((shape, data)).map(|v| v.into_dyn())
        }
        TensorDtype::Bf16 => {
            let data: Vec<bf16> = t.data.iter().map(|&v| bf16::from_f32(v)).collect();
            OrtTensor::from_array((shape, data)).map(|v| v.into_dyn())
        }
        TensorDtype::I64 => {
            return Err(WorkerError::Internal(format!(
                "{what}: an f32 tensor fed to an i64 input"
            )))
        }
    };
    value.map_err(|e| WorkerError::runtime(what.to_string(), e))
}

/// The element type of a tensor value (None for anything else).
pub fn element_of(v: &DynValue) -> Option<TensorElementType> {
    match v.dtype() {
        ValueType::Tensor { ty, .. } => Some(*ty),
        _ => None,
    }
}

/// A float output in host memory, read as f32 whatever its type (f32, f16, bf16).
pub fn read_f32(v: &DynValue, what: &str) -> Result<Tensor> {
    let err = |e| WorkerError::runtime(what.to_string(), e);
    let (shape, data) = match element_of(v) {
        Some(TensorElementType::Float16) => {
            let (s, d) = v.try_extract_tensor::<f16>().map_err(err)?;
            (s.to_vec(), d.iter().map(|x| x.to_f32()).collect())
        }
        Some(TensorElementType::Bfloat16) => {
            let (s, d) = v.try_extract_tensor::<bf16>().map_err(err)?;
            (s.to_vec(), d.iter().map(|x| x.to_f32()).collect())
        }
        _ => {
            let (s, d) = v.try_extract_tensor::<f32>().map_err(err)?;
            (s.to_vec(), d.to_vec())
        }
    };
    Ok(Tensor {
        shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
        data,
    })
}

/// A value another segment left in device memory, read back to the host as f32 (copied off
/// the device first when the host cannot read its memory).
pub fn to_host(v: &DynValue, what: &str) -> Result<Tensor> {
    let ctx = |e| WorkerError::runtime(what.to_string(), e);
    let t = v.view().downcast::<DynTensorValueType>().map_err(ctx)?;
    if t.memory_info().is_cpu_accessible() {
        return read_f32(v, what);
    }
    let host = t.to(AllocationDevice::CPU, 0).map_err(ctx)?;
    read_f32(&host.into_dyn(), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_inputs_round_to_nearest_and_outputs_widen_exactly() {
        let cfg = crate::engine::EngineConfig::default();
        crate::engine::session::environment(&cfg).unwrap_or_else(|e| panic!("{e}"));
        // 1 + 2^-11 is halfway between two f16 values (ties to even: 1.0); 1 + 3·2^-11 rounds
        // up; 70000 overflows f16 to infinity but not bf16.
        let t = Tensor::new(
            vec![1, 4],
            vec![
                1.0 + 2f32.powi(-11),
                1.0 + 3.0 * 2f32.powi(-11),
                -2.5,
                70000.0,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let v = host_value(&t, TensorDtype::F16, "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(element_of(&v), Some(TensorElementType::Float16));
        let back = read_f32(&v, "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.shape, vec![1, 4]);
        assert_eq!(back.data[..3], [1.0, 1.0 + 2f32.powi(-9), -2.5]);
        assert!(back.data[3].is_infinite());
        let v = host_value(&t, TensorDtype::Bf16, "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(element_of(&v), Some(TensorElementType::Bfloat16));
        let back = read_f32(&v, "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.data, vec![1.0, 1.0, -2.5, 70144.0]);
        let v = host_value(&t, TensorDtype::F32, "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_f32(&v, "x").unwrap_or_else(|e| panic!("{e}")), t);
        assert!(host_value(&t, TensorDtype::I64, "x").is_err());
    }
}
