//! Matrix products: `MatMul` (numpy semantics: 1-D operands promoted and dropped, batch dims
//! broadcast) and `Gemm` (2-D, `transA`/`transB`, optional broadcast C).

use super::attr::{float, int};
use super::{dims_str, InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::Fact;

pub const OPS: &[OpDef] = &[
    OpDef {
        op: "MatMul",
        infer: matmul,
        grad: Some(grads::matmul),
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "Gemm",
        infer: gemm,
        grad: Some(grads::gemm),
        attrs: &[float("alpha"), float("beta"), int("transA"), int("transB")],
        same_type: SameType::All,
    },
];

fn matmul(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    if a.rank() == 0 || b.rank() == 0 {
        return Err(cx.err("MatMul operands must have rank at least 1"));
    }
    let mut sa = a.shape.clone();
    let mut sb = b.shape.clone();
    let a_vec = sa.len() == 1;
    let b_vec = sb.len() == 1;
    if a_vec {
        sa.insert(0, crate::fact::DimExpr::known(1));
    }
    if b_vec {
        sb.push(crate::fact::DimExpr::known(1));
    }
    let (m, ka) = (&sa[sa.len() - 2], &sa[sa.len() - 1]);
    let (kb, n) = (&sb[sb.len() - 2], &sb[sb.len() - 1]);
    if !cx.unify(ka, kb) {
        return Err(cx.err(format!(
            "inner dimensions differ: {} × {}",
            dims_str(&a.shape),
            dims_str(&b.shape)
        )));
    }
    let mut out = cx.broadcast(&[&sa[..sa.len() - 2], &sb[..sb.len() - 2]])?;
    if !a_vec {
        out.push(m.clone());
    }
    if !b_vec {
        out.push(n.clone());
    }
    Ok(vec![Fact::new(a.dtype, out)])
}

fn gemm(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    if a.rank() != 2 || b.rank() != 2 {
        return Err(cx.err(format!(
            "Gemm needs 2-D operands, got {} and {}",
            dims_str(&a.shape),
            dims_str(&b.shape)
        )));
    }
    let ta = cx.node.attr_int("transA").unwrap_or(0) != 0;
    let tb = cx.node.attr_int("transB").unwrap_or(0) != 0;
    let (m, ka) = if ta {
        (&a.shape[1], &a.shape[0])
    } else {
        (&a.shape[0], &a.shape[1])
    };
    let (kb, n) = if tb {
        (&b.shape[1], &b.shape[0])
    } else {
        (&b.shape[0], &b.shape[1])
    };
    if !cx.unify(ka, kb) {
        return Err(cx.err(format!("inner dimensions differ: {ka} vs {kb}")));
    }
    let out = vec![m.clone(), n.clone()];
    if let Some(c) = cx.opt_input(2) {
        cx.broadcast(&[&out, &c.shape])?;
    }
    Ok(vec![Fact::new(a.dtype, out)])
}

#[cfg(test)]
mod tests {
    use crate::ir::{AttrValue, DataType, Dim, Graph, Node, ValueInfo, ValueType};
    use crate::shape::infer_graph;

    fn input(name: &str, dims: Vec<Dim>) -> ValueInfo {
        ValueInfo::new(name, ValueType::tensor(DataType::Float, dims))
    }

    #[test]
    fn matmul_batches_and_gemm_trans_b() {
        let mut g = Graph::default();
        let b = Dim::Sym("batch".into());
        g.inputs.push(input(
            "x",
            vec![b.clone(), Dim::Sym("seq".into()), Dim::Known(64)],
        ));
        g.inputs
            .push(input("w", vec![Dim::Known(64), Dim::Known(32)]));
        g.inputs.push(input("x2", vec![b, Dim::Known(64)]));
        g.inputs
            .push(input("wt", vec![Dim::Known(16), Dim::Known(64)]));
        g.nodes.push(Node::new(
            "MatMul",
            "mm",
            vec!["x".into(), "w".into()],
            vec!["y".into()],
        ));
        g.nodes.push(
            Node::new(
                "Gemm",
                "gemm",
                vec!["x2".into(), "wt".into()],
                vec!["z".into()],
            )
            .with_attr("transB", AttrValue::Int(1)),
        );
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("y").unwrap().display(), "f32[batch, seq, 32]");
        assert_eq!(f.get("z").unwrap().display(), "f32[batch, 16]");
    }

    #[test]
    fn wrong_inner_dimension_names_the_node() {
        let mut g = Graph::default();
        g.inputs
            .push(input("x", vec![Dim::Known(2), Dim::Known(5)]));
        g.inputs
            .push(input("w", vec![Dim::Known(4), Dim::Known(3)]));
        g.nodes.push(Node::new(
            "MatMul",
            "/enc/q/MatMul",
            vec!["x".into(), "w".into()],
            vec!["y".into()],
        ));
        let e = infer_graph(&g, 18).unwrap_err().to_string();
        assert!(
            e.contains("/enc/q/MatMul") && e.contains("inner dimensions"),
            "{e}"
        );
    }

    #[test]
    fn wrong_ranks_name_the_node() {
        let mut g = Graph::default();
        g.inputs.push(input("s", vec![]));
        g.inputs.push(input(
            "x3",
            vec![Dim::Known(2), Dim::Known(3), Dim::Known(4)],
        ));
        g.inputs
            .push(input("w", vec![Dim::Known(4), Dim::Known(5)]));
        let cases = [
            ("MatMul", "/enc/k/MatMul", "s"),
            ("Gemm", "/pool/Gemm", "x3"),
        ];
        for (op, name, a) in cases {
            let mut g = g.clone();
            g.nodes.push(Node::new(
                op,
                name,
                vec![a.into(), "w".into()],
                vec!["y".into()],
            ));
            let e = infer_graph(&g, 18).unwrap_err().to_string();
            assert!(
                e.contains(name) && (e.contains("rank") || e.contains("2-D")),
                "{e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient rules.

pub(crate) mod grads {
    use crate::error::Result;
    use crate::ir::AttrValue;
    use crate::ops::GradCx;

    type Out = Result<Vec<Option<String>>>;

    /// y = a·b (numpy semantics, rank ≥ 2 for both, or a weight b of rank 2).
    /// da = g·bᵀ (reduced over broadcast batch dims); db = aᵀ·g summed over a's batch dims.
    pub fn matmul(cx: &mut GradCx) -> Out {
        let (g, a, b) = (cx.gy(0)?, cx.x(0), cx.x(1));
        let (ra, rb) = (cx.fact(&a)?.rank(), cx.fact(&b)?.rank());
        if ra < 2 || rb < 2 {
            return Err(cx.err("gradient of MatMul with a 1-D operand is not supported"));
        }
        // With a rank-2 b (a weight, in every model we see), the batch dims of a are folded into
        // rows, so both products are plain Gemms: da = g2·bᵀ with transB (no Transpose of the
        // weight, which runtimes would fold into a second, transposed copy of every frozen
        // weight), db = a2ᵀ·g2 with transA (one product, no per-batch products to sum).
        let g2 = (rb == 2).then(|| fold_rows(cx, &g, ra, "g"));
        let da = if !cx.needs(0) {
            None
        } else if let Some(g2) = &g2 {
            let t = cx.op_attrs("Gemm", "da", &[g2, &b], vec![("transB", AttrValue::Int(1))]);
            Some(if ra == 2 {
                t
            } else {
                let a_shape = cx.op("Shape", "a_shape", &[&a]);
                cx.op("Reshape", "da_full", &[&t, &a_shape])
            })
        } else {
            let bt = cx.swap_last_two(&b, rb);
            let t = cx.op("MatMul", "da", &[&g, &bt]);
            Some(cx.unbroadcast(&t, 0)?)
        };
        let db = if !cx.needs(1) {
            None
        } else if let Some(g2) = &g2 {
            let a2 = fold_rows(cx, &a, ra, "a");
            Some(cx.op_attrs(
                "Gemm",
                "db",
                &[&a2, g2],
                vec![("transA", AttrValue::Int(1))],
            ))
        } else {
            let at = cx.swap_last_two(&a, ra);
            let t = cx.op("MatMul", "db", &[&at, &g]);
            Some(cx.unbroadcast(&t, 1)?)
        };
        Ok(vec![da, db])
    }

    /// `v` of rank `rank` as the matrix [rows, last dim] (itself when already 2-D).
    fn fold_rows(cx: &mut GradCx, v: &str, rank: usize, tag: &str) -> String {
        if rank == 2 {
            return v.to_string();
        }
        let last = cx.b.ints("last", &[-1]);
        let minus1 = cx.b.ints("minus1", &[-1]);
        let shape = cx.op("Shape", &format!("{tag}_shape"), &[v]);
        let inner = cx.op_attrs(
            "Gather",
            &format!("{tag}_inner"),
            &[&shape, &last],
            vec![("axis", AttrValue::Int(0))],
        );
        let shape2 = cx.op_attrs(
            "Concat",
            &format!("{tag}2_shape"),
            &[&minus1, &inner],
            vec![("axis", AttrValue::Int(0))],
        );
        cx.op("Reshape", &format!("{tag}2"), &[v, &shape2])
    }

    /// y = α·op(a)·op(b) + β·c.
    pub fn gemm(cx: &mut GradCx) -> Out {
        let (g, a, b) = (cx.gy(0)?, cx.x(0), cx.x(1));
        let ta = cx.node.attr_int("transA").unwrap_or(0) != 0;
        let tb = cx.node.attr_int("transB").unwrap_or(0) != 0;
        let alpha = cx.node.attr_float("alpha").unwrap_or(1.0);
        let beta = cx.node.attr_float("beta").unwrap_or(1.0);
        let flags = |t_a: bool, t_b: bool| {
            vec![
                ("transA", AttrValue::Int(t_a as i64)),
                ("transB", AttrValue::Int(t_b as i64)),
                ("alpha", AttrValue::Float(alpha)),
            ]
        };
        // ta=0: g·op(b)ᵀ; ta=1: op(b)·gᵀ
        let da = cx.grad_for(0, |cx| {
            Ok(if !ta {
                cx.op_attrs("Gemm", "da", &[&g, &b], flags(false, !tb))
            } else {
                cx.op_attrs("Gemm", "da", &[&b, &g], flags(tb, true))
            })
        })?;
        // tb=0: op(a)ᵀ·g; tb=1: gᵀ·op(a)
        let db = cx.grad_for(1, |cx| {
            Ok(if !tb {
                cx.op_attrs("Gemm", "db", &[&a, &g], flags(!ta, false))
            } else {
                cx.op_attrs("Gemm", "db", &[&g, &a], flags(true, ta))
            })
        })?;
        let dc = cx.grad_for(2, |cx| {
            let t = if beta != 1.0 {
                let k = cx.scalar(beta as f64, &cx.y(0))?;
                cx.op("Mul", "beta_g", &[&g, &k])
            } else {
                g.clone()
            };
            cx.unbroadcast(&t, 2)
        })?;
        Ok(vec![da, db, dc])
    }
}
