//! Normalisation: `LayerNormalization` (opset 17), whose optional outputs Mean and InvStdDev
//! keep the leading dims and have size 1 on the normalised axes.

use super::{InferCx, OpDef};
use crate::error::Result;
use crate::shape::{DimExpr, Fact};

pub const OPS: &[OpDef] = &[OpDef {
    op: "LayerNormalization",
    infer: layer_norm,
    grad: Some(grads::layer_norm),
}];

fn layer_norm(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(-1), x.rank())?;
    let stats: Vec<DimExpr> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i < axis {
                d.clone()
            } else {
                DimExpr::known(1)
            }
        })
        .collect();
    let stash = crate::ir::DataType::from_i32(cx.node.attr_int("stash_type").unwrap_or(1) as i32)
        .unwrap_or(crate::ir::DataType::Float);
    Ok(vec![
        Fact::new(x.dtype, x.shape.clone()),
        Fact::new(stash, stats.clone()),
        Fact::new(stash, stats),
    ])
}

// ---------------------------------------------------------------------------------------------
// Gradient rule: recomputes the normalised input x̂ from X (rather than relying on the optional
// Mean/InvStdDev outputs, which exporters leave unused), then
// dX = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) with ĝ = g ⊙ scale, means over the normalised axes;
// dScale = Σ_lead g ⊙ x̂; dB = Σ_lead g.

pub(crate) mod grads {
    use crate::autodiff::GradCx;
    use crate::error::Result;
    use crate::ir::AttrValue;

    type Out = Result<Vec<Option<String>>>;

    /// ReduceMean with keepdims over `axes`, spelled for the model's opset (axes became an
    /// input in opset 18).
    fn mean(cx: &mut GradCx, tag: &str, v: &str, axes: &[i64]) -> String {
        let keep = ("keepdims", AttrValue::Int(1));
        if cx.opset >= 18 {
            let ax = cx.b.ints("axes", axes);
            cx.op_attrs("ReduceMean", tag, &[v, &ax], vec![keep])
        } else {
            cx.op_attrs(
                "ReduceMean",
                tag,
                &[v],
                vec![("axes", AttrValue::Ints(axes.to_vec())), keep],
            )
        }
    }

    pub fn layer_norm(cx: &mut GradCx) -> Out {
        let (g, x, scale) = (cx.gy(0)?, cx.x(0), cx.x(1));
        let rank = cx.fact(&x)?.rank() as i64;
        let a = cx.node.attr_int("axis").unwrap_or(-1);
        let a = if a < 0 { a + rank } else { a };
        let eps = cx.node.attr_float("epsilon").unwrap_or(1e-5) as f64;
        let norm_axes: Vec<i64> = (a..rank).collect();
        let lead_axes: Vec<i64> = (0..a).collect();

        let mu = mean(cx, "mu", &x, &norm_axes);
        let xc = cx.op("Sub", "xc", &[&x, &mu]);
        let xc2 = cx.op("Mul", "xc2", &[&xc, &xc]);
        let var = mean(cx, "var", &xc2, &norm_axes);
        let e = cx.scalar(eps, &x)?;
        let ve = cx.op("Add", "var_eps", &[&var, &e]);
        let sd = cx.op("Sqrt", "std", &[&ve]);
        let xhat = cx.op("Div", "xhat", &[&xc, &sd]);

        let dx = if cx.needs(0) {
            let gh = cx.op("Mul", "g_scale", &[&g, &scale]);
            let m1 = mean(cx, "mean_g", &gh, &norm_axes);
            let ghx = cx.op("Mul", "g_xhat", &[&gh, &xhat]);
            let m2 = mean(cx, "mean_g_xhat", &ghx, &norm_axes);
            let t1 = cx.op("Sub", "t1", &[&gh, &m1]);
            let t2 = cx.op("Mul", "t2", &[&xhat, &m2]);
            let t = cx.op("Sub", "t", &[&t1, &t2]);
            Some(cx.op("Div", "dx", &[&t, &sd]))
        } else {
            None
        };
        let lead_sum = |cx: &mut GradCx, tag: &str, v: &str| {
            if lead_axes.is_empty() {
                return v.to_string();
            }
            let ax = cx.b.ints("lead", &lead_axes);
            cx.op_attrs(
                "ReduceSum",
                tag,
                &[v, &ax],
                vec![("keepdims", AttrValue::Int(0))],
            )
        };
        let dscale = if cx.needs(1) {
            let gx = cx.op("Mul", "g_xhat_raw", &[&g, &xhat]);
            Some(lead_sum(cx, "dscale", &gx))
        } else {
            None
        };
        let dbias = if cx.needs(2) {
            Some(lead_sum(cx, "dbias", &g))
        } else {
            None
        };
        Ok(vec![dx, dscale, dbias])
    }
}
