//! What inference knows about a value: its element type, its shape as symbolic [`DimExpr`]s
//! and, for small integer tensors, their contents. The shape driver ([`crate::shape`]) and
//! the op rules ([`crate::ops`]) both speak these types, so they live below both.

pub mod dim;

use std::collections::HashMap;

pub use dim::DimExpr;

use crate::ir::{DataType, Tensor};

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
    /// Equalities of different symbolic sizes the rules assumed, in node order.
    pub assumed: Vec<Assumed>,
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

/// Two different symbolic sizes that a rule treated as equal (a broadcast of `batch` against
/// `val_batch`, a MatMul's inner dimensions). Inference cannot prove them equal; a runtime's
/// memory planner may take them to be. [`crate::check`] refuses those that join sizes of
/// independent inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Assumed {
    pub node: String,
    pub a: DimExpr,
    pub b: DimExpr,
}
