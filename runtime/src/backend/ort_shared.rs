//! Frozen weights shared by every ONNX Runtime session of a backend.
//!
//! An artifact's programs all reference the same tensors in `weights.bin` (ONNX external
//! data). Left to itself, each session would read its own copy: five programs, five copies
//! of the model in memory. Here each external tensor becomes one ORT value, made on first use
//! and added to every session that names it (`AddInitializer`: the session uses the value
//! in place instead of loading the tensor from the file).
//!
//! Measured on the quickstart's MiniLM (ORT 1.32 CPU, one thread, 12 BiDoRA steps): peak RSS
//! 952 → 925 MB, step time unchanged. Sharing ORT's prepacked-weights container as well
//! saved 65 MB but made each step 7 % slower, so it is not used. The session's own packed
//! copies of MatMul weights (MLAS prepacking) remain per session.
//!
//! Element types without a host type here (f16, bf16 and the small integer types) are left
//! to ONNX Runtime to load from the file, per session, except when a half program is upcast
//! for the CPU provider: then its f16/bf16 tensors are converted to f32 here, once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bidora_compiler::proto::onnx::tensor_proto::{DataLocation, DataType};
use bidora_compiler::proto::onnx::TensorProto;
use ort::value::{DynValue, Tensor};

/// One external tensor: which file, where in it, its name, and whether it is upcast.
type Key = (PathBuf, String, u64, u64, bool);

pub struct SharedWeights {
    values: Mutex<HashMap<Key, Arc<DynValue>>>,
}

impl SharedWeights {
    pub fn new() -> SharedWeights {
        SharedWeights {
            values: Mutex::new(HashMap::new()),
        }
    }

    /// The shared values for the external initializers of the program at `path`, by
    /// initializer name. Reads only the model file's own bytes (small: weights are external)
    /// and, on first use, each tensor's bytes from its data file.
    pub fn for_program(&self, path: &Path) -> Result<Vec<(String, Arc<DynValue>)>, String> {
        self.for_program_as(path, false)
    }

    /// Like [`SharedWeights::for_program`]; with `upcast`, f16 and bf16 tensors become f32
    /// values (converted once, shared like the others): what a program legalised by
    /// `legalize::upcast_half` expects in their place.
    pub fn for_program_as(
        &self,
        path: &Path,
        upcast: bool,
    ) -> Result<Vec<(String, Arc<DynValue>)>, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let model = bidora_compiler::onnx_io::decode_model_shared(bytes.into(), path)
            .map_err(|e| e.to_string())?;
        let Some(graph) = model.graph else {
            return Ok(vec![]);
        };
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut out = vec![];
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        for t in &graph.initializer {
            let Some((file, offset, length)) = external(t) else {
                continue;
            };
            // Only plain file names beside the program: what bidora-compile writes. Anything
            // else is left to ONNX Runtime's own (path-checking) loader.
            if file.contains(['/', '\\']) || file == ".." {
                continue;
            }
            let data_path = folder.join(&file);
            let name = t.name.clone().unwrap_or_default();
            let key = (data_path.clone(), name.clone(), offset, length, upcast);
            if let Some(v) = values.get(&key) {
                out.push((name, v.clone()));
                continue;
            }
            let Some(v) = value(t, &data_path, offset, length, upcast)? else {
                continue;
            };
            let v = Arc::new(v);
            values.insert(key, v.clone());
            out.push((name, v));
        }
        Ok(out)
    }
}

/// (location, offset, length) of a tensor stored as external data.
fn external(t: &TensorProto) -> Option<(String, u64, u64)> {
    if t.data_location != Some(DataLocation::External as i32) {
        return None;
    }
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(k))
            .and_then(|e| e.value.clone())
    };
    Some((
        get("location")?,
        get("offset").map_or(Some(0), |v| v.parse().ok())?,
        get("length")?.parse().ok()?,
    ))
}

/// The tensor as an ORT value, or `None` for element types left to ORT.
fn value(
    t: &TensorProto,
    file: &Path,
    offset: u64,
    length: u64,
    upcast: bool,
) -> Result<Option<DynValue>, String> {
    let dims: Vec<i64> = t.dims.clone();
    let numel = dims
        .iter()
        .try_fold(1u64, |a, &d| {
            u64::try_from(d).ok().and_then(|d| a.checked_mul(d))
        })
        .ok_or_else(|| format!("tensor '{}' has invalid dims {dims:?}", name(t)))?;
    let width = match DataType::try_from(t.data_type.unwrap_or(0)) {
        Ok(DataType::Float) | Ok(DataType::Int32) => 4,
        Ok(DataType::Double) | Ok(DataType::Int64) => 8,
        Ok(DataType::Float16) | Ok(DataType::Bfloat16) if upcast => 2,
        _ => return Ok(None),
    };
    if numel.checked_mul(width) != Some(length) {
        return Err(format!(
            "tensor '{}': {length} bytes in {} for {numel} elements of {width} bytes",
            name(t),
            file.display()
        ));
    }
    let f = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "tensor '{}' lies at {offset}+{length}, past the end of {} ({size} bytes)",
            name(t),
            file.display()
        ));
    }
    let mut raw = vec![0u8; length as usize];
    f.read_exact_at(&mut raw, offset)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let shape = dims.clone();
    let err = |e: ort::Error| format!("tensor '{}': {e}", name(t));
    let v = match DataType::try_from(t.data_type.unwrap_or(0)) {
        Ok(DataType::Float) => Tensor::from_array((shape, le::<f32, 4>(&raw, f32::from_le_bytes)))
            .map_err(err)?
            .into_dyn(),
        Ok(DataType::Int32) => Tensor::from_array((shape, le::<i32, 4>(&raw, i32::from_le_bytes)))
            .map_err(err)?
            .into_dyn(),
        Ok(DataType::Double) => Tensor::from_array((shape, le::<f64, 8>(&raw, f64::from_le_bytes)))
            .map_err(err)?
            .into_dyn(),
        Ok(DataType::Int64) => Tensor::from_array((shape, le::<i64, 8>(&raw, i64::from_le_bytes)))
            .map_err(err)?
            .into_dyn(),
        Ok(DataType::Float16) => {
            let v = le::<f32, 2>(&raw, |b| half::f16::from_le_bytes(b).to_f32());
            Tensor::from_array((shape, v)).map_err(err)?.into_dyn()
        }
        Ok(DataType::Bfloat16) => {
            let v = le::<f32, 2>(&raw, |b| half::bf16::from_le_bytes(b).to_f32());
            Tensor::from_array((shape, v)).map_err(err)?.into_dyn()
        }
        _ => return Ok(None),
    };
    Ok(Some(v))
}

fn le<T, const N: usize>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks of N")))
        .collect()
}

fn name(t: &TensorProto) -> &str {
    t.name.as_deref().unwrap_or("")
}
