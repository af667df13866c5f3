//! The rules of the ONNX checker that matter to bidora, run on every model the importer loads
//! ([`crate::load_model`], [`crate::load_model_bytes`], export's source model) before any
//! pass reads it. ONNX Runtime enforces each of them when it loads a model, so a model that
//! broke one used to compile into an artifact that ONNX Runtime refused, far from the cause;
//! the tract backend and the shape rules often took such a model silently (a misspelled
//! attribute read as its default). Each refusal names the node (op type and name), the rule
//! and what the user can do.
//!
//! 1. **IR version** within the range onnx.proto's `Version` enum defines.
//! 2. **Opset**: the ai.onnx opset is one the op tables know ([`crate::check_opset`]).
//! 3. **Unique names**: graph inputs and graph outputs are declared once, every value is
//!    assigned once (a node output is no graph input, initializer or other node output),
//!    a node sets each attribute once. An initializer may share a graph input's name: that
//!    is a default a caller may override, legal ONNX.
//! 4. **Attribute sizes**: lists, strings and tensors in attributes are bounded.
//! 5. **Known attributes**: each attribute of a supported op is one the op has at the model's
//!    opset, of the spec's type ([`crate::ops::OpDef::attrs`]). Unknown ops are left to the
//!    shape inference, which names them with what to do.
//! 6. **One element type** for the inputs the spec types with one variable (MatMul's `A: T,
//!    B: T`). That one needs the inferred dtypes of intermediate values, so the inference
//!    driver runs it ([`same_types`]) at every node: on the input model before the rewrite
//!    (`pipeline::compile` type-checks it first) and on every emitted program
//!    ([`crate::check::program`]).
//!
//! The rules look at the main graph; subgraphs belong to ops (If, Loop, Scan) that have no
//! shape rule here, so a model with one is refused by inference anyway.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::ir::convert::MAX_NAME_BYTES;
use crate::ir::{AttrValue, DataType, Model, Node, TensorData};
use crate::ops::{self, AttrKind, OpDef};
use crate::proto::onnx::Version;
use crate::shape::Fact;

/// The first IR version with `opset_import` (2017-11-03); older files have no opset, and the
/// importer needs one to know the ops' semantics.
pub const MIN_IR_VERSION: i64 = Version::IrVersion2017113 as i64;
/// The newest IR version in the vendored onnx.proto's `Version` enum (`IR_VERSION`). A file
/// stamped higher comes from an ONNX this bidora does not know, or was corrupted (99).
pub const MAX_IR_VERSION: i64 = Version::IrVersion as i64;

/// Most elements in an ints or floats attribute, and most strings in a strings attribute.
/// The largest real ones are a Constant's `value_ints` (a shape, a few entries) or Conv's
/// `pads`; passes copy a node's attributes into every program they emit.
pub const MAX_ATTR_ELEMENTS: usize = 1 << 20;
/// Longest string in an attribute (Conv's `auto_pad`, DoRA's `module`): names, so the name cap.
pub const MAX_ATTR_STRING_BYTES: usize = MAX_NAME_BYTES;
/// Largest tensor (or list of tensors, or sparse tensor) in an attribute. Exporters put
/// weights in initializers, which are stored once and may live in external data; a Constant
/// node's tensor is copied with the node into each program.
pub const MAX_ATTR_TENSOR_BYTES: usize = 1 << 28;

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
         one element type (the ONNX spec's type constraint); what you can do: cast the odd one out \
         (a weight saved as {b_type}: convert it to {a_type}), or re-export the model in one \
         dtype (model.to(torch.float32) before torch.onnx.export)"
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

/// Rules 1 to 5 on a freshly imported model.
pub fn model(m: &Model) -> Result<()> {
    if !(MIN_IR_VERSION..=MAX_IR_VERSION).contains(&m.ir_version) {
        return Err(Violation::IrVersion {
            found: m.ir_version,
            min: MIN_IR_VERSION,
            max: MAX_IR_VERSION,
        }
        .into());
    }
    crate::check_opset(m)?;
    let opset = m.onnx_opset().unwrap_or(crate::MAX_OPSET);
    names(m)?;
    for n in &m.graph.nodes {
        attribute_sizes(n)?;
        known_attributes(n, opset)?;
    }
    Ok(())
}

fn names(m: &Model) -> std::result::Result<(), Violation> {
    let g = &m.graph;
    // Value name → what defines it, for the message of a second definition.
    let mut defined: HashMap<&str, String> = HashMap::new();
    let mut inputs = HashSet::new();
    for i in &g.inputs {
        if !inputs.insert(i.name.as_str()) {
            return Err(Violation::DuplicateInput {
                name: i.name.clone(),
            });
        }
        defined.insert(&i.name, format!("graph input '{}'", i.name));
    }
    for name in g.initializers.keys() {
        // Beside an input of the same name it is the input's default value: legal ONNX.
        defined
            .entry(name)
            .or_insert_with(|| format!("initializer '{name}'"));
    }
    for n in &g.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if let Some(first) = defined.get(o.as_str()) {
                return Err(Violation::Reassigned {
                    node: n.label(),
                    value: o.clone(),
                    first: first.clone(),
                });
            }
            defined.insert(o, n.label());
        }
        let mut attrs = HashSet::new();
        for a in &n.attributes {
            if !attrs.insert(a.name.as_str()) {
                return Err(Violation::DuplicateAttribute {
                    node: n.label(),
                    attr: a.name.clone(),
                });
            }
        }
    }
    let mut outputs = HashSet::new();
    for o in &g.outputs {
        if !outputs.insert(o.name.as_str()) {
            return Err(Violation::DuplicateOutput {
                name: o.name.clone(),
            });
        }
    }
    Ok(())
}

