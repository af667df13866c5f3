//! The compiler's error type. Every variant carries enough context (file, node, value, op) for
//! the message alone to tell a user what is wrong and where.

use std::path::PathBuf;

use crate::onnx_io::OnnxIoError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    OnnxIo(#[from] OnnxIoError),

    /// The protobuf decoded but does not describe a usable model.
    #[error("invalid model: {0}")]
    Invalid(String),

    /// A structural problem in a graph (dangling input, cycle, duplicate producer).
    #[error("invalid graph: {0}")]
    Graph(String),

    #[error(
        "unsupported opset: the model imports ai.onnx opset {found}; bidora supports opsets {min} to {max}"
    )]
    UnsupportedOpset { found: i64, min: i64, max: i64 },

    /// Shape or type inference failed at a node.
    #[error("shape inference failed at {node}: {msg}")]
    Shape { node: String, msg: String },

    /// An op the inference or a pass does not know.
    #[error("unsupported op {op} ({node}): {msg}")]
    UnsupportedOp {
        op: String,
        node: String,
        msg: String,
    },

    /// Target selection found nothing or something it cannot adapt.
    #[error("{msg}")]
    Target { msg: String },

    #[error("rewrite of {node} failed: {msg}")]
    Rewrite { node: String, msg: String },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An emitted program breaks a rule of [`crate::check`]: a compiler bug, or a model the
    /// passes mishandle.
    #[error("emitted program {program} fails its check: {msg} (this is a bidora-compile bug; please report it with the model)")]
    Program { program: String, msg: String },

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
