//! The trained tensors: a safetensors file written by `bidora train` (`final.safetensors`,
//! `best.safetensors`) or any file with the artifact's trainable tensor names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{ExportError, Result};

pub struct Trained {
    pub path: PathBuf,
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    /// The identity of the artifact whose run wrote the file (`bidora train` records it in
    /// the metadata; `crate::provenance::identity`), when the file says.
    pub identity: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Trained {
    /// Reads every tensor (f32 or f64) of `path`. Names must be among `known` (the artifact's
    /// trainable tensors) and values finite: a NaN would silently poison the merged model.
    pub fn read(path: &Path, known: &[String]) -> Result<Trained> {
        let err = |msg: String| ExportError::Tensors {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let identity = safetensors::SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| {
                m.metadata()
                    .as_ref()?
                    .get(crate::provenance::IDENTITY_KEY)
                    .cloned()
            })
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| {
                    err(format!(
                        "its metadata '{}' is not a JSON object: {e}",
                        crate::provenance::IDENTITY_KEY
                    ))
                })
            })
            .transpose()?;
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            if !known.iter().any(|k| k == name) {
                return Err(ExportError::UnknownTensor {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    known: known.join(", "),
                });
            }
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                safetensors::Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                other => {
                    return Err(err(format!(
                        "tensor '{name}' is {other:?}; expected F32 or F64"
                    )))
                }
            };
            if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(ExportError::NonFinite {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    index,
                    value,
                });
            }
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Ok(Trained {
            path: path.to_path_buf(),
            tensors,
            identity,
        })
    }

    /// The values of `name`, which must have shape `dims`; `what` says what it is for the
    /// message when it is missing.
    pub fn get(&self, name: &str, dims: &[usize], what: &str) -> Result<&[f64]> {
        let (shape, values) = self
            .tensors
            .get(name)
            .ok_or_else(|| ExportError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
                what: what.to_string(),
            })?;
        if shape != dims {
            return Err(ExportError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: dims.to_vec(),
                found: shape.clone(),
            });
        }
        Ok(values)
    }
}
