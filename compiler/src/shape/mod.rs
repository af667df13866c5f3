//! Dtype and symbolic shape inference over the IR.
//!
//! Every value gets a [`Fact`]: its element type, its shape as [`DimExpr`]s (rank always
//! known for the ops we support), and, for small integer tensors, their contents. Exported
//! transformers compute shapes in the graph (`Shape → Gather → Concat → Reshape`), so
//! propagating those contents, symbols included, is what lets inference see through them.
//! The per-op rules live in [`crate::ops`]; this module is the driver.

pub mod dim;

use std::cell::Cell;
use std::collections::HashMap;

pub use dim::DimExpr;

use crate::error::{Error, Result};
use crate::ir::{DataType, Dim, Graph, Model, Tensor, ValueType};
use crate::ops::{self, InferCx};

/// Integer tensors with at most this many elements have their contents tracked.
pub const MAX_TRACKED_VALUES: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub dtype: DataType,
    pub shape: Vec<DimExpr>,
    /// Contents of a small integer tensor, row-major, when known.
    pub value: Option<Vec<DimExpr>>,
}

impl Fact {
    pub fn new(dtype: DataType, shape: Vec<DimExpr>) -> Fact {
        Fact {
            dtype,
            shape,
            value: None,
        }
    }

    pub fn with_value(mut self, value: Vec<DimExpr>) -> Fact {
        self.value = Some(value);
        self
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Known integer contents (no symbols).
    pub fn known_ints(&self) -> Option<Vec<i64>> {
        self.value.as_ref()?.iter().map(DimExpr::as_known).collect()
    }

    /// The number of elements if known.
    pub fn known_numel(&self) -> Option<i64> {
        self.shape
            .iter()
            .try_fold(1i64, |a, d| d.as_known().and_then(|v| a.checked_mul(v)))
    }

    /// `f32[batch, 8]`
    pub fn display(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype.short_name(), dims.join(", "))
    }
}

/// The facts of every value of a graph.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    map: HashMap<String, Fact>,
}

impl Facts {
    pub fn get(&self, name: &str) -> Option<&Fact> {
        self.map.get(name)
    }

    pub fn insert(&mut self, name: String, fact: Fact) {
        self.map.insert(name, fact);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The fact of a constant tensor, with contents when it is a small integer tensor.
pub fn tensor_fact(t: &Tensor) -> Fact {
    let shape = t.dims.iter().map(|&d| DimExpr::known(d)).collect();
    let mut f = Fact::new(t.dtype, shape);
    if (t.dtype.is_integer() || t.dtype == DataType::Bool)
        && t.numel().is_some_and(|n| n <= MAX_TRACKED_VALUES)
    {
        f.value = t
            .to_i64_vec()
            .map(|v| v.into_iter().map(DimExpr::known).collect());
    }
    f
}

pub fn infer(model: &Model) -> Result<Facts> {
    infer_graph(&model.graph, model.onnx_opset().unwrap_or(crate::MAX_OPSET))
}

pub fn infer_graph(graph: &Graph, opset: i64) -> Result<Facts> {
    let fresh = Cell::new(0usize);
    let mut facts = Facts::default();
    for (name, t) in &graph.initializers {
        facts.insert(name.clone(), tensor_fact(t));
    }
    for input in &graph.inputs {
        if graph.initializers.contains_key(&input.name) {
            continue;
        }
        let Some(ValueType::Tensor {
            elem,
            shape: Some(dims),
            ..
        }) = &input.ty
        else {
            return Err(Error::Shape {
                node: format!("graph input '{}'", input.name),
                msg: "needs a tensor type with a known rank".into(),
            });
        };
        let shape = dims
            .iter()
            .map(|d| match d {
                Dim::Known(v) => DimExpr::known(*v),
                Dim::Sym(s) => DimExpr::sym(s),
                Dim::Unknown => ops::fresh_dim(&fresh),
            })
            .collect();
        facts.insert(input.name.clone(), Fact::new(*elem, shape));
    }
    for node in &graph.nodes {
        let inputs: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| if i.is_empty() { None } else { facts.get(i) })
            .collect();
        if let Some(missing) = node
            .inputs
            .iter()
            .zip(&inputs)
            .find(|(n, f)| !n.is_empty() && f.is_none())
        {
            return Err(Error::Shape {
                node: node.label(),
                msg: format!("input '{}' has no known type", missing.0),
            });
        }
        let rule =
            ops::lookup(&node.domain, &node.op_type).ok_or_else(|| Error::UnsupportedOp {
                op: node.op_type.clone(),
                node: node.name.clone(),
                msg: "no shape rule".into(),
            })?;
        let mut cx = InferCx {
            node,
            inputs,
            opset,
            fresh: &fresh,
        };
        let outs = (rule.infer)(&mut cx)?;
        for (name, fact) in node.outputs.iter().zip(outs) {
            if !name.is_empty() {
                facts.insert(name.clone(), fact);
            }
        }
    }
    Ok(facts)
}
