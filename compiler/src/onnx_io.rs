//! TEMPORARY stub until the real module lands.
use crate::proto::onnx::ModelProto;
use prost::Message;
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
pub enum OnnxIoError {
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
}
#[derive(Default)]
pub struct WriteOptions {}
pub fn read_model(path: &Path) -> Result<ModelProto, OnnxIoError> {
    let b = std::fs::read(path).map_err(|e| OnnxIoError::Bad {
        path: path.into(),
        msg: e.to_string(),
    })?;
    ModelProto::decode(&b[..]).map_err(|e| OnnxIoError::Bad {
        path: path.into(),
        msg: e.to_string(),
    })
}
pub fn write_model(m: &ModelProto, path: &Path, _o: &WriteOptions) -> Result<(), OnnxIoError> {
    std::fs::write(path, m.encode_to_vec()).map_err(|e| OnnxIoError::Bad {
        path: path.into(),
        msg: e.to_string(),
    })
}
