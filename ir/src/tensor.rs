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
        Tensor {
            dtype,
            shape,
            data: Data::F32(data),
        }
    }

    /// [`Tensor::from_f32`] for values already representable in `dtype` (decoded from its
    /// storage), without rounding them again (checked in debug builds).
    pub fn from_f32_exact(dtype: DType, shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert!(dtype.is_float(), "from_f32_exact with {dtype}");
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        debug_assert!(
            data.iter().all(|&x| x.is_nan() || dtype.round(x) == x),
            "from_f32_exact: a value not representable in {dtype}"
        );
        Tensor {
            dtype,
            shape,
            data: Data::F32(data),
        }
    }

    pub fn from_i64(dtype: DType, shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        assert!(dtype.is_int(), "from_i64 with {dtype}");
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        Tensor {
            dtype,
            shape,
            data: Data::I64(data),
        }
    }

    pub fn from_bool(shape: Vec<usize>, data: Vec<bool>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape/data mismatch");
        Tensor {
            dtype: DType::Bool,
            shape,
            data: Data::Bool(data),
        }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        match dtype {
            d if d.is_float() => Tensor {
                dtype,
                shape,
                data: Data::F32(vec![0.0; n]),
            },
            d if d.is_int() => Tensor {
                dtype,
                shape,
                data: Data::I64(vec![0; n]),
            },
            _ => Tensor {
                dtype,
                shape,
                data: Data::Bool(vec![false; n]),
            },
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

/// Row-major strides (in elements) of a contiguous tensor of `shape`.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl Tensor {
    /// A scalar (shape `[]`) of `dtype` holding `value`: floats rounded to the dtype, ints
    /// truncated toward zero (saturating, like `as`; i32 to its range), bools `value != 0`.
    pub fn scalar(dtype: DType, value: f64) -> Tensor {
        let data = match dtype {
            d if d.is_float() => Data::F32(vec![d.round(value as f32)]),
            DType::I32 => Data::I64(vec![value as i32 as i64]),
            DType::I64 => Data::I64(vec![value as i64]),
            _ => Data::Bool(vec![value != 0.0]),
        };
        Tensor {
            dtype,
            shape: Vec::new(),
            data,
        }
    }

    /// Row-major strides of this tensor's shape.
    pub fn strides(&self) -> Vec<usize> {
        row_major_strides(&self.shape)
    }

    /// The type as the IR prints it, e.g. `bf16[2, 3]`.
    pub fn type_str(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype, dims.join(", "))
    }

    /// Checks the invariants the constructors establish (the fields are public, so a tensor
    /// built by hand may break them): the data variant matches the dtype and holds exactly
    /// `numel` elements. Does not check that floats are rounded to a narrow dtype.
    pub fn check(&self) -> Result<(), String> {
        let (kind_ok, len) = match &self.data {
            Data::F32(v) => (self.dtype.is_float(), v.len()),
            Data::I64(v) => (self.dtype.is_int(), v.len()),
            Data::Bool(v) => (self.dtype == DType::Bool, v.len()),
        };
        if !kind_ok {
            return Err(format!("{} tensor holds the wrong kind of data", self.dtype));
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("shape {:?} overflows", self.shape))?;
        if len != numel {
            return Err(format!("{} holds {len} elements, expected {numel}", self.type_str()));
        }
        Ok(())
    }

    /// The elements in their storage layout (docs/kernel-abi.md): little-endian, `size_bytes`
    /// per element; bools as 0/1 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let w = self.dtype.size_bytes();
        let mut out = Vec::with_capacity(self.numel() * w);
        match &self.data {
            Data::F32(v) => {
                for &x in v {
                    out.extend_from_slice(&self.dtype.encode_float(x).to_le_bytes()[..w]);
                }
            }
            Data::I64(v) => {
                for &x in v {
                    out.extend_from_slice(&x.to_le_bytes()[..w]);
                }
            }
            Data::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        }
        out
    }

    /// A tensor from its storage layout ([`Tensor::to_bytes`]); None when `bytes` does not
    /// hold exactly the elements of `shape`.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Option<Tensor> {
        let w = dtype.size_bytes();
        let n: usize = shape.iter().product();
        if bytes.len() != n * w {
            return None;
        }
        let data = if dtype.is_float() {
            Data::F32(
                bytes
                    .chunks_exact(w)
                    .map(|c| {
                        let mut b = [0u8; 4];
                        b[..w].copy_from_slice(c);
                        dtype.decode_float(u32::from_le_bytes(b))
                    })
                    .collect(),
            )
        } else if dtype.is_int() {
            Data::I64(
                bytes
                    .chunks_exact(w)
                    .map(|c| match w {
                        4 => i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                        _ => i64::from_le_bytes(c.try_into().expect("8 bytes")),
                    })
                    .collect(),
            )
        } else {
            Data::Bool(bytes.iter().map(|&b| b != 0).collect())
        };
        Some(Tensor { dtype, shape, data })
    }

    /// Every element as f64 (bools as 0/1), row-major: for comparisons in tests and tools.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }
}
