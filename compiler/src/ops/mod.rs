//! Op knowledge, one file per op family. Each family lists its ops in a table of [`OpDef`]s;
//! an `OpDef` holds everything the compiler knows about one op: today its shape rule, with
//! autodiff its gradient rule. [`lookup`] is the single entry point.
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
pub mod linalg;
pub mod nn;
pub mod reduce;
pub mod shape_ops;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::OnceLock;

use crate::autodiff::GradCx;
use crate::error::{Error, Result};
use crate::ir::{DataType, Node, BIDORA_DOMAIN};
use crate::shape::{DimExpr, Fact};

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

/// The definition of an op; `ai.onnx` and the empty domain are the same.
pub fn lookup(domain: &str, op: &str) -> Option<&'static OpDef> {
    let domain = if domain == "ai.onnx" { "" } else { domain };
    registry().get(&(domain, op)).copied()
}
