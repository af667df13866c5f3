//! Op knowledge, one file per op family. Each family lists its ops in a table of [`OpDef`]s;
//! an `OpDef` holds everything the compiler knows about one op: its shape rule, its gradient
//! rule, the attributes it accepts and which of its inputs share one element type (the last
//! two from the ONNX operator spec, checked by [`crate::import_check`] and the inference
//! driver). [`lookup`] is the single entry point.
//!
//! | family | file |
//! |---|---|
//! | unary, broadcasting binary, comparisons, logic, Where, Cast, Softmax | `elementwise.rs` |
//! | MatMul, Gemm | `linalg.rs` |
//! | ReduceSum/Mean/Max/..., ArgMax/ArgMin | `reduce.rs` |
//! | LayerNormalization, Conv (shape only) | `nn.rs` |
//! | Shape, Reshape, Transpose, Concat, Slice, Gather, Expand, Range, Constant, ... | `shape_ops.rs` |
//! | the compiler's composite `ai.bidora` DoRA / LoRA | `dora.rs` |

pub mod dora;
pub mod elementwise;
pub mod grad_cx;
pub mod linalg;
pub mod nn;
pub mod reduce;
pub mod shape_ops;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::fact::{Assumed, DimExpr, Fact};
use crate::ir::{AttrValue, DataType, Node, BIDORA_DOMAIN};
pub use grad_cx::GradCx;

/// A composite marker in `ai.bidora`: identity forward, zero gradient (DoRA's `detach_norm`).
/// The autodiff driver stops at it.
pub const STOP_GRADIENT: &str = "StopGradient";

/// What a shape rule sees: the node, its input facts (None for omitted optional inputs), the
/// model's ai.onnx opset, a source of fresh opaque symbols, and the log of equalities between
/// different symbolic sizes that the rules had to assume.
pub struct InferCx<'a> {
    pub node: &'a Node,
    pub inputs: Vec<Option<&'a Fact>>,
    pub opset: i64,
    pub fresh: &'a Cell<usize>,
    pub assumed: &'a RefCell<Vec<Assumed>>,
}

pub type InferFn = fn(&mut InferCx) -> Result<Vec<Fact>>;

/// A gradient rule: given the output gradients in `cx`, the gradient of each input (None
/// where the input needs none or is not differentiable, e.g. indices and shapes).
pub type GradFn = fn(&mut GradCx) -> Result<Vec<Option<String>>>;

/// Everything the compiler knows about one op.
pub struct OpDef {
    pub op: &'static str,
    pub infer: InferFn,
    /// None: not differentiable (the driver reports it if it lies on a gradient path).
    pub grad: Option<GradFn>,
    /// Every attribute the op accepts in the opsets bidora supports, from the ONNX operator
    /// spec (docs/Operators.md of onnx/onnx). The shape rules read attributes by name and fall
    /// back to the default when one is absent or of another type, so a misspelled or mistyped
    /// attribute would be silently ignored here and refused by ONNX Runtime; the import check
    /// refuses it instead.
    pub attrs: &'static [AttrDef],
    /// Inputs the spec types with one type variable (MatMul's `A: T, B: T`): they must hold
    /// one element type. Runtimes refuse a node that mixes them (an f64 weight into an f32
    /// MatMul); the inference driver does too.
    pub same_type: SameType,
}

/// The value type of an attribute (the `AttributeProto` types the supported ops use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrKind {
    Float,
    Int,
    String,
    Tensor,
    SparseTensor,
    Floats,
    Ints,
    Strings,
}

