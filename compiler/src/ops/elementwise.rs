//! Elementwise ops: unary maps, broadcasting binary and variadic ops, comparisons, logic,
//! `Where`, `Cast`, and the row-wise `Softmax`/`LogSoftmax` (same shape in, same shape out).
//!
//! Integer contents are propagated through `Add`/`Sub`/`Mul`/`Div`, comparisons, `Where` and
//! `Cast`, since exporters build Reshape/Expand targets with them. Not covered: the
//! quantized and bitwise ops, `Mod` with fmod=1 semantics on contents.

use super::attr::{float, int, string};
use super::{dtype_attr, AttrDef, InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::{DimExpr, Fact};
use crate::ir::DataType;

pub const OPS: &[OpDef] = &[
    // Same type and shape as input 0.
    unary_g("Neg", grads::neg, &[]),
    unary_g("Sqrt", grads::sqrt, &[]),
    unary_g("Reciprocal", grads::reciprocal, &[]),
    unary_g("Exp", grads::exp, &[]),
    unary_g("Log", grads::log, &[]),
    unary_g("Erf", grads::erf, &[]),
    unary_g("Tanh", grads::tanh, &[]),
    unary_g("Sigmoid", grads::sigmoid, &[]),
    unary_g("Relu", grads::relu, &[]),
    unary_g("Sin", grads::sin, &[]),
    unary_g("Cos", grads::cos, &[]),
    unary("Abs", &[]),
    unary("Floor", &[]),
    unary("Ceil", &[]),
    unary("Round", &[]),
    unary("Sign", &[]),
    unary("Softplus", &[]),
    unary("LeakyRelu", &[float("alpha")]),
    unary("Elu", &[float("alpha")]),
    unary("Gelu", &[string("approximate")]),
    unary("HardSigmoid", &[float("alpha"), float("beta")]),
    unary_g("Softmax", grads::softmax, &[int("axis")]),
    unary_g("LogSoftmax", grads::log_softmax, &[int("axis")]),
    unary_g("Identity", grads::identity, &[]),
    // Clip's min and max (inputs since opset 11) have the input's type.
    OpDef {
        op: "Clip",
        infer: same_as_first,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    unary("CumSum", &[int("exclusive"), int("reverse")]),
    unary("Trilu", &[int("upper")]),
    OpDef {
        op: "Not",
        infer: not,
        grad: None,
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "IsNaN",
        infer: to_bool,
        grad: None,
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "IsInf",
        infer: to_bool,
        grad: None,
        attrs: &[int("detect_negative"), int("detect_positive")],
        same_type: SameType::None,
    },
    OpDef {
        op: "Dropout",
        infer: dropout,
        grad: None,
        attrs: &[int("seed")],
        same_type: SameType::None,
    },
    OpDef {
        op: "Cast",
        infer: cast,
        grad: Some(grads::cast),
        attrs: &[int("to"), int("saturate").since(19)],
        same_type: SameType::None,
    },
    OpDef {
        op: "CastLike",
        infer: cast_like,
        grad: None,
        attrs: &[int("saturate").since(19)],
        same_type: SameType::None,
    },
    // Broadcasting, type of input 0.
    OpDef {
        op: "Add",
        infer: arith,
        grad: Some(grads::add),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Sub",
        infer: arith,
        grad: Some(grads::sub),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Mul",
        infer: arith,
        grad: Some(grads::mul),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Div",
        infer: arith,
        grad: Some(grads::div),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Pow",
        infer: arith,
        grad: Some(grads::pow),
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "Mod",
        infer: arith,
        grad: None,
        attrs: &[int("fmod")],
        same_type: SameType::All,
    },
    OpDef {
        op: "Max",
        infer: arith,
        grad: Some(grads::max_min),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Min",
        infer: arith,
        grad: Some(grads::max_min),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Sum",
        infer: arith,
        grad: Some(grads::sum),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Mean",
        infer: arith,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    // Broadcasting, boolean result.
    OpDef {
        op: "Equal",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Less",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Greater",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "LessOrEqual",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "GreaterOrEqual",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "And",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Or",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Xor",
        infer: compare,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Where",
        infer: where_,
        grad: Some(grads::where_),
        attrs: &[],
        same_type: SameType::Inputs(&[1, 2]),
    },
];

const fn unary_g(op: &'static str, grad: super::GradFn, attrs: &'static [AttrDef]) -> OpDef {
    OpDef {
        op,
        infer: same_as_first,
        grad: Some(grad),
        attrs,
        same_type: SameType::None,
    }
}

const fn unary(op: &'static str, attrs: &'static [AttrDef]) -> OpDef {
    OpDef {
        op,
        infer: same_as_first,
        grad: None,
        attrs,
        same_type: SameType::None,
    }
}

fn same_as_first(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let mut f = Fact::new(x.dtype, x.shape.clone());
    if cx.node.op_type == "Identity" {
        f.value = x.value.clone();
    }
    Ok(vec![f])
}

fn not(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let mut f = Fact::new(DataType::Bool, x.shape.clone());
    f.value = x
        .known_ints()
        .map(|v| v.iter().map(|&b| DimExpr::known((b == 0) as i64)).collect());
    Ok(vec![f])
}

fn to_bool(cx: &mut InferCx) -> Result<Vec<Fact>> {
    Ok(vec![Fact::new(DataType::Bool, cx.input(0)?.shape.clone())])
}

fn dropout(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    Ok(vec![
        Fact::new(x.dtype, x.shape.clone()),
        Fact::new(DataType::Bool, x.shape.clone()),
    ])
}

fn cast(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let to = dtype_attr(cx, "to")?;
    let x = cx.input(0)?;
    let mut f = Fact::new(to, x.shape.clone());
    if to.is_integer() {
        f.value = x.value.clone();
    } else if to == DataType::Bool {
        f.value = x
            .known_ints()
            .map(|v| v.iter().map(|&b| DimExpr::known((b != 0) as i64)).collect());
    }
    Ok(vec![f])
}

fn cast_like(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let like = cx.input(1)?;
    let mut f = Fact::new(like.dtype, x.shape.clone());
    if like.dtype.is_integer() {
        f.value = x.value.clone();
    }
    Ok(vec![f])
}

fn shapes<'a>(cx: &'a InferCx) -> Result<Vec<&'a [crate::fact::DimExpr]>> {
    (0..cx.inputs.len())
        .map(|i| cx.input(i).map(|f| f.shape.as_slice()))
        .collect()
}

/// Pairs up the contents of two inputs under broadcasting (equal lengths, or one scalar).
fn zip_values<'a>(a: &'a Fact, b: &'a Fact) -> Option<Vec<(&'a DimExpr, &'a DimExpr)>> {
    let (va, vb) = (a.value.as_ref()?, b.value.as_ref()?);
    match (va.len(), vb.len()) {
        (n, m) if n == m => Some(va.iter().zip(vb).collect()),
        (1, _) => Some(vb.iter().map(|y| (&va[0], y)).collect()),
        (_, 1) => Some(va.iter().map(|x| (x, &vb[0])).collect()),
        _ => None,
    }
}

