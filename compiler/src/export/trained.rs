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
        let file = crate::tensor_file::read(path)
            .and_then(|f| f.check_finite(path).map(|()| f))
            .map_err(|e| match e {
                crate::tensor_file::TensorFileError::NonFinite {
                    name, index, value, ..
                } => ExportError::NonFinite {
                    path: path.to_path_buf(),
                    name,
                    index,
                    value,
                },
                other => err(other.detail()),
            })?;
        let identity = file
            .metadata
            .get(crate::provenance::IDENTITY_KEY)
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    err(format!(
                        "its metadata '{}' is not a JSON object: {e}",
                        crate::provenance::IDENTITY_KEY
                    ))
                })
            })
            .transpose()?;
        let mut tensors = HashMap::new();
        for e in file.tensors {
            if !known.contains(&e.name) {
                return Err(ExportError::UnknownTensor {
                    path: path.to_path_buf(),
                    name: e.name,
                    known: known.join(", "),
                });
            }
            tensors.insert(e.name, (e.shape, e.values));
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