impl AttrKind {
    pub fn name(self) -> &'static str {
        match self {
            AttrKind::Float => "a float",
            AttrKind::Int => "an int",
            AttrKind::String => "a string",
            AttrKind::Tensor => "a tensor",
            AttrKind::SparseTensor => "a sparse tensor",
            AttrKind::Floats => "a list of floats",
            AttrKind::Ints => "a list of ints",
            AttrKind::Strings => "a list of strings",
        }
    }

    /// The kind of an attribute value; None for kinds no supported op takes (graphs, types,
    /// lists of tensors, undefined).
    pub fn of(v: &AttrValue) -> Option<AttrKind> {
        Some(match v {
            AttrValue::Float(_) => AttrKind::Float,
            AttrValue::Int(_) => AttrKind::Int,
            AttrValue::String(_) => AttrKind::String,
            AttrValue::Tensor(_) => AttrKind::Tensor,
            AttrValue::SparseTensor(_) => AttrKind::SparseTensor,
            AttrValue::Floats(_) => AttrKind::Floats,
            AttrValue::Ints(_) => AttrKind::Ints,
            AttrValue::Strings(_) => AttrKind::Strings,
            _ => return None,
        })
    }
}

/// One attribute an op accepts, with the ai.onnx opsets in which the op has it (`axes` left
/// the Reduce ops for an input at opset 18; `saturate` joined Cast at 19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrDef {
    pub name: &'static str,
    pub kind: AttrKind,
    pub since: i64,
    /// The last opset with the attribute.
    pub until: i64,
}

impl AttrDef {
    pub const fn new(name: &'static str, kind: AttrKind) -> AttrDef {
        AttrDef {
            name,
            kind,
            since: 1,
            until: i64::MAX,
        }
    }

    pub const fn since(self, opset: i64) -> AttrDef {
        AttrDef {
            since: opset,
            ..self
        }
    }

    pub const fn until(self, opset: i64) -> AttrDef {
        AttrDef {
            until: opset,
            ..self
        }
    }

    pub fn in_opset(&self, opset: i64) -> bool {
        (self.since..=self.until).contains(&opset)
    }
}

/// Short constructors for the attribute tables (`int("axis")`).
pub mod attr {
    use super::{AttrDef, AttrKind};

    pub const fn int(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Int)
    }
    pub const fn float(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Float)
    }
    pub const fn string(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::String)
    }
    pub const fn tensor(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Tensor)
    }
    pub const fn sparse_tensor(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::SparseTensor)
    }
    pub const fn ints(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Ints)
    }
    pub const fn floats(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Floats)
    }
    pub const fn strings(name: &'static str) -> AttrDef {
        AttrDef::new(name, AttrKind::Strings)
    }
}

/// Which inputs of an op must share one element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameType {
    /// No constraint between inputs (one input, or inputs of independent types: Gather's
    /// data and indices, Pow's base and exponent).
    None,
    /// Every input (Concat, Sum, Max: variadic `T`).
    All,
    /// These input positions (Where's X and Y, not its condition).
    Inputs(&'static [usize]),
}

impl SameType {
    pub fn applies(self, input: usize) -> bool {
        match self {
            SameType::None => false,
            SameType::All => true,
            SameType::Inputs(v) => v.contains(&input),
        }
    }
}

/// A new opaque symbol, for sizes that are not monomials of the known symbols.
pub fn fresh_dim(fresh: &Cell<usize>) -> DimExpr {
    let n = fresh.get();
    fresh.set(n + 1);
    DimExpr::sym(&format!("?{n}"))
}

