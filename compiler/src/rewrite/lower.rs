//! Lowers the composite `ai.bidora` nodes to standard ONNX ops.
//!
//! DoRA, with `W` as the node sees it (`[in, out]`, or `[out, in]` when `w_transposed=1`):
//!
//! ```text
//! base  = x·W                                   (MatMul, or Gemm(transB=1))
//! delta = s · (x·A)·B
//! n²    = ‖W‖²_col + 2s·colsum((Aᵀ·W) ⊙ B) + s²·colsum(B ⊙ ((AᵀA)·B))
//! y     = (base + delta) ⊙ (m / √n²)
//! ```
//!
//! For an f16 or bf16 weight, `x·W` and `Aᵀ·W` run in the weight's type and are cast up, and
//! everything else (the adapters, the norm, the scaling) is f32; the output is cast back to
//! the weight's type (peft's mixed-precision recipe: frozen weights half, what trains f32).
//!
//! The norm never materialises the `[in, out]` matrix `W + s·A·B`: every temporary is `[r, out]`
//! or `[r, r]`, and `‖W‖²_col` is a constant computed here. At initialisation `B = 0`, so
//! `n² = ‖W‖²_col` exactly and `m / n = 1` exactly (the rewrite took `m = √‖W‖²_col` from the same
//! f32 values): the adapted model reproduces the original outputs bit for bit up to `+ 0`.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::builder::Builder;
use crate::ir::names::Names;
use crate::ir::{AttrValue, DataType, Graph, Model, Node, Tensor, BIDORA_DOMAIN};
use crate::targets::Layout;

use super::{adapter_dtype, out_feature_sqnorms};

/// Replaces every composite node by standard ops, except `ai.bidora.StopGradient` markers
/// (DoRA's `detach_norm`) that autodiff needs; [`strip_markers`] turns those into Identity.
pub fn lower(model: &Model) -> Result<Model> {
    let mut model = model.clone();
    let g = &mut model.graph;
    // Built once, so lowering stays linear in the graph: the nodes are rebuilt in one pass (no
    // splice per adapter), weights found through one producer map, names from one index.
    let mut names = Names::of(g);
    let weights = WeightIndex {
        transposes: g
            .nodes
            .iter()
            .filter(|n| n.op_type == "Transpose")
            .filter_map(|n| Some((n.outputs.first()?.clone(), n.input(0)?.to_string())))
            .collect(),
        inputs: g.inputs.iter().map(|i| i.name.clone()).collect(),
    };
    let old = std::mem::take(&mut g.nodes);
    let mut nodes = Vec::with_capacity(old.len());
    for node in old {
        if node.domain != BIDORA_DOMAIN {
            nodes.push(node);
            continue;
        }
        let new = match node.op_type.as_str() {
            "DoRA" => lower_adapter(g, &mut names, &weights, &node, true)?,
            "LoRA" => lower_adapter(g, &mut names, &weights, &node, false)?,
            other => {
                return Err(Error::UnsupportedOp {
                    op: format!("{BIDORA_DOMAIN}.{other}"),
                    node: node.name.clone(),
                    msg: "no lowering to standard ONNX".into(),
                })
            }
        };
        nodes.extend(new);
    }
    g.nodes = nodes;
    Ok(model)
}

/// Makes a lowered model plain ONNX: `StopGradient` markers become `Identity` and the
/// `ai.bidora` opset import goes.
pub fn strip_markers(model: &Model) -> Model {
    let mut model = model.clone();
    for n in &mut model.graph.nodes {
        if n.domain == BIDORA_DOMAIN && n.op_type == crate::autodiff::STOP_GRADIENT {
            n.domain.clear();
            n.op_type = "Identity".into();
        }
    }
    model.opset_imports.retain(|o| o.domain != BIDORA_DOMAIN);
    model
}

