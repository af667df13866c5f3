//! Normalisation: `LayerNormalization` (opset 17), whose optional outputs Mean and InvStdDev
//! keep the leading dims and have size 1 on the normalised axes. Convolution: `Conv`'s shape
//! rule, for the patch embeddings vision encoders (ViT, DeiT, Swin) put before every adapter;
//! it has no gradient rule, so an adapter before a Conv is reported by autodiff.

use super::attr::{float, int, ints, string};
use super::{InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::{DimExpr, Fact};

pub const OPS: &[OpDef] = &[
    OpDef {
        op: "LayerNormalization",
        infer: layer_norm,
        grad: Some(grads::layer_norm),
        attrs: &[int("axis"), float("epsilon"), int("stash_type")],
        same_type: SameType::Inputs(&[0, 1, 2]),
    },
    OpDef {
        op: "Conv",
        infer: conv,
        grad: None,
        attrs: &[
            string("auto_pad"),
            ints("dilations"),
            int("group"),
            ints("kernel_shape"),
            ints("pads"),
            ints("strides"),
        ],
        same_type: SameType::All,
    },
];

/// Conv (ONNX spec, opset 11+): `X[N, C, D1..Dn]`, `W[M, C/group, k1..kn]` → `Y[N, M, O1..On]`
/// with `Oi = floor((Di + pad_begin + pad_end − dilation·(ki − 1) − 1) / stride) + 1` for
/// explicit pads (`auto_pad` NOTSET or VALID), `ceil(Di / stride)` for SAME_UPPER/LOWER.
/// A symbolic `Di` keeps its symbol where the formula is the identity, else gets a fresh one.
fn conv(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (x, w) = (cx.input(0)?, cx.input(1)?);
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(cx.err(format!(
            "needs an input [N, C, spatial..] and a weight of the same rank, got ranks {} and {}",
            x.rank(),
            w.rank()
        )));
    }
    let n = x.rank() - 2;
    let ints = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
        match cx.node.attr_ints(name) {
            Some(v) if v.len() == len => Ok(v.to_vec()),
            Some(v) => Err(cx.err(format!("'{name}' has {} values, expected {len}", v.len()))),
            None => Ok(vec![default; len]),
        }
    };
    let kernel: Vec<i64> = match cx.node.attr_ints("kernel_shape") {
        Some(k) => k.to_vec(),
        None => w.shape[2..]
            .iter()
            .map(|d| d.as_known())
            .collect::<Option<_>>()
            .ok_or_else(|| cx.err("the kernel's spatial size is not known"))?,
    };
    let strides = ints("strides", 1, n)?;
    let dilations = ints("dilations", 1, n)?;
    let pads = ints("pads", 0, 2 * n)?;
    let auto_pad = cx.node.attr_string("auto_pad").unwrap_or("NOTSET");
    let mut shape = vec![x.shape[0].clone(), w.shape[0].clone()];
    for i in 0..n {
        let d = &x.shape[2 + i];
        let s = strides[i];
        let out = match auto_pad {
            "SAME_UPPER" | "SAME_LOWER" => match d.as_known() {
                Some(v) => Some(DimExpr::known((v + s - 1) / s)),
                None if s == 1 => Some(d.clone()),
                None => None,
            },
            "NOTSET" | "VALID" => {
                let (pb, pe) = if auto_pad == "VALID" {
                    (0, 0)
                } else {
                    (pads[i], pads[n + i])
                };
                let shrink = pb + pe - dilations[i] * (kernel[i] - 1) - 1;
                match d.as_known() {
                    Some(v) => {
                        let o = (v + shrink).div_euclid(s) + 1;
                        if o < 1 {
                            return Err(cx.err(format!(
                                "spatial dim {i} of size {v} is smaller than the kernel"
                            )));
                        }
                        Some(DimExpr::known(o))
                    }
                    None if s == 1 && shrink == -1 => Some(d.clone()),
                    None => None,
                }
            }
            other => return Err(cx.err(format!("unknown auto_pad '{other}'"))),
        };
        shape.push(out.unwrap_or_else(|| cx.fresh()));
    }
    Ok(vec![Fact::new(x.dtype, shape)])
}

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
    use crate::error::Result;
    use crate::ir::AttrValue;
    use crate::ops::GradCx;

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

        let dx = cx.grad_for(0, |cx| {
            let gh = cx.op("Mul", "g_scale", &[&g, &scale]);
            let m1 = mean(cx, "mean_g", &gh, &norm_axes);
            let ghx = cx.op("Mul", "g_xhat", &[&gh, &xhat]);
            let m2 = mean(cx, "mean_g_xhat", &ghx, &norm_axes);
            let t1 = cx.op("Sub", "t1", &[&gh, &m1]);
            let t2 = cx.op("Mul", "t2", &[&xhat, &m2]);
            let t = cx.op("Sub", "t", &[&t1, &t2]);
            Ok(cx.op("Div", "dx", &[&t, &sd]))
        })?;
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
        let dscale = cx.grad_for(1, |cx| {
            let gx = cx.op("Mul", "g_xhat_raw", &[&g, &xhat]);
            Ok(lead_sum(cx, "dscale", &gx))
        })?;
        let dbias = cx.grad_for(2, |cx| Ok(lead_sum(cx, "dbias", &g)))?;
        Ok(vec![dx, dscale, dbias])
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::{AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo, ValueType};
    use crate::shape::infer_graph;

    /// `Conv(x[batch, 3, h, w], W[8, 3/group, 4, 4])` with the given attributes: the output
    /// shape as text.
    fn conv_shape(h: Dim, w: Dim, group: i64, attrs: Vec<(&str, AttrValue)>) -> String {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo::new(
            "x",
            ValueType::tensor(
                DataType::Float,
                vec![Dim::Sym("batch".into()), Dim::Known(3 * group), h, w],
            ),
        ));
        g.initializers.insert(
            "w".into(),
            Tensor::from_f32("w", vec![8, 3, 4, 4], &[0.0; 8 * 3 * 16]),
        );
        let mut n = Node::new(
            "Conv",
            "conv",
            vec!["x".into(), "w".into()],
            vec!["y".into()],
        );
        for (k, v) in attrs {
            n = n.with_attr(k, v);
        }
        g.nodes.push(n.with_attr("group", AttrValue::Int(group)));
        let f = infer_graph(&g, 18).unwrap();
        let y = f.get("y").unwrap();
        format!("{:?} {}", y.dtype, crate::ops::dims_str(&y.shape))
    }

    #[test]
    fn conv_output_sizes() {
        let ints = |v: &[i64]| AttrValue::Ints(v.to_vec());
        // ViT's patch embedding: 4×4 patches, stride 4, 32×32 image → 8×8 patches.
        let vit = vec![("kernel_shape", ints(&[4, 4])), ("strides", ints(&[4, 4]))];
        assert_eq!(
            conv_shape(Dim::Known(32), Dim::Known(32), 1, vit.clone()),
            "Float [batch, 8, 8, 8]"
        );
        // Floors a partial window: (30 − 4)/4 + 1 = 7.
        assert_eq!(
            conv_shape(Dim::Known(30), Dim::Known(32), 1, vit),
            "Float [batch, 8, 7, 8]"
        );
        // Explicit pads, dilation 2 (effective kernel 7), stride 2, groups.
        let padded = vec![
            ("pads", ints(&[1, 2, 3, 4])),
            ("dilations", ints(&[2, 2])),
            ("strides", ints(&[2, 1])),
        ];
        // h: (20 + 1 + 3 − 7)/2 + 1 = 9; w: (20 + 2 + 4 − 7)/1 + 1 = 20.
        assert_eq!(
            conv_shape(Dim::Known(20), Dim::Known(20), 2, padded),
            "Float [batch, 8, 9, 20]"
        );
        let same = vec![
            ("auto_pad", AttrValue::String(b"SAME_UPPER".to_vec())),
            ("strides", ints(&[3, 1])),
        ];
        // SAME: ceil(10 / 3) = 4; a symbolic width with stride 1 keeps its symbol.
        assert_eq!(
            conv_shape(Dim::Known(10), Dim::Sym("width".into()), 1, same),
            "Float [batch, 8, 4, width]"
        );
        // Other symbolic sizes get fresh symbols rather than a wrong number.
        let s = conv_shape(
            Dim::Sym("height".into()),
            Dim::Known(8),
            1,
            vec![("strides", ints(&[4, 4]))],
        );
        assert!(
            s.starts_with("Float [batch, 8, ?") && s.ends_with(", 2]"),
            "{s}"
        );
    }
}
