//! The rules of the ONNX checker that bidora enforces at import ([`crate::import_check`]) and
//! during inference ([`crate::shape`]), as an error type both can return without naming each
//! other.

/// What a user can do about a model that breaks a rule about its structure (it was edited by
/// hand, merged from two graphs, or written by a buggy tool).
const HINT_REEXPORT: &str = "what you can do: re-export the model, or fix it with the onnx \
Python package and check it with onnx.checker.check_model";

/// A broken rule. The messages name the node, the rule and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error(
        "the model's ir_version {found} is not an ONNX IR version bidora knows ({min} to {max}, \
         the versions in onnx.proto's Version enum); what you can do: re-save the model with \
         an onnx release that writes one of them (onnx.save(onnx.load(path), path)), or \
         re-export it"
    )]
    IrVersion { found: i64, min: i64, max: i64 },

    #[error(
        "graph input '{name}' is declared twice (graph inputs need unique names); {}",
        HINT_REEXPORT
    )]
    DuplicateInput { name: String },

    #[error(
        "graph output '{name}' is declared twice (graph outputs need unique names); {}",
        HINT_REEXPORT
    )]
    DuplicateOutput { name: String },

    #[error(
        "{node} assigns '{value}', which {first} already defines (an ONNX value is assigned \
         once); {}",
        HINT_REEXPORT
    )]
    Reassigned {
        node: String,
        value: String,
        first: String,
    },

    #[error(
        "{node} sets attribute '{attr}' twice (runtimes disagree on which one counts); {}",
        HINT_REEXPORT
    )]
    DuplicateAttribute { node: String, attr: String },

    #[error(
        "{node} has attribute '{attr}', which {op} does not have (at opset {opset} it takes \
         {known}); what you can do: fix the attribute's name (a typo?) or remove it, and \
         re-export"
    )]
    UnknownAttribute {
        node: String,
        op: String,
        attr: String,
        opset: i64,
        known: String,
    },

    #[error(
        "{node} has attribute '{attr}', which {op} takes {range} only, not at the model's \
         opset {opset}; what you can do: re-export the model at one opset (torch.onnx.export's \
         opset_version), or remove the attribute"
    )]
    AttributeNotInOpset {
        node: String,
        op: String,
        attr: String,
        opset: i64,
        range: String,
    },

    #[error(
        "{node}: attribute '{attr}' is {found}, but {op}'s '{attr}' is {expected}; {}",
        HINT_REEXPORT
    )]
    AttributeType {
        node: String,
        op: String,
        attr: String,
        found: &'static str,
        expected: &'static str,
    },

    #[error(
        "{node}: attribute '{attr}' holds {size} {unit}, over the limit of {limit} (passes copy \
         a node's attributes into every program); what you can do: store large constants as \
         initializers (exporters do; onnx's Python package can move a Constant's value into \
         one), and keep lists and strings in attributes small"
    )]
    AttributeTooLarge {
        node: String,
        attr: String,
        size: usize,
        unit: &'static str,
        limit: usize,
    },

    #[error(
        "{node} takes '{a}' as {a_type} and '{b}' as {b_type}, but {op} needs {which} to share \
         one element type (the ONNX spec's type constraint); what you can do: re-export the model \
         in one dtype (model.to(torch.float32) before torch.onnx.export), or cast the weight \
         of the other type to the activations' type (rewrite its initializer with onnx's \
         numpy_helper)"
    )]
    MixedTypes {
        node: String,
        op: String,
        which: &'static str,
        a: String,
        a_type: &'static str,
        b: String,
        b_type: &'static str,
    },
}