/// What finding the adapters' weights needs, indexed once per lowering: the Transposes by
/// output, and the graph inputs (an initializer that is also an input is not a constant; with
/// three adapter inputs per adapter, `Graph::constant`'s scan of them per adapter would make
/// lowering quadratic in the number of adapters).
struct WeightIndex {
    transposes: HashMap<String, String>,
    inputs: HashSet<String>,
}

impl WeightIndex {
    fn constant<'a>(&self, g: &'a Graph, name: &str) -> Option<&'a Tensor> {
        if self.inputs.contains(name) {
            return None;
        }
        g.initializers.get(name)
    }
}

/// Finds the constant weight behind a composite node's `W` operand (directly, or through the
/// `Transpose` the dynamo exporter puts in front of a MatMul) and its layout.
fn weight_constant<'a>(
    g: &'a Graph,
    weights: &WeightIndex,
    node: &Node,
) -> Result<(&'a Tensor, Layout)> {
    let w = node.input(1).unwrap_or_default();
    let transposed = node.attr_int("w_transposed").unwrap_or(0) != 0;
    if let Some(t) = weights.constant(g, w) {
        return Ok((
            t,
            if transposed {
                Layout::OutIn
            } else {
                Layout::InOut
            },
        ));
    }
    if let Some(t) = weights
        .transposes
        .get(w)
        .and_then(|s| weights.constant(g, s))
    {
        return Ok((t, Layout::OutIn));
    }
    Err(Error::Rewrite {
        node: node.label(),
        msg: format!("its weight '{w}' is not a constant (or a transposed constant)"),
    })
}

