//! Element types and constant tensors.
//!
//! Tensor payloads are kept in one canonical form, little-endian packed bytes (strings apart),
//! whatever typed field the ONNX file used. Passes and runtimes then read one representation,
//! and export always writes `raw_data`, which every runtime accepts.

use bytes::Bytes;

/// ONNX element types; discriminants are `TensorProto.DataType` values (onnx.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Uint16 = 4,
    Int16 = 5,
    Int32 = 6,
    Int64 = 7,
    String = 8,
    Bool = 9,
    Float16 = 10,
    Double = 11,
    Uint32 = 12,
    Uint64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    Bfloat16 = 16,
    Float8e4m3fn = 17,
    Float8e4m3fnuz = 18,
    Float8e5m2 = 19,
    Float8e5m2fnuz = 20,
    Uint4 = 21,
    Int4 = 22,
    Float4e2m1 = 23,
    Float8e8m0 = 24,
    Uint2 = 25,
    Int2 = 26,
}

impl DataType {
    pub fn from_i32(v: i32) -> Option<DataType> {
        use DataType::*;
        Some(match v {
            1 => Float,
            2 => Uint8,
            3 => Int8,
            4 => Uint16,
            5 => Int16,
            6 => Int32,
            7 => Int64,
            8 => String,
            9 => Bool,
            10 => Float16,
            11 => Double,
            12 => Uint32,
            13 => Uint64,
            14 => Complex64,
            15 => Complex128,
            16 => Bfloat16,
            17 => Float8e4m3fn,
            18 => Float8e4m3fnuz,
            19 => Float8e5m2,
            20 => Float8e5m2fnuz,
            21 => Uint4,
            22 => Int4,
            23 => Float4e2m1,
            24 => Float8e8m0,
            25 => Uint2,
            26 => Int2,
            _ => return None,
        })
    }

    /// Storage size in bits of one element in `raw_data` (sub-byte types are packed).
    pub fn bits(self) -> usize {
        use DataType::*;
        match self {
            Bool | Uint8 | Int8 | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
            | Float8e8m0 => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Float | Int32 | Uint32 => 32,
            Double | Int64 | Uint64 | Complex64 => 64,
            Complex128 => 128,
            Uint4 | Int4 | Float4e2m1 => 4,
            Uint2 | Int2 => 2,
            String => 0,
        }
    }

    /// Byte size of `count` elements, `None` on overflow.
    pub fn byte_len(self, count: usize) -> Option<usize> {
        count.checked_mul(self.bits()).map(|b| b.div_ceil(8))
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16
        )
    }

    /// f16 or bf16: types the adapters never use (they stay f32, peft's mixed precision).
    pub fn is_half(self) -> bool {
        matches!(self, DataType::Float16 | DataType::Bfloat16)
    }

    pub fn is_integer(self) -> bool {
        use DataType::*;
        matches!(
            self,
            Uint8 | Int8 | Uint16 | Int16 | Int32 | Int64 | Uint32 | Uint64
        )
    }

    /// The lower-case name used in dumps and manifests (`f32`, `i64`, ...).
    pub fn short_name(self) -> &'static str {
        use DataType::*;
        match self {
            Float => "f32",
            Uint8 => "u8",
            Int8 => "i8",
            Uint16 => "u16",
            Int16 => "i16",
            Int32 => "i32",
            Int64 => "i64",
            String => "string",
            Bool => "bool",
            Float16 => "f16",
            Double => "f64",
            Uint32 => "u32",
            Uint64 => "u64",
            Complex64 => "c64",
            Complex128 => "c128",
            Bfloat16 => "bf16",
            Float8e4m3fn => "f8e4m3fn",
            Float8e4m3fnuz => "f8e4m3fnuz",
            Float8e5m2 => "f8e5m2",
            Float8e5m2fnuz => "f8e5m2fnuz",
            Uint4 => "u4",
            Int4 => "i4",
            Float4e2m1 => "f4e2m1",
            Float8e8m0 => "f8e8m0",
            Uint2 => "u2",
            Int2 => "i2",
        }
    }
}

/// Tensor payload: packed little-endian bytes, or a list of byte strings for `DataType::String`.
/// `Bytes` (reference-counted, sliceable) so that copying a graph does not copy weights and
/// import can point into the file's buffer.
#[derive(Clone, Debug)]
pub enum TensorData {
    Raw(Bytes),
    Strings(Vec<Vec<u8>>),
}

