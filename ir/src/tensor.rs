//! Host tensors: what the interpreter computes with and what checkpoints load into.
//!
//! Floats of every width are held as f32 (values already rounded to the tensor's dtype), ints
//! (i32 and i64) as i64, bools as bool. Row-major, contiguous.

use crate::dtype::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A float tensor of `dtype`; values are rounded to it.
    pub fn from_f32(dtype: DType, shape: Vec<usize>, mut data: Vec<f32>) -> Tensor {
        assert!(dtype.is_float(), "from_f32 with {dtype}");
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        if dtype != DType::F32 {
            for x in &mut data {
                *x = dtype.round(*x);
            }
        }
        Tensor { dtype, shape, data: Data::F32(data) }
    }

    pub fn from_i64(dtype: DType, shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        assert!(dtype.is_int(), "from_i64 with {dtype}");
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        Tensor { dtype, shape, data: Data::I64(data) }
    }

    pub fn from_bool(shape: Vec<usize>, data: Vec<bool>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        Tensor { dtype: DType::Bool, shape, data: Data::Bool(data) }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        match dtype {
            d if d.is_float() => Tensor { dtype, shape, data: Data::F32(vec![0.0; n]) },
            d if d.is_int() => Tensor { dtype, shape, data: Data::I64(vec![0; n]) },
            _ => Tensor { dtype, shape, data: Data::Bool(vec![false; n]) },
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
}