impl InferCx<'_> {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Shape {
            node: self.node.label(),
            msg: msg.into(),
        }
    }

    /// The i-th input, which must be present.
    pub fn input(&self, i: usize) -> Result<&Fact> {
        self.inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| self.err(format!("input {i} is missing")))
    }

    pub fn opt_input(&self, i: usize) -> Option<&Fact> {
        self.inputs.get(i).copied().flatten()
    }

    pub fn fresh(&self) -> DimExpr {
        fresh_dim(self.fresh)
    }

    /// Whether two sizes can be equal; records the assumption when both are symbolic and
    /// differ (a symbol against a known size is taken to be that size, which a runtime checks).
    pub fn unify(&self, a: &DimExpr, b: &DimExpr) -> bool {
        if a == b {
            return true;
        }
        if a.is_symbolic() && b.is_symbolic() {
            self.assumed.borrow_mut().push(Assumed {
                node: self.node.label(),
                a: a.clone(),
                b: b.clone(),
            });
        }
        a.is_symbolic() || b.is_symbolic()
    }

    /// Known integer contents of input i (axes, shapes, starts/ends).
    pub fn input_ints(&self, i: usize) -> Result<Vec<i64>> {
        self.input(i)?.known_ints().ok_or_else(|| {
            self.err(format!(
                "input {i} must be a constant (its values decide the output shape)"
            ))
        })
    }

    /// Normalises a possibly negative axis against `rank`.
    pub fn axis(&self, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if !(0..r).contains(&a) {
            return Err(self.err(format!("axis {axis} is out of range for rank {rank}")));
        }
        Ok(a as usize)
    }

    /// numpy broadcasting of several shapes.
    pub fn broadcast(&self, shapes: &[&[DimExpr]]) -> Result<Vec<DimExpr>> {
        let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
        let one = DimExpr::known(1);
        let mut out = Vec::with_capacity(rank);
        for k in 0..rank {
            let mut dim: Option<DimExpr> = None;
            for s in shapes {
                let Some(d) = (k + s.len()).checked_sub(rank).map(|i| &s[i]) else {
                    continue;
                };
                dim = Some(match dim {
                    None => d.clone(),
                    Some(cur) if cur == *d || *d == one => cur,
                    Some(cur) if cur == one => d.clone(),
                    // A known size against a symbol: the known one (the symbol must equal it).
                    Some(cur) if cur.is_symbolic() && !d.is_symbolic() => d.clone(),
                    Some(cur) if !cur.is_symbolic() && d.is_symbolic() => cur,
                    Some(cur) if cur.is_symbolic() && d.is_symbolic() => {
                        self.unify(&cur, d);
                        cur
                    }
                    Some(cur) => {
                        let all: Vec<String> = shapes.iter().map(|s| dims_str(s)).collect();
                        return Err(self.err(format!(
                            "cannot broadcast {} with {d} (shapes {})",
                            cur,
                            all.join(", ")
                        )));
                    }
                });
            }
            out.push(dim.unwrap_or(one.clone()));
        }
        Ok(out)
    }
}

pub fn dims_str(s: &[DimExpr]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The element type named by an ONNX `to`/`dtype` attribute.
pub fn dtype_attr(cx: &InferCx, name: &str) -> Result<DataType> {
    let code = cx
        .node
        .attr_int(name)
        .ok_or_else(|| cx.err(format!("attribute '{name}' is missing")))?;
    DataType::from_i32(code as i32).ok_or_else(|| cx.err(format!("unknown data type {code}")))
}

fn registry() -> &'static HashMap<(&'static str, &'static str), &'static OpDef> {
    static REG: OnceLock<HashMap<(&'static str, &'static str), &'static OpDef>> = OnceLock::new();
    REG.get_or_init(|| {
        let mut m = HashMap::new();
        for table in [
            elementwise::OPS,
            linalg::OPS,
            reduce::OPS,
            nn::OPS,
            shape_ops::OPS,
        ] {
            for def in table {
                m.insert(("", def.op), def);
            }
        }
        for def in dora::OPS {
            m.insert((BIDORA_DOMAIN, def.op), def);
        }
        m
    })
}

/// Every op the compiler knows, as (domain, definition); the domain is `""` for ai.onnx. For
/// coverage tests (every gradient rule has a finite-difference case).
pub fn all() -> impl Iterator<Item = (&'static str, &'static OpDef)> {
    registry().iter().map(|(&(domain, _), &def)| (domain, def))
}

/// The definition of an op; `ai.onnx` and the empty domain are the same.
pub fn lookup(domain: &str, op: &str) -> Option<&'static OpDef> {
    let domain = if domain == "ai.onnx" { "" } else { domain };
    registry().get(&(domain, op)).copied()
}