/// Two views of the same bytes are equal without reading them: a weight that several
/// programs or instances share is one slice of a (possibly memory-mapped) file, and comparing
/// it byte by byte would fault in every page of the model.
impl PartialEq for TensorData {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TensorData::Raw(a), TensorData::Raw(b)) => {
                a.len() == b.len() && (a.as_ptr() == b.as_ptr() || a == b)
            }
            (TensorData::Strings(a), TensorData::Strings(b)) => a == b,
            _ => false,
        }
    }
}

/// A constant tensor (initializer, or the value of a tensor attribute).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub data: TensorData,
    pub doc_string: String,
    pub metadata_props: Vec<(String, String)>,
}

impl Tensor {
    pub fn from_raw(
        name: impl Into<String>,
        dtype: DataType,
        dims: Vec<i64>,
        raw: Vec<u8>,
    ) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            dims,
            data: TensorData::Raw(Bytes::from(raw)),
            doc_string: String::new(),
            metadata_props: vec![],
        }
    }

    pub fn from_f32(name: impl Into<String>, dims: Vec<i64>, values: &[f32]) -> Tensor {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Float, dims, raw)
    }

    pub fn from_f64(name: impl Into<String>, dims: Vec<i64>, values: &[f64]) -> Tensor {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Double, dims, raw)
    }

    /// Values given in f64, stored as `dtype` (f64, f16, bf16, else f32; each value rounded
    /// once, to nearest even).
    pub fn from_f64_as(
        dtype: DataType,
        name: impl Into<String>,
        dims: Vec<i64>,
        values: &[f64],
    ) -> Tensor {
        match dtype {
            DataType::Double => Tensor::from_f64(name, dims, values),
            DataType::Float16 => {
                let raw = values
                    .iter()
                    .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                    .collect();
                Tensor::from_raw(name, DataType::Float16, dims, raw)
            }
            DataType::Bfloat16 => {
                let raw = values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
                    .collect();
                Tensor::from_raw(name, DataType::Bfloat16, dims, raw)
            }
            _ => {
                let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
                Tensor::from_f32(name, dims, &v)
            }
        }
    }

    pub fn from_i64(name: impl Into<String>, dims: Vec<i64>, values: &[i64]) -> Tensor {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Int64, dims, raw)
    }

    /// Number of elements; `None` if a dim is negative or the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }

    pub fn raw(&self) -> Option<&[u8]> {
        match &self.data {
            TensorData::Raw(b) => Some(b),
            TensorData::Strings(_) => None,
        }
    }

    /// Values as f32 (from f32, f64, f16 or bf16 storage), for compile-time math on weights.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        let raw = self.raw()?;
        match self.dtype {
            DataType::Float => Some(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DataType::Double => Some(
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            ),
            DataType::Float16 | DataType::Bfloat16 => {
                Some(self.to_f64_vec()?.into_iter().map(|v| v as f32).collect())
            }
            _ => None,
        }
    }

    /// Values as f64 (from any float or integer storage of up to 64 bits).
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        let mut v = Vec::with_capacity(self.numel().unwrap_or(0));
        self.for_each_f64(|x| v.push(x))?;
        Some(v)
    }

    /// Calls `f` on every value, in storage order, as f64 (exact for every float type), with
    /// no copy of the tensor: for passes that reduce a weight (norms, sums) instead of
    /// keeping it. `None` (and no call) when the tensor holds no numbers.
    pub fn for_each_f64(&self, mut f: impl FnMut(f64)) -> Option<()> {
        let raw = self.raw()?;
        match self.dtype {
            DataType::Float => raw
                .chunks_exact(4)
                .for_each(|c| f(f32::from_le_bytes(c.try_into().unwrap()) as f64)),
            DataType::Double => raw
                .chunks_exact(8)
                .for_each(|c| f(f64::from_le_bytes(c.try_into().unwrap()))),
            // Exact: every f16 and bf16 value is an f64.
            DataType::Float16 => raw
                .chunks_exact(2)
                .for_each(|c| f(half::f16::from_le_bytes([c[0], c[1]]).to_f64())),
            DataType::Bfloat16 => raw
                .chunks_exact(2)
                .for_each(|c| f(half::bf16::from_le_bytes([c[0], c[1]]).to_f64())),
            _ => self.to_i64_vec()?.into_iter().for_each(|v| f(v as f64)),
        }
        Some(())
    }

    /// Values as i64 from any integer or bool storage.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let raw = self.raw()?;
        let v = match self.dtype {
            DataType::Int64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DataType::Uint64 => raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Int32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Uint32 => raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Int16 => raw
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Uint16 => raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::Int8 => raw.iter().map(|&b| b as i8 as i64).collect(),
            DataType::Uint8 | DataType::Bool => raw.iter().map(|&b| b as i64).collect(),
            _ => return None,
        };
        Some(v)
    }
}