fn lower_adapter(
    g: &mut Graph,
    names: &mut Names,
    weights: &WeightIndex,
    node: &Node,
    dora: bool,
) -> Result<Vec<Node>> {
    let ins: Vec<String> = node.inputs.clone();
    let need = if dora { 5 } else { 4 };
    if ins.len() < need || ins[..need].iter().any(String::is_empty) {
        return Err(Error::Rewrite {
            node: node.label(),
            msg: format!("expects {need} inputs, has {}", ins.len()),
        });
    }
    let (x, w, a, b) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let s = node.attr_float("scale").unwrap_or(1.0);
    let transposed = node.attr_int("w_transposed").unwrap_or(0) != 0;
    let (wt, layout) = weight_constant(g, weights, node)?;
    let wdtype = wt.dtype;
    let sqnorm = if dora {
        Some(
            out_feature_sqnorms(wt, layout).ok_or_else(|| Error::Rewrite {
                node: node.label(),
                msg: "weight is not a float tensor".into(),
            })?,
        )
    } else {
        None
    };
    let out = node.outputs[0].clone();
    let mut e = Builder::sharing(g, names, node.name.clone());
    // Everything the adapters touch is computed in their type `dt` (f32 for a half weight):
    // the frozen product x·W stays in the weight's type, in place, and is cast up; the low-rank
    // path runs on x cast up; the sum is cast back to the model's type for the next layer.
    let dt = adapter_dtype(wdtype);
    let half = wdtype != dt;
    let cast = |e: &mut Builder, tag: &str, v: &str, to: DataType| {
        e.op("Cast", tag, &[v], vec![("to", AttrValue::Int(to as i64))])
    };
    // s², 2s computed in the adapters' precision (f32 models keep f32 arithmetic).
    let (s, s_sq) = match dt {
        DataType::Float => (s as f64, (s * s) as f64),
        _ => (s as f64, (s as f64) * (s as f64)),
    };
    let scale = e.constant("scale", Tensor::from_f64_as(dt, "", vec![], &[s]));
    let mut base = if transposed {
        e.op("Gemm", "base", &[x, w], vec![("transB", AttrValue::Int(1))])
    } else {
        e.op("MatMul", "base", &[x, w], vec![])
    };
    let mut xf = x.clone();
    if half {
        base = cast(&mut e, "base.up", &base, dt);
        xf = cast(&mut e, "x.up", x, dt);
    }
    let xa = e.op("MatMul", "xA", &[&xf, a], vec![]);
    let xab = e.op("MatMul", "xAB", &[&xa, b], vec![]);
    let delta = e.op("Mul", "delta", &[&xab, &scale], vec![]);
    let Some(sqnorm) = sqnorm else {
        if half {
            let sum = e.op("Add", "sum", &[&base, &delta], vec![]);
            e.op_into(
                "Cast",
                "down",
                &[&sum],
                vec![("to", AttrValue::Int(wdtype as i64))],
                out,
            );
        } else {
            e.op_into("Add", "sum", &[&base, &delta], vec![], out);
        }
        return Ok(e.finish());
    };
    let m = &ins[4];
    let sum = e.op("Add", "sum", &[&base, &delta], vec![]);
    let dout = sqnorm.len() as i64;
    let wsq = e.constant("w_sqnorm", Tensor::from_f64_as(dt, "", vec![dout], &sqnorm));
    let two_s = e.constant("two_s", Tensor::from_f64_as(dt, "", vec![], &[2.0 * s]));
    let s2 = e.constant("s_sq", Tensor::from_f64_as(dt, "", vec![], &[s_sq]));
    let axis0 = e.constant("axis0", Tensor::from_i64("", vec![1], &[0]));
    // Aᵀ·W against the frozen weight in its own type (A cast down: [in, r], small), so no
    // up-cast copy of W exists at run time; the [r, out] product is cast up.
    let a_w = if half {
        cast(&mut e, "A.down", a, wdtype)
    } else {
        a.clone()
    };
    let mut at_w = if transposed {
        e.op(
            "Gemm",
            "AtW",
            &[&a_w, w],
            vec![("transA", AttrValue::Int(1)), ("transB", AttrValue::Int(1))],
        )
    } else {
        e.op(
            "Gemm",
            "AtW",
            &[&a_w, w],
            vec![("transA", AttrValue::Int(1))],
        )
    };
    if half {
        at_w = cast(&mut e, "AtW.up", &at_w, dt);
    }
    let at_a = e.op("Gemm", "AtA", &[a, a], vec![("transA", AttrValue::Int(1))]);
    let at_ab = e.op("MatMul", "AtAB", &[&at_a, b], vec![]);
    let cross_p = e.op("Mul", "cross.prod", &[&at_w, b], vec![]);
    let keep0 = || vec![("keepdims", AttrValue::Int(0))];
    let cross = e.op("ReduceSum", "cross", &[&cross_p, &axis0], keep0());
    let quad_p = e.op("Mul", "quad.prod", &[b, &at_ab], vec![]);
    let quad = e.op("ReduceSum", "quad", &[&quad_p, &axis0], keep0());
    let cross_s = e.op("Mul", "cross.scaled", &[&cross, &two_s], vec![]);
    let quad_s = e.op("Mul", "quad.scaled", &[&quad, &s2], vec![]);
    let n2a = e.op("Add", "n2.partial", &[&wsq, &cross_s], vec![]);
    let n2 = e.op("Add", "n2", &[&n2a, &quad_s], vec![]);
    let mut n = e.op("Sqrt", "norm", &[&n2], vec![]);
    if node.attr_int("detach_norm").unwrap_or(0) != 0 {
        // DoRA §4.3: the norm is a constant for the backward pass.
        n = e.op_in(
            BIDORA_DOMAIN,
            crate::autodiff::STOP_GRADIENT,
            "norm.detached",
            &[&n],
        );
    }
    let ratio = e.op("Div", "ratio", &[m, &n], vec![]);
    if half {
        let y = e.op("Mul", "out", &[&sum, &ratio], vec![]);
        e.op_into(
            "Cast",
            "down",
            &[&y],
            vec![("to", AttrValue::Int(wdtype as i64))],
            out,
        );
    } else {
        e.op_into("Mul", "out", &[&sum, &ratio], vec![], out);
    }
    Ok(e.finish())
}