fn arith(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let shape = cx.broadcast(&shapes(cx)?)?;
    let a = cx.input(0)?;
    let mut f = Fact::new(a.dtype, shape);
    if a.dtype.is_integer() && cx.inputs.len() == 2 {
        let b = cx.input(1)?;
        if let Some(pairs) = zip_values(a, b) {
            let op = cx.node.op_type.as_str();
            let vals: Vec<DimExpr> = pairs
                .into_iter()
                .map(|(x, y)| {
                    let r = match op {
                        "Add" => x.add(y),
                        "Sub" => x.sub(y),
                        "Mul" => Some(x.mul(y)),
                        // Integer Div truncates toward zero (ONNX Runtime, the reference);
                        // exact monomial division is the common case.
                        "Div" => match (x.as_known(), y.as_known()) {
                            (Some(p), Some(q)) => p.checked_div(q).map(DimExpr::known),
                            _ => x.div(y),
                        },
                        "Max" | "Min" => match (x.as_known(), y.as_known()) {
                            (Some(p), Some(q)) => Some(DimExpr::known(if op == "Max" {
                                p.max(q)
                            } else {
                                p.min(q)
                            })),
                            _ => None,
                        },
                        _ => None,
                    };
                    r.unwrap_or_else(|| cx.fresh())
                })
                .collect();
            f.value = Some(vals);
        }
    }
    Ok(vec![f])
}

