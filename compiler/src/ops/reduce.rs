//! Reductions: `ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSumExp/SumSquare` and `ArgMax/ArgMin`.
//! Axes come from the attribute before the opset where they became an input (ReduceSum at 13,
//! the others at 18), and from the constant input after it; `noop_with_empty_axes` is honoured.

use super::attr::{int, ints};
use super::{InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::{DimExpr, Fact};
use crate::ir::DataType;

pub const OPS: &[OpDef] = &[
    OpDef {
        op: "ReduceSum",
        infer: reduce,
        grad: Some(grads::sum),
        attrs: &[
            ints("axes").until(12),
            int("keepdims"),
            int("noop_with_empty_axes").since(13),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceMean",
        infer: reduce,
        grad: Some(grads::mean),
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceMax",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceMin",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceProd",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceL1",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceL2",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceLogSumExp",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ReduceSumSquare",
        infer: reduce,
        grad: None,
        attrs: &[
            ints("axes").until(17),
            int("keepdims"),
            int("noop_with_empty_axes").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "ArgMax",
        infer: arg,
        grad: None,
        attrs: &[int("axis"), int("keepdims"), int("select_last_index")],
        same_type: SameType::None,
    },
    OpDef {
        op: "ArgMin",
        infer: arg,
        grad: None,
        attrs: &[int("axis"), int("keepdims"), int("select_last_index")],
        same_type: SameType::None,
    },
];

/// The opset from which `op` takes its axes as an input.
fn axes_input_since(op: &str) -> i64 {
    if op == "ReduceSum" {
        13
    } else {
        18
    }
}

/// A reduction's axes as written: the constant `axes` input from the opset where axes became
/// an input (read with `input`), else the `axes` attribute; empty when absent. Shared by the
/// shape rule and the gradient rule so both read the same axes.
fn declared_axes(
    node: &crate::ir::Node,
    opset: i64,
    input: impl FnOnce(&str) -> Result<Vec<i64>>,
) -> Result<Vec<i64>> {
    if opset >= axes_input_since(&node.op_type) {
        match node.input(1) {
            Some(a) => input(a),
            None => Ok(vec![]),
        }
    } else {
        Ok(node
            .attr_ints("axes")
            .map(<[i64]>::to_vec)
            .unwrap_or_default())
    }
}

fn reduce(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let rank = x.rank();
    let keep = cx.node.attr_int("keepdims").unwrap_or(1) != 0;
    let node = cx.node;
    let axes = declared_axes(node, cx.opset, |_| cx.input_ints(1))?;
    if axes.is_empty() && cx.node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 {
        return Ok(vec![Fact::new(x.dtype, x.shape.clone())]);
    }
    let axes: Vec<usize> = if axes.is_empty() {
        (0..rank).collect()
    } else {
        axes.iter()
            .map(|&a| cx.axis(a, rank))
            .collect::<Result<_>>()?
    };
    let mut out = vec![];
    for (i, d) in x.shape.iter().enumerate() {
        if !axes.contains(&i) {
            out.push(d.clone());
        } else if keep {
            out.push(DimExpr::known(1));
        }
    }
    Ok(vec![Fact::new(x.dtype, out)])
}

fn arg(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(0), x.rank())?;
    let keep = cx.node.attr_int("keepdims").unwrap_or(1) != 0;
    let mut out = x.shape.clone();
    if keep {
        out[axis] = DimExpr::known(1);
    } else {
        out.remove(axis);
    }
    Ok(vec![Fact::new(DataType::Int64, out)])
}

#[cfg(test)]
mod tests {
    use crate::ir::{AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo, ValueType};
    use crate::shape::infer_graph;

    #[test]
    fn reduce_sum_axes_input_and_keepdims() {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo::new(
            "x",
            ValueType::tensor(
                DataType::Float,
                vec![Dim::Sym("b".into()), Dim::Known(3), Dim::Known(5)],
            ),
        ));
        g.initializers
            .insert("ax".into(), Tensor::from_i64("ax", vec![1], &[-1]));
        g.nodes.push(Node::new(
            "ReduceSum",
            "keep",
            vec!["x".into(), "ax".into()],
            vec!["k".into()],
        ));
        g.nodes.push(
            Node::new(
                "ReduceSum",
                "drop",
                vec!["x".into(), "ax".into()],
                vec!["d".into()],
            )
            .with_attr("keepdims", AttrValue::Int(0)),
        );
        g.nodes.push(
            Node::new("ReduceMean", "mean17", vec!["x".into()], vec!["m".into()])
                .with_attr("axes", AttrValue::Ints(vec![0])),
        );
        let f = infer_graph(&g, 17).unwrap();
        assert_eq!(f.get("k").unwrap().display(), "f32[b, 3, 1]");
        assert_eq!(f.get("d").unwrap().display(), "f32[b, 3]");
        assert_eq!(f.get("m").unwrap().display(), "f32[1, 3, 5]");
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient rules: the output gradient is put back into the reduced axes (Unsqueeze when
// keepdims=0) and expanded to the input's runtime shape; ReduceMean divides by the count.

pub(crate) mod grads {
    use crate::error::Result;
    use crate::ir::AttrValue;
    use crate::ops::GradCx;

    type Out = Result<Vec<Option<String>>>;

    fn spread(cx: &mut GradCx) -> Result<String> {
        let (g, x) = (cx.gy(0)?, cx.x(0));
        let rank = cx.fact(&x)?.rank() as i64;
        let keep = cx.node.attr_int("keepdims").unwrap_or(1) != 0;
        let node = cx.node;
        let axes = super::declared_axes(node, cx.opset, |a| {
            cx.fact(a)?
                .known_ints()
                .ok_or_else(|| cx.err("axes must be constant"))
        })?;
        let axes: Vec<i64> = if axes.is_empty() {
            (0..rank).collect()
        } else {
            axes.iter()
                .map(|&a| if a < 0 { a + rank } else { a })
                .collect()
        };
        let kept = if keep {
            g
        } else {
            let ax = cx.b.ints("axes", &axes);
            cx.op("Unsqueeze", "kept", &[&g, &ax])
        };
        let shape = cx.op("Shape", "x_shape", &[&x]);
        Ok(cx.op("Expand", "spread", &[&kept, &shape]))
    }

    pub fn sum(cx: &mut GradCx) -> Out {
        Ok(vec![Some(spread(cx)?), None])
    }

    pub fn mean(cx: &mut GradCx) -> Out {
        let s = spread(cx)?;
        let (x, y) = (cx.x(0), cx.y(0));
        let dtype = cx.fact(&x)?.dtype as i64;
        let nx = cx.op("Size", "n_in", &[&x]);
        let ny = cx.op("Size", "n_out", &[&y]);
        let fx = cx.op_attrs(
            "Cast",
            "n_in.f",
            &[&nx],
            vec![("to", AttrValue::Int(dtype))],
        );
        let fy = cx.op_attrs(
            "Cast",
            "n_out.f",
            &[&ny],
            vec![("to", AttrValue::Int(dtype))],
        );
        let count = cx.op("Div", "count", &[&fx, &fy]);
        Ok(vec![Some(cx.op("Div", "dx", &[&s, &count])), None])
    }
}
