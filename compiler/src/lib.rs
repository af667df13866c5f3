//! bidora's compiler: ONNX model in, BiDoRA training programs out.
//!
//! See `ARCHITECTURE.md` at the repository root for the map. In one line per module:
//! - [`proto`]: prost types generated from `proto/onnx.proto` (nothing else is generated).
//! - [`onnx_io`]: reading and writing model files, external data, path safety.
//! - [`ir`]: the graph IR and its lossless conversion from and to protobuf.
//! - [`import_check`]: the ONNX checker's rules every loaded model must pass (IR version, opset,
//!   unique names, known attributes per op and opset, attribute sizes, one dtype per type
//!   variable).
//! - [`fact`]: what inference knows of a value (dtype, symbolic shape, small contents).
//! - [`shape`]: dtype and symbolic shape inference; [`ops`]: per-op-family rules.
//! - [`check`]: the rules every emitted program must pass (structure, types, independent
//!   inputs' dimension names).
//! - [`targets`]: finding the linear ops that can carry adapters, peft-style matching.
//! - [`rewrite`]: the LoRA/DoRA rewrite and the lowering of composite nodes to plain ONNX.
//! - [`artifact`]: the output folder (programs, `init.safetensors`, `manifest.json`);
//!   [`artifact::schema`]: the manifest's one typed definition, for every reader.
//! - [`tensor_file`]: the one safetensors reader and writer for trained and initial tensors.
//! - [`dump`]: the readable text form of a graph.
//! - [`export`]: trained adapters out: the merged model and a peft adapter folder.
//! - [`optim`]: AdamW as an ONNX program (the runtime's device-resident optimiser).
//! - [`cli_exit`]: how the command-line tools end (errors, a closed standard output).
//! - [`provenance`]: the source model's fingerprint, an artifact's identity, no output over
//!   an input.
//! - [`lock`]: one writer per output or run folder (an advisory lock naming its holder).

pub mod artifact;
pub mod autodiff;
pub mod bilevel;
pub mod check;
pub mod cli_exit;
pub mod dump;
pub mod error;
pub mod export;
pub mod fact;
#[doc(hidden)]
pub mod fuzz;
pub mod heads;
pub mod import_check;
pub mod ir;
pub mod legalize;
pub mod lock;
pub mod memory;
pub mod onnx_io;
pub mod ops;
pub mod optim;
pub mod pipeline;
pub mod proto;
pub mod provenance;
pub mod regularizer;
pub mod rewrite;
pub mod shape;
pub mod targets;
pub mod tensor_file;

pub use error::{Error, Result};

/// The ai.onnx opsets the importer accepts. Below 13 ReduceSum/Squeeze take their axes as
/// attributes and Split/Slice differ; above 23 no exporter writes models we have tested.
pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 23;

/// Reads a model file (resolving external data safely), imports it into the IR and checks it
/// against the rules of [`import_check`] (the ONNX opset among them).
pub fn load_model(path: &std::path::Path) -> Result<ir::Model> {
    let proto = onnx_io::read_model(path)?;
    import(proto, path)
}

/// [`load_model`] of a model already in memory, as if read from `path` (external data is
/// resolved against its folder; errors name it). The fuzzer's mutants take this way, so each
/// is not written out and read back.
pub fn load_model_bytes(bytes: Vec<u8>, path: &std::path::Path) -> Result<ir::Model> {
    let mut proto = onnx_io::decode_model_shared(bytes.into(), path)?;
    onnx_io::load_external_data(&mut proto, path)?;
    import(proto, path)
}

fn import(proto: proto::onnx::ModelProto, path: &std::path::Path) -> Result<ir::Model> {
    let mut model = ir::convert::model_from_proto(proto).map_err(|e| match e {
        Error::Invalid(msg) => Error::Invalid(format!("{}: {msg}", path.display())),
        other => other,
    })?;
    // Before any pass reads it: toposort would take a value assigned twice as either one.
    import_check::model(&model)?;
    ir::topo::toposort(&mut model.graph)?;
    Ok(model)
}

pub fn check_opset(model: &ir::Model) -> Result<()> {
    let found = model
        .onnx_opset()
        .ok_or_else(|| Error::Invalid("the model imports no ai.onnx opset".into()))?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&found) {
        return Err(Error::UnsupportedOpset {
            found,
            min: MIN_OPSET,
            max: MAX_OPSET,
        });
    }
    Ok(())
}

/// `s` with control characters (terminal escape codes, newlines) written as Rust escapes,
/// so a name read from a file cannot redraw the user's terminal or forge a line of output.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(s, |_| true)
}

/// [`printable`] for text of several lines: newlines and tabs kept. What the binaries pass
/// their error messages and listings through, since those quote names read from files.
pub fn printable_lines(s: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(s, |c| c != '\n' && c != '\t')
}

fn escape_controls(s: &str, escape: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && escape(c);
    if !s.chars().any(bad) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if bad(c) {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// An error and its causes on one line, each cause once: most messages here already embed
/// their cause's text (so they read whole on their own), and printing the chain as well
/// would repeat it ("Is a directory (os error 21): Is a directory (os error 21)").
pub fn error_chain<'a>(
    causes: impl IntoIterator<Item = &'a (dyn std::error::Error + 'a)>,
) -> String {
    let mut out = String::new();
    for cause in causes {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
