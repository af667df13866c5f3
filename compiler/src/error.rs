//! The compiler's error type. Every variant carries enough context (file, node, value, op) for
//! the message alone to tell a user what is wrong and where.

use std::path::PathBuf;

use crate::onnx_io::OnnxIoError;

mod violation;
pub use violation::Violation;

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

    /// The model breaks a rule of the ONNX checker that bidora enforces at import
    /// ([`crate::import_check`]); the message names the node and the rule. Boxed: the
    /// variants carry several names, and every `Result` of the crate pays for the largest.
    #[error(transparent)]
    Rule(Box<Violation>),

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

impl From<Violation> for Error {
    fn from(v: Violation) -> Error {
        Error::Rule(Box::new(v))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a user can do about an op the compiler cannot type (shape inference reaches every
/// node, wherever the adapters are).
pub const HINT_NO_SHAPE_RULE: &str = "what you can do: export with the other torch.onnx \
exporter, which writes different ops (torch.onnx.export(..., dynamo=False, opset_version=17) \
or dynamo=True), or report the op so a rule can be added";

/// What a user can do about an op autodiff cannot differentiate: it lies between an adapter
/// and the loss, so adapters after it avoid it.
pub const HINT_NO_GRADIENT: &str = "what you can do: put the adapters after this node \
(--list-targets shows every module; target later modules only), or export with the other \
torch.onnx exporter, which writes different ops (dynamo=False or dynamo=True)";

impl Error {
    /// The error with `hint` appended to an unsupported-op message (others unchanged).
    pub fn with_hint(self, hint: &str) -> Error {
        match self {
            Error::UnsupportedOp { op, node, msg } => Error::UnsupportedOp {
                op,
                node,
                msg: format!("{msg}; {hint}"),
            },
            other => other,
        }
    }
}