fn compare(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let shape = cx.broadcast(&shapes(cx)?)?;
    let mut f = Fact::new(DataType::Bool, shape);
    if cx.inputs.len() == 2 {
        let (a, b) = (cx.input(0)?, cx.input(1)?);
        if let Some(pairs) = zip_values(a, b) {
            let op = cx.node.op_type.as_str();
            let vals: Option<Vec<DimExpr>> = pairs
                .into_iter()
                .map(|(x, y)| {
                    let r = match (op, x.as_known(), y.as_known()) {
                        // Equal symbols are equal even when unknown; a symbol never equals -1.
                        ("Equal", _, _) if x == y => true,
                        ("Equal", Some(p), Some(q)) => p == q,
                        ("Equal", None, Some(q)) | ("Equal", Some(q), None) if q < 0 => false,
                        ("Less", Some(p), Some(q)) => p < q,
                        ("Greater", Some(p), Some(q)) => p > q,
                        ("LessOrEqual", Some(p), Some(q)) => p <= q,
                        ("GreaterOrEqual", Some(p), Some(q)) => p >= q,
                        ("And", Some(p), Some(q)) => p != 0 && q != 0,
                        ("Or", Some(p), Some(q)) => p != 0 || q != 0,
                        ("Xor", Some(p), Some(q)) => (p != 0) != (q != 0),
                        _ => return None,
                    };
                    Some(DimExpr::known(r as i64))
                })
                .collect();
            f.value = vals;
        }
    }
    Ok(vec![f])
}

fn where_(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let shape = cx.broadcast(&shapes(cx)?)?;
    let (c, x, y) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
    let mut f = Fact::new(x.dtype, shape);
    if let (Some(cv), Some(xv), Some(yv)) = (c.known_ints(), x.value.as_ref(), y.value.as_ref()) {
        let n = cv.len().max(xv.len()).max(yv.len());
        let pick = |v: &[DimExpr], i: usize| v.get(if v.len() == 1 { 0 } else { i }).cloned();
        if [cv.len(), xv.len(), yv.len()]
            .iter()
            .all(|&l| l == 1 || l == n)
        {
            f.value = (0..n)
                .map(|i| {
                    let take_x = cv[if cv.len() == 1 { 0 } else { i }] != 0;
                    if take_x {
                        pick(xv, i)
                    } else {
                        pick(yv, i)
                    }
                })
                .collect();
        }
    }
    Ok(vec![f])
}

#[cfg(test)]
mod tests {
    use crate::ir::{Dim, Graph, Node, Tensor, ValueInfo, ValueType};
    use crate::shape::infer_graph;

    use super::*;

    fn input(name: &str, dims: Vec<Dim>) -> ValueInfo {
        ValueInfo::new(name, ValueType::tensor(DataType::Float, dims))
    }

