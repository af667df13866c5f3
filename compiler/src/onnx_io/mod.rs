//! Reading and writing ONNX model files. This is the only module that touches model files on
//! disk.
//!
//! - [`decode_model`] / [`encode_model`]: protobuf bytes to and from [`ModelProto`], with a
//!   sanity check that the bytes really describe a model.
//! - [`read_model`]: reads a `.onnx` file and loads every tensor stored as external data
//!   (initializers, sparse initializers, tensor attributes, subgraphs, function bodies,
//!   training graphs) into `raw_data`. Locations are checked before any file is opened:
//!   absolute paths, `..` components and symlinks that leave the model's folder are refused,
//!   and every read is bounds-checked against the file size before memory is allocated.
//!   Large files are memory-mapped ([`mapped`]): tensors are slices of the mapping.
//! - [`write_model`] / [`write_model_auto`]: atomic writes (temporary file in the same folder,
//!   fsync, rename), optionally moving large tensors into one external data file.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tempfile::NamedTempFile;

use crate::proto::onnx::tensor_proto::{DataLocation, DataType};
use crate::proto::onnx::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto,
    StringStringEntryProto, TensorProto, TrainingInfoProto,
};

/// Largest protobuf message other tools can read (2 GiB - 1 bytes).
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// [`write_model_auto`] embeds all data while the encoded model stays below this (1.9 GiB).
pub const AUTO_EMBED_LIMIT: u64 = 19 * (1 << 30) / 10;

/// Tensors of at least this many bytes go external when [`write_model_auto`] must split.
pub const AUTO_EXTERNAL_THRESHOLD: usize = 1024;

/// Alignment of each tensor's offset inside an external data file written by us.
pub const EXTERNAL_ALIGNMENT: u64 = 64;

/// Everything that can go wrong reading or writing a model. Every variant names the file,
/// and the tensor where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum OnnxIoError {
    /// The model file could not be read (missing, unreadable, a folder...).
    #[error("cannot read ONNX model `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The bytes are not a protobuf `ModelProto` (truncated, garbage, another format).
    #[error("`{}` is not a valid ONNX model: {source}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },

    /// The protobuf decoded but lacks what every model has (an IR version, a graph).
    #[error("`{}` is not a valid ONNX model: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },

    /// A tensor's external data description is malformed or inconsistent.
    #[error("`{}`: external data of tensor `{tensor}`: {reason}", model.display())]
    ExternalData {
        model: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A tensor's external data location could reach outside the model's folder.
    #[error(
        "`{}`: tensor `{tensor}` refers to external data at `{location}`, which is refused: {reason}",
        model.display()
    )]
    UnsafeExternalPath {
        model: PathBuf,
        tensor: String,
        location: String,
        reason: String,
    },

    /// The external data file of a tensor does not exist.
    #[error(
        "`{}`: tensor `{tensor}` stores its data in `{}`, which does not exist",
        model.display(),
        file.display()
    )]
    MissingExternalFile {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
    },

    /// The external data file of a tensor exists but could not be opened or read.
    #[error(
        "`{}`: cannot read the external data of tensor `{tensor}` from `{}`: {source}",
        model.display(),
        file.display()
    )]
    ExternalFile {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The declared byte range of a tensor is not inside its external data file.
    #[error(
        "`{}`: tensor `{tensor}` needs {length} bytes at offset {offset} of `{}`, which holds only {file_size} bytes",
        model.display(),
        file.display()
    )]
    ExternalOutOfBounds {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
        offset: u64,
        length: u64,
        file_size: u64,
    },

    /// Writing a file failed; nothing half-written is left behind.
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The model cannot be written as asked (too large, unloaded external data, bad options).
    #[error("cannot write `{}`: {reason}", path.display())]
    Unwritable { path: PathBuf, reason: String },
}

type Result<T, E = OnnxIoError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Bytes.

/// Decodes a model from protobuf bytes. `origin` only names the source in errors.
///
/// Besides protobuf errors this refuses empty input and messages without an `ir_version` or
/// without a graph, which is what arbitrary bytes usually decode to.
pub fn decode_model(bytes: &[u8], origin: &Path) -> Result<ModelProto> {
    decode_model_shared(bytes::Bytes::copy_from_slice(bytes), origin)
}

/// Like [`decode_model`], but tensors' `raw_data` become slices of `bytes` instead of copies,
/// so a model's weights are held in memory once.
pub fn decode_model_shared(bytes: bytes::Bytes, origin: &Path) -> Result<ModelProto> {
    let invalid = |reason: &str| OnnxIoError::Invalid {
        path: origin.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.is_empty() {
        return Err(invalid("the file is empty"));
    }
    let model = ModelProto::decode(bytes).map_err(|source| OnnxIoError::Decode {
        path: origin.to_path_buf(),
        source,
    })?;
    match model.ir_version {
        None | Some(0) => return Err(invalid("it has no ir_version (missing or 0)")),
        Some(v) if v < 0 => return Err(invalid(&format!("its ir_version {v} is negative"))),
        Some(_) => {}
    }
    if model.graph.is_none() {
        return Err(invalid("it has no graph"));
    }
    Ok(model)
}

/// Encodes a model to protobuf bytes (no size check; see [`write_model`]).
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

pub mod mapped;
mod read;
mod visit;
mod write;

pub use read::*;
use visit::*;
pub use write::*;

#[cfg(test)]
mod tests;