fn attribute_sizes(n: &Node) -> std::result::Result<(), Violation> {
    for a in &n.attributes {
        let too_large = |size: usize, unit: &'static str, limit: usize| {
            (size > limit).then(|| Violation::AttributeTooLarge {
                node: n.label(),
                attr: a.name.clone(),
                size,
                unit,
                limit,
            })
        };
        let longest = |v: &[Vec<u8>]| v.iter().map(Vec::len).max().unwrap_or(0);
        let found = match &a.value {
            AttrValue::Ints(v) => too_large(v.len(), "elements", MAX_ATTR_ELEMENTS),
            AttrValue::Floats(v) => too_large(v.len(), "elements", MAX_ATTR_ELEMENTS),
            AttrValue::String(s) => too_large(s.len(), "bytes", MAX_ATTR_STRING_BYTES),
            AttrValue::Strings(v) => too_large(v.len(), "strings", MAX_ATTR_ELEMENTS)
                .or_else(|| too_large(longest(v), "bytes in one string", MAX_ATTR_STRING_BYTES)),
            AttrValue::Tensor(t) => too_large(tensor_bytes(t), "bytes", MAX_ATTR_TENSOR_BYTES),
            AttrValue::Tensors(v) => too_large(
                v.iter().map(tensor_bytes).sum(),
                "bytes",
                MAX_ATTR_TENSOR_BYTES,
            ),
            AttrValue::SparseTensor(s) => too_large(
                prost::Message::encoded_len(&**s),
                "bytes",
                MAX_ATTR_TENSOR_BYTES,
            ),
            _ => None,
        };
        if let Some(v) = found {
            return Err(v);
        }
    }
    Ok(())
}

fn tensor_bytes(t: &crate::ir::Tensor) -> usize {
    match &t.data {
        TensorData::Raw(b) => b.len(),
        TensorData::Strings(s) => s.iter().map(Vec::len).sum(),
    }
}

fn known_attributes(n: &Node, opset: i64) -> std::result::Result<(), Violation> {
    let Some(def) = ops::lookup(&n.domain, &n.op_type) else {
        return Ok(());
    };
    // The opset ranges are ai.onnx's; the compiler's own domain has one version.
    let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
    for a in &n.attributes {
        let Some(spec) = def.attrs.iter().find(|d| d.name == a.name) else {
            let known: Vec<String> = def
                .attrs
                .iter()
                .filter(|d| !onnx || d.in_opset(opset))
                .map(|d| format!("'{}'", d.name))
                .collect();
            return Err(Violation::UnknownAttribute {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                opset,
                known: if known.is_empty() {
                    "no attributes".into()
                } else {
                    known.join(", ")
                },
            });
        };
        if onnx && !spec.in_opset(opset) {
            return Err(Violation::AttributeNotInOpset {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                opset,
                range: match (spec.since, spec.until) {
                    (s, i64::MAX) => format!("from opset {s}"),
                    (1, u) => format!("up to opset {u}"),
                    (s, u) => format!("at opsets {s} to {u}"),
                },
            });
        }
        let found = AttrKind::of(&a.value);
        if found != Some(spec.kind) {
            return Err(Violation::AttributeType {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                found: match found {
                    Some(k) => k.name(),
                    None => "of a type no supported op takes (a graph, type or reference)",
                },
                expected: spec.kind.name(),
            });
        }
    }
    Ok(())
}

/// Rule 6 at one node: the inputs `def.same_type` names hold one element type. `inputs` are
/// the node's input facts as the inference driver has them (None: omitted).
pub fn same_types(
    node: &Node,
    def: &OpDef,
    inputs: &[Option<&Fact>],
) -> std::result::Result<(), Violation> {
    let mut first: Option<(usize, DataType)> = None;
    for (i, fact) in inputs.iter().enumerate() {
        let Some(fact) = fact.filter(|_| def.same_type.applies(i)) else {
            continue;
        };
        match first {
            None => first = Some((i, fact.dtype)),
            Some((j, t)) if t != fact.dtype => {
                return Err(Violation::MixedTypes {
                    node: node.label(),
                    op: node.op_type.clone(),
                    which: match def.same_type {
                        ops::SameType::All => "all its inputs",
                        _ => "those inputs",
                    },
                    a: node.inputs[j].clone(),
                    a_type: t.short_name(),
                    b: node.inputs[i].clone(),
                    b_type: fact.dtype.short_name(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}
