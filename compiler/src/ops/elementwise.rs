//! Elementwise ops: unary maps, broadcasting binary and variadic ops, comparisons, logic,
//! `Where`, `Cast`, and the row-wise `Softmax`/`LogSoftmax` (same shape in, same shape out).
//!
//! Integer contents are propagated through `Add`/`Sub`/`Mul`/`Div`, comparisons, `Where` and
//! `Cast`, since exporters build Reshape/Expand targets with them. Not covered: the
//! quantized and bitwise ops, `Mod` with fmod=1 semantics on contents.

use super::{dtype_attr, InferCx, OpDef};
use crate::error::Result;
use crate::ir::DataType;
use crate::shape::{DimExpr, Fact};

pub const OPS: &[OpDef] = &[
    // Same type and shape as input 0.
    unary("Neg"),
    unary("Sqrt"),
    unary("Reciprocal"),
    unary("Exp"),
    unary("Log"),
    unary("Erf"),
    unary("Tanh"),
    unary("Sigmoid"),
    unary("Relu"),
    unary("Sin"),
    unary("Cos"),
    unary("Abs"),
    unary("Floor"),
    unary("Ceil"),
    unary("Round"),
    unary("Sign"),
    unary("Softplus"),
    unary("LeakyRelu"),
    unary("Elu"),
    unary("Gelu"),
    unary("HardSigmoid"),
    unary("Softmax"),
    unary("LogSoftmax"),
    unary("Identity"),
    unary("Clip"),
    unary("CumSum"),
    unary("Trilu"),
    OpDef {
        op: "Not",
        infer: not,
    },
    OpDef {
        op: "IsNaN",
        infer: to_bool,
    },
    OpDef {
        op: "IsInf",
        infer: to_bool,
    },
    OpDef {
        op: "Dropout",
        infer: dropout,
    },
    OpDef {
        op: "Cast",
        infer: cast,
    },
    OpDef {
        op: "CastLike",
        infer: cast_like,
    },
    // Broadcasting, type of input 0.
    OpDef {
        op: "Add",
        infer: arith,
    },
    OpDef {
        op: "Sub",
        infer: arith,
    },
    OpDef {
        op: "Mul",
        infer: arith,
    },
    OpDef {
        op: "Div",
        infer: arith,
    },
    OpDef {
        op: "Pow",
        infer: arith,
    },
    OpDef {
        op: "Mod",
        infer: arith,
    },
    OpDef {
        op: "Max",
        infer: arith,
    },
    OpDef {
        op: "Min",
        infer: arith,
    },
    OpDef {
        op: "Sum",
        infer: arith,
    },
    OpDef {
        op: "Mean",
        infer: arith,
    },
    // Broadcasting, boolean result.
    OpDef {
        op: "Equal",
        infer: compare,
    },
    OpDef {
        op: "Less",
        infer: compare,
    },
    OpDef {
        op: "Greater",
        infer: compare,
    },
    OpDef {
        op: "LessOrEqual",
        infer: compare,
    },
    OpDef {
        op: "GreaterOrEqual",
        infer: compare,
    },
    OpDef {
        op: "And",
        infer: compare,
    },
    OpDef {
        op: "Or",
        infer: compare,
    },
    OpDef {
        op: "Xor",
        infer: compare,
    },
    OpDef {
        op: "Where",
        infer: where_,
    },
];

const fn unary(op: &'static str) -> OpDef {
    OpDef {
        op,
        infer: same_as_first,
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

fn shapes<'a>(cx: &'a InferCx) -> Result<Vec<&'a [crate::shape::DimExpr]>> {
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
                        "Sub" => x.add(&y.neg()),
                        "Mul" => Some(x.mul(y)),
                        // Integer division floors; exact monomial division is the common case.
                        "Div" => match (x.as_known(), y.as_known()) {
                            (Some(p), Some(q)) if q != 0 => Some(DimExpr::known(p.div_euclid(q))),
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