    #[test]
    fn broadcasting_with_a_symbolic_batch() {
        let mut g = Graph::default();
        g.inputs.push(input(
            "x",
            vec![Dim::Sym("batch".into()), Dim::Known(1), Dim::Known(8)],
        ));
        g.inputs
            .push(input("y", vec![Dim::Known(4), Dim::Known(1)]));
        g.initializers
            .insert("c".into(), Tensor::from_f32("c", vec![], &[2.0]));
        g.nodes.push(Node::new(
            "Add",
            "add",
            vec!["x".into(), "y".into()],
            vec!["z".into()],
        ));
        g.nodes.push(Node::new(
            "Mul",
            "mul",
            vec!["z".into(), "c".into()],
            vec!["w".into()],
        ));
        g.nodes.push(Node::new(
            "Less",
            "lt",
            vec!["w".into(), "c".into()],
            vec!["b".into()],
        ));
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("z").unwrap().display(), "f32[batch, 4, 8]");
        assert_eq!(f.get("w").unwrap().display(), "f32[batch, 4, 8]");
        assert_eq!(f.get("b").unwrap().display(), "bool[batch, 4, 8]");
    }

    #[test]
    fn incompatible_broadcast_names_the_node() {
        let mut g = Graph::default();
        g.inputs.push(input("x", vec![Dim::Known(3)]));
        g.inputs.push(input("y", vec![Dim::Known(4)]));
        g.nodes.push(Node::new(
            "Add",
            "bad_add",
            vec!["x".into(), "y".into()],
            vec!["z".into()],
        ));
        let e = infer_graph(&g, 18).unwrap_err().to_string();
        assert!(e.contains("bad_add") && e.contains("broadcast"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient rules. `g` is the output gradient, `y` the output; broadcasting is undone by
// `GradCx::unbroadcast`. Each rule emits only standard, differentiable ONNX ops.

pub(crate) mod grads {
    use crate::error::Result;
    use crate::ir::AttrValue;
    use crate::ops::GradCx;

    type Out = Result<Vec<Option<String>>>;

    /// `f(g, x, y)` for a unary op whose input gradient is a pointwise expression.
    fn unary(
        cx: &mut GradCx,
        f: impl FnOnce(&mut GradCx, &str, &str, &str) -> Result<String>,
    ) -> Out {
        let (g, x, y) = (cx.gy(0)?, cx.x(0), cx.y(0));
        Ok(vec![Some(f(cx, &g, &x, &y)?)])
    }

    pub fn identity(cx: &mut GradCx) -> Out {
        Ok(vec![Some(cx.gy(0)?)])
    }

    pub fn neg(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, _| Ok(cx.op("Neg", "dx", &[g])))
    }

    /// d sqrt(x) = g / (2 y)
    pub fn sqrt(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, y| {
            let half = cx.scalar(0.5, y)?;
            let hg = cx.op("Mul", "half_g", &[g, &half]);
            Ok(cx.op("Div", "dx", &[&hg, y]))
        })
    }

    /// d exp(x) = g · y
    pub fn exp(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, y| Ok(cx.op("Mul", "dx", &[g, y])))
    }

    /// d log(x) = g / x
    pub fn log(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, x, _| Ok(cx.op("Div", "dx", &[g, x])))
    }

    /// d (1/x) = -g · y²
    pub fn reciprocal(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, y| {
            let y2 = cx.op("Mul", "y2", &[y, y]);
            let gy2 = cx.op("Mul", "g_y2", &[g, &y2]);
            Ok(cx.op("Neg", "dx", &[&gy2]))
        })
    }

    /// d tanh(x) = g · (1 - y²)
    pub fn tanh(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, y| {
            let one = cx.scalar(1.0, y)?;
            let y2 = cx.op("Mul", "y2", &[y, y]);
            let d = cx.op("Sub", "one_minus_y2", &[&one, &y2]);
            Ok(cx.op("Mul", "dx", &[g, &d]))
        })
    }

    /// d sigmoid(x) = g · y · (1 - y)
    pub fn sigmoid(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, _, y| {
            let one = cx.scalar(1.0, y)?;
            let om = cx.op("Sub", "one_minus_y", &[&one, y]);
            let d = cx.op("Mul", "dsig", &[y, &om]);
            Ok(cx.op("Mul", "dx", &[g, &d]))
        })
    }

    /// d relu(x) = g where x > 0, else 0
    pub fn relu(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, x, _| {
            let zero = cx.scalar(0.0, x)?;
            let pos = cx.op("Greater", "pos", &[x, &zero]);
            Ok(cx.op("Where", "dx", &[&pos, g, &zero]))
        })
    }

    /// d erf(x) = g · 2/√π · exp(-x²)
    pub fn erf(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, x, _| {
            let k = cx.scalar(std::f64::consts::FRAC_2_SQRT_PI, x)?;
            let x2 = cx.op("Mul", "x2", &[x, x]);
            let nx2 = cx.op("Neg", "neg_x2", &[&x2]);
            let e = cx.op("Exp", "exp", &[&nx2]);
            let ke = cx.op("Mul", "derf", &[&e, &k]);
            Ok(cx.op("Mul", "dx", &[g, &ke]))
        })
    }

    pub fn sin(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, x, _| {
            let c = cx.op("Cos", "cos", &[x]);
            Ok(cx.op("Mul", "dx", &[g, &c]))
        })
    }

    pub fn cos(cx: &mut GradCx) -> Out {
        unary(cx, |cx, g, x, _| {
            let s = cx.op("Sin", "sin", &[x]);
            let gs = cx.op("Mul", "g_sin", &[g, &s]);
            Ok(cx.op("Neg", "dx", &[&gs]))
        })
    }

    /// Softmax along `axis`: dx = y ⊙ (g - Σ_axis g ⊙ y)
    pub fn softmax(cx: &mut GradCx) -> Out {
        let (g, y) = (cx.gy(0)?, cx.y(0));
        let axis = cx.node.attr_int("axis").unwrap_or(-1);
        let ax = cx.b.ints("axis", &[axis]);
        let gy = cx.op("Mul", "g_y", &[&g, &y]);
        let s = cx.op_attrs(
            "ReduceSum",
            "sum_gy",
            &[&gy, &ax],
            vec![("keepdims", AttrValue::Int(1))],
        );
        let d = cx.op("Sub", "g_minus", &[&g, &s]);
        Ok(vec![Some(cx.op("Mul", "dx", &[&y, &d]))])
    }

    /// LogSoftmax along `axis`: dx = g - exp(y) ⊙ Σ_axis g
    pub fn log_softmax(cx: &mut GradCx) -> Out {
        let (g, y) = (cx.gy(0)?, cx.y(0));
        let axis = cx.node.attr_int("axis").unwrap_or(-1);
        let ax = cx.b.ints("axis", &[axis]);
        let s = cx.op_attrs(
            "ReduceSum",
            "sum_g",
            &[&g, &ax],
            vec![("keepdims", AttrValue::Int(1))],
        );
        let p = cx.op("Exp", "p", &[&y]);
        let ps = cx.op("Mul", "p_sum", &[&p, &s]);
        Ok(vec![Some(cx.op("Sub", "dx", &[&g, &ps]))])
    }

    /// Cast between float types: cast the gradient back.
    pub fn cast(cx: &mut GradCx) -> Out {
        let g = cx.gy(0)?;
        let to = cx.fact(&cx.x(0))?.dtype;
        Ok(vec![Some(cx.op_attrs(
            "Cast",
            "dx",
            &[&g],
            vec![("to", AttrValue::Int(to as i64))],
        ))])
    }

    pub fn add(cx: &mut GradCx) -> Out {
        let g = cx.gy(0)?;
        let a = cx.grad_for(0, |cx| cx.unbroadcast(&g, 0))?;
        let b = cx.grad_for(1, |cx| cx.unbroadcast(&g, 1))?;
        Ok(vec![a, b])
    }

    /// Sum of any number of inputs: each gets the gradient, unbroadcast to its shape.
    pub fn sum(cx: &mut GradCx) -> Out {
        let g = cx.gy(0)?;
        (0..cx.node.inputs.len())
            .map(|i| cx.grad_for(i, |cx| cx.unbroadcast(&g, i)))
            .collect()
    }

    pub fn sub(cx: &mut GradCx) -> Out {
        let g = cx.gy(0)?;
        let a = cx.grad_for(0, |cx| cx.unbroadcast(&g, 0))?;
        let b = cx.grad_for(1, |cx| {
            let ng = cx.op("Neg", "neg_g", &[&g]);
            cx.unbroadcast(&ng, 1)
        })?;
        Ok(vec![a, b])
    }

    pub fn mul(cx: &mut GradCx) -> Out {
        let (g, a, b) = (cx.gy(0)?, cx.x(0), cx.x(1));
        let da = cx.grad_for(0, |cx| {
            let t = cx.op("Mul", "g_b", &[&g, &b]);
            cx.unbroadcast(&t, 0)
        })?;
        let db = cx.grad_for(1, |cx| {
            let t = cx.op("Mul", "g_a", &[&g, &a]);
            cx.unbroadcast(&t, 1)
        })?;
        Ok(vec![da, db])
    }

    /// y = a / b: da = g / b, db = -g · y / b
    pub fn div(cx: &mut GradCx) -> Out {
        let (g, b, y) = (cx.gy(0)?, cx.x(1), cx.y(0));
        let da = cx.grad_for(0, |cx| {
            let t = cx.op("Div", "g_over_b", &[&g, &b]);
            cx.unbroadcast(&t, 0)
        })?;
        let db = cx.grad_for(1, |cx| {
            let gy = cx.op("Mul", "g_y", &[&g, &y]);
            let q = cx.op("Div", "g_y_over_b", &[&gy, &b]);
            let n = cx.op("Neg", "neg", &[&q]);
            cx.unbroadcast(&n, 1)
        })?;
        Ok(vec![da, db])
    }

    /// y = a^p: da = g · p · a^(p-1); dp = g · y · ln a
    pub fn pow(cx: &mut GradCx) -> Out {
        let (g, a, p, y) = (cx.gy(0)?, cx.x(0), cx.x(1), cx.y(0));
        let da = cx.grad_for(0, |cx| {
            let p_a = {
                let pf = if cx.fact(&p)?.dtype != cx.fact(&a)?.dtype {
                    let to = cx.fact(&a)?.dtype as i64;
                    cx.op_attrs("Cast", "p", &[&p], vec![("to", AttrValue::Int(to))])
                } else {
                    p.clone()
                };
                let one = cx.scalar(1.0, &a)?;
                let pm1 = cx.op("Sub", "p_minus_1", &[&pf, &one]);
                let apm1 = cx.op("Pow", "a_pow", &[&a, &pm1]);
                cx.op("Mul", "p_a_pow", &[&pf, &apm1])
            };
            let t = cx.op("Mul", "da", &[&g, &p_a]);
            cx.unbroadcast(&t, 0)
        })?;
        let dp = cx.grad_for(1, |cx| {
            let la = cx.op("Log", "log_a", &[&a]);
            let gy = cx.op("Mul", "g_y", &[&g, &y]);
            let t = cx.op("Mul", "dp", &[&gy, &la]);
            cx.unbroadcast(&t, 1)
        })?;
        Ok(vec![da, dp])
    }

    /// Max/Min of two inputs: the gradient goes to the selected input (ties to the first).
    pub fn max_min(cx: &mut GradCx) -> Out {
        if cx.node.inputs.len() != 2 {
            return Err(cx.err("gradient only for two inputs"));
        }
        let (g, a, b) = (cx.gy(0)?, cx.x(0), cx.x(1));
        let cmp = if cx.node.op_type == "Max" {
            "GreaterOrEqual"
        } else {
            "LessOrEqual"
        };
        let pick_a = cx.op(cmp, "pick_a", &[&a, &b]);
        let zero = cx.scalar(0.0, &a)?;
        let ga = cx.op("Where", "g_a", &[&pick_a, &g, &zero]);
        let gb = cx.op("Where", "g_b", &[&pick_a, &zero, &g]);
        let da = cx.grad_for(0, |cx| cx.unbroadcast(&ga, 0))?;
        let db = cx.grad_for(1, |cx| cx.unbroadcast(&gb, 1))?;
        Ok(vec![da, db])
    }

    /// Where(c, a, b): the gradient flows to the chosen branch.
    pub fn where_(cx: &mut GradCx) -> Out {
        let (g, c) = (cx.gy(0)?, cx.x(0));
        let zero = cx.scalar(0.0, &cx.y(0))?;
        let da = cx.grad_for(1, |cx| {
            let t = cx.op("Where", "g_a", &[&c, &g, &zero]);
            cx.unbroadcast(&t, 1)
        })?;
        let db = cx.grad_for(2, |cx| {
            let t = cx.op("Where", "g_b", &[&c, &zero, &g]);
            cx.unbroadcast(&t, 2)
        })?;
        Ok(vec![None, da, db])
    }
}
