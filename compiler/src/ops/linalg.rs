//! Matrix products: `MatMul` (numpy semantics: 1-D operands promoted and dropped, batch dims
//! broadcast) and `Gemm` (2-D, `transA`/`transB`, optional broadcast C).

use super::{dims_str, InferCx, OpDef};
use crate::error::Result;
use crate::shape::Fact;

pub const OPS: &[OpDef] = &[
    OpDef {
        op: "MatMul",
        infer: matmul,
    },
    OpDef {
        op: "Gemm",
        infer: gemm,
    },
];

fn compatible(a: &crate::shape::DimExpr, b: &crate::shape::DimExpr) -> bool {
    a == b || a.is_symbolic() || b.is_symbolic()
}

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
        sa.insert(0, crate::shape::DimExpr::known(1));
    }
    if b_vec {
        sb.push(crate::shape::DimExpr::known(1));
    }
    let (m, ka) = (&sa[sa.len() - 2], &sa[sa.len() - 1]);
    let (kb, n) = (&sb[sb.len() - 2], &sb[sb.len() - 1]);
    if !compatible(ka, kb) {
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
    if !compatible(ka, kb) {
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
}
