//! Gradient rules. Data-movement ops move the gradient back: reshaping ops reshape it to the
//! input's runtime shape, Transpose inverts its permutation, Concat slices, Split concatenates,
//! Slice pads, Expand sums over the broadcast axes, GatherND and ScatterND undo each other.

use crate::error::Result;
use crate::ir::{AttrValue, DataType};
use crate::ops::grad_cx::scalar_tensor;
use crate::ops::GradCx;

type Out = Result<Vec<Option<String>>>;

/// Reshape, Flatten, Squeeze, Unsqueeze: the gradient takes the input's shape back.
pub fn reshape_back(cx: &mut GradCx) -> Out {
    let (g, x) = (cx.gy(0)?, cx.x(0));
    let shape = cx.op("Shape", "x_shape", &[&x]);
    let mut out = vec![Some(cx.op("Reshape", "dx", &[&g, &shape]))];
    out.resize(cx.node.inputs.len(), None);
    Ok(out)
}

pub fn transpose(cx: &mut GradCx) -> Out {
    let (g, x) = (cx.gy(0)?, cx.x(0));
    let rank = cx.fact(&x)?.rank();
    let perm: Vec<i64> = match cx.node.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| if a < 0 { a + rank as i64 } else { a })
            .collect(),
        None => (0..rank as i64).rev().collect(),
    };
    let mut inv = vec![0i64; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    Ok(vec![Some(cx.op_attrs(
        "Transpose",
        "dx",
        &[&g],
        vec![("perm", AttrValue::Ints(inv))],
    ))])
}

pub fn expand(cx: &mut GradCx) -> Out {
    let g = cx.gy(0)?;
    Ok(vec![Some(cx.unbroadcast(&g, 0)?), None])
}

/// Concat: each input's gradient is its slice of g along the axis; offsets are computed
/// from the inputs' runtime shapes, so symbolic sizes work.
pub fn concat(cx: &mut GradCx) -> Out {
    let g = cx.gy(0)?;
    let rank = cx.fact(&cx.x(0))?.rank() as i64;
    let a = cx.node.attr_int("axis").unwrap_or(0);
    let a = if a < 0 { a + rank } else { a };
    let axes = cx.b.ints("axis", &[a]);
    let mut start = cx.b.ints("zero", &[0]);
    let mut out = vec![];
    for i in 0..cx.node.inputs.len() {
        let x = cx.x(i);
        let shape = cx.op("Shape", "x_shape", &[&x]);
        let size = cx.op_attrs(
            "Gather",
            "size",
            &[&shape, &axes],
            vec![("axis", AttrValue::Int(0))],
        );
        let end = cx.op("Add", "end", &[&start, &size]);
        out.push(cx.grad_for(i, |cx| Ok(cx.op("Slice", "dx", &[&g, &start, &end, &axes])))?);
        start = end;
    }
    Ok(out)
}

/// Split: concatenate the outputs' gradients (zeros for outputs off the path).
pub fn split(cx: &mut GradCx) -> Out {
    let rank = cx.fact(&cx.x(0))?.rank() as i64;
    let a = cx.node.attr_int("axis").unwrap_or(0);
    let a = if a < 0 { a + rank } else { a };
    let gs: Vec<String> = (0..cx.node.outputs.len())
        .map(|i| cx.gy(i))
        .collect::<Result<_>>()?;
    let refs: Vec<&str> = gs.iter().map(String::as_str).collect();
    let mut out = vec![Some(cx.op_attrs(
        "Concat",
        "dx",
        &refs,
        vec![("axis", AttrValue::Int(a))],
    ))];
    out.resize(cx.node.inputs.len(), None);
    Ok(out)
}

/// For the Gather gradients: `Range(0, dim)` over the data's `axis`, and the indices as
/// int64 with negative values counted from the end.
fn positions_and_index(cx: &mut GradCx, x: &str, idx: &str, axis: i64) -> (String, String) {
    let ax = cx.b.ints("axis", &[axis]);
    let ax0 = cx.b.ints("ax0", &[0]);
    let shape = cx.op("Shape", "x_shape", &[x]);
    let dim = cx.op_attrs(
        "Gather",
        "dim",
        &[&shape, &ax],
        vec![("axis", AttrValue::Int(0))],
    );
    let dim_s = cx.op("Squeeze", "dim_s", &[&dim, &ax0]);
    let zero =
        cx.b.constant("zero", crate::ir::Tensor::from_i64("", vec![], &[0]));
    let one =
        cx.b.constant("one", crate::ir::Tensor::from_i64("", vec![], &[1]));
    let range = cx.op("Range", "positions", &[&zero, &dim_s, &one]);
    let to_i64 = vec![("to", AttrValue::Int(DataType::Int64 as i64))];
    let idx64 = cx.op_attrs("Cast", "idx", &[idx], to_i64);
    let neg = cx.op("Less", "neg", &[&idx64, &zero]);
    let wrapped = cx.op("Add", "wrapped", &[&idx64, &dim_s]);
    let fixed = cx.op("Where", "idx_fixed", &[&neg, &wrapped, &idx64]);
    (range, fixed)
}

/// Gather w.r.t. the data, for scalar or 1-D indices (token selection such as BERT's pooler
/// taking position 0): a one-hot matrix `O[k, d] = (indices[k] == d)` built at run time
/// from the axis' size, then `dx = g · O` along the axis, which also sums repeated
/// indices. Indices of higher rank (embedding lookups) are not supported: embedding tables
/// are frozen in PEFT, so they never need this.
pub fn gather(cx: &mut GradCx) -> Out {
    let (g, x, idx) = (cx.gy(0)?, cx.x(0), cx.x(1));
    let xf = cx.fact(&x)?.clone();
    let ir = cx.fact(&idx)?.rank();
    if ir > 1 {
        return Err(cx.err("gradient of Gather w.r.t. data needs scalar or 1-D indices"));
    }
    let r = xf.rank() as i64;
    let a = cx.node.attr_int("axis").unwrap_or(0);
    let a = if a < 0 { a + r } else { a };
    let axes = cx.b.ints("axis", &[a]);
    // g with the gathered axis present: [.., k, ..].
    let gk = if ir == 0 {
        cx.op("Unsqueeze", "g_k", &[&g, &axes])
    } else {
        g
    };
    let (range, fixed) = positions_and_index(cx, &x, &idx, a);
    let squeeze0 = cx.b.ints("ax0", &[0]);
    let one = cx.b.ints("one", &[1]);
    let col = if ir == 0 {
        cx.op("Unsqueeze", "idx_k", &[&fixed, &squeeze0])
    } else {
        fixed
    };
    let col = cx.op("Unsqueeze", "idx_col", &[&col, &one]);
    let hot = cx.op("Equal", "onehot_b", &[&col, &range]);
    let dtype = xf.dtype as i64;
    let onehot = cx.op_attrs(
        "Cast",
        "onehot",
        &[&hot],
        vec![("to", AttrValue::Int(dtype))],
    );
    // Move the axis last, contract with the one-hot matrix, move it back.
    let mut perm: Vec<i64> = (0..r).filter(|&i| i != a).collect();
    perm.push(a);
    let mut inv = vec![0i64; r as usize];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    let gt = cx.op_attrs(
        "Transpose",
        "g_last",
        &[&gk],
        vec![("perm", AttrValue::Ints(perm))],
    );
    let dx_last = cx.op("MatMul", "dx_last", &[&gt, &onehot]);
    let dx = cx.op_attrs(
        "Transpose",
        "dx",
        &[&dx_last],
        vec![("perm", AttrValue::Ints(inv))],
    );
    Ok(vec![Some(dx), None])
}

/// GatherElements w.r.t. the data: `dx[.., d, ..] = Σ_k g[.., k, ..]·[idx[.., k, ..] = d]`,
/// with the one-hot over the data's axis built at run time in a new last axis, summed
/// over the index axis and moved back into place. Assumes the indices match the data's
/// shape off the gather axis (as in every exported model we have seen).
pub fn gather_elements(cx: &mut GradCx) -> Out {
    let (g, x, idx) = (cx.gy(0)?, cx.x(0), cx.x(1));
    let xf = cx.fact(&x)?.clone();
    let r = xf.rank() as i64;
    let a = cx.node.attr_int("axis").unwrap_or(0);
    let a = if a < 0 { a + r } else { a };
    let last = cx.b.ints("new_last", &[r]);
    let ax = cx.b.ints("axis", &[a]);
    let (range, fixed) = positions_and_index(cx, &x, &idx, a);
    let idx_u = cx.op("Unsqueeze", "idx_u", &[&fixed, &last]);
    let hot_b = cx.op("Equal", "onehot_b", &[&idx_u, &range]);
    let hot = cx.op_attrs(
        "Cast",
        "onehot",
        &[&hot_b],
        vec![("to", AttrValue::Int(xf.dtype as i64))],
    );
    let gu = cx.op("Unsqueeze", "g_u", &[&g, &last]);
    let prod = cx.op("Mul", "spread", &[&gu, &hot]);
    let summed = cx.op_attrs(
        "ReduceSum",
        "summed",
        &[&prod, &ax],
        vec![("keepdims", AttrValue::Int(1))],
    );
    let mut perm: Vec<i64> = (0..=r).collect();
    perm.swap(a as usize, r as usize);
    let moved = cx.op_attrs(
        "Transpose",
        "moved",
        &[&summed],
        vec![("perm", AttrValue::Ints(perm))],
    );
    Ok(vec![Some(cx.op("Squeeze", "dx", &[&moved, &last])), None])
}

/// GatherND (batch_dims 0; decoders' last-token pooling) w.r.t. the data: the output
/// gradient scattered into zeros of the data's shape. `ScatterND` with `reduction=add`
/// (opset 16) so that repeated index tuples sum their gradients, as they should; the
/// indices are made non-negative first (GatherND counts negative ones from the end,
/// ScatterND's spec does not say it does).
pub fn gather_nd(cx: &mut GradCx) -> Out {
    if cx.node.attr_int("batch_dims").unwrap_or(0) != 0 {
        return Err(cx.err(
            "gradient of GatherND with batch_dims > 0 is not supported (exporters write \
             batch_dims 0 for last-token pooling)",
        ));
    }
    if cx.opset < 16 {
        return Err(cx.err(format!(
            "its gradient is a ScatterND with reduction=add, which needs opset 16; the \
             model imports opset {}: export with opset_version >= 16",
            cx.opset
        )));
    }
    let (g, x, idx) = (cx.gy(0)?, cx.x(0), cx.x(1));
    let xf = cx.fact(&x)?.clone();
    let depth = cx
        .fact(&idx)?
        .shape
        .last()
        .and_then(|d| d.as_known())
        .ok_or_else(|| cx.err("the last dim of the indices must be known"))?;
    let shape = cx.op("Shape", "x_shape", &[&x]);
    let zero = scalar_tensor(xf.dtype, 0.0, vec![1])?;
    let zeros = cx.op_attrs(
        "ConstantOfShape",
        "zeros",
        &[&shape],
        vec![("value", AttrValue::Tensor(zero))],
    );
    // The sizes the index tuples count in: the data's first `depth` dims.
    let start = cx.b.ints("start", &[0]);
    let end = cx.b.ints("end", &[depth]);
    let dims = cx.op("Slice", "index_dims", &[&shape, &start, &end]);
    let to_i64 = vec![("to", AttrValue::Int(DataType::Int64 as i64))];
    let idx64 = cx.op_attrs("Cast", "idx", &[&idx], to_i64);
    let zero_i =
        cx.b.constant("zero_i", crate::ir::Tensor::from_i64("", vec![], &[0]));
    let neg = cx.op("Less", "neg", &[&idx64, &zero_i]);
    let wrapped = cx.op("Add", "wrapped", &[&idx64, &dims]);
    let fixed = cx.op("Where", "idx_fixed", &[&neg, &wrapped, &idx64]);
    let add = vec![("reduction", AttrValue::String(b"add".to_vec()))];
    let dx = cx.op_attrs("ScatterND", "dx", &[&zeros, &fixed, &g], add);
    Ok(vec![Some(dx), None])
}

/// ScatterND (the GatherND gradient, differentiated again by the exact hypergradient):
/// the updates' gradient gathers the output gradient at the indices; the data's is the
/// output gradient, with the overwritten positions zeroed unless the updates were added.
pub fn scatter_nd(cx: &mut GradCx) -> Out {
    let reduction = cx
        .node
        .attr_string("reduction")
        .unwrap_or("none")
        .to_string();
    if reduction != "none" && reduction != "add" {
        return Err(cx.err(format!(
            "gradient of ScatterND with reduction={reduction} is not supported (none, add)"
        )));
    }
    let (g, idx, upd) = (cx.gy(0)?, cx.x(1), cx.x(2));
    let dupd = cx
        .needs(2)
        .then(|| cx.op("GatherND", "dupdates", &[&g, &idx]));
    let ddata = if !cx.needs(0) {
        None
    } else if reduction == "add" {
        Some(g)
    } else {
        let dtype = cx.fact(&upd)?.dtype;
        let shape = cx.op("Shape", "upd_shape", &[&upd]);
        let zero = scalar_tensor(dtype, 0.0, vec![1])?;
        let zeros = cx.op_attrs(
            "ConstantOfShape",
            "zeros",
            &[&shape],
            vec![("value", AttrValue::Tensor(zero))],
        );
        Some(cx.op("ScatterND", "ddata", &[&g, &idx, &zeros]))
    };
    Ok(vec![ddata, None, dupd])
}

/// Slice with unit steps over known dims: pad the gradient back with zeros.
pub fn slice(cx: &mut GradCx) -> Out {
    let (g, x) = (cx.gy(0)?, cx.x(0));
    let xs = cx.fact(&x)?.shape.clone();
    let ints = |cx: &GradCx, i: usize| -> Result<Option<Vec<i64>>> {
        match cx.node.input(i) {
            Some(n) => Ok(Some(
                cx.fact(n)?
                    .known_ints()
                    .ok_or_else(|| cx.err("non-constant slice bounds"))?,
            )),
            None => Ok(None),
        }
    };
    let starts = ints(cx, 1)?.unwrap_or_default();
    let ends = ints(cx, 2)?.unwrap_or_default();
    let r = xs.len() as i64;
    let axes: Vec<i64> = ints(cx, 3)?
        .unwrap_or_else(|| (0..starts.len() as i64).collect())
        .into_iter()
        .map(|a| if a < 0 { a + r } else { a })
        .collect();
    if ints(cx, 4)?.is_some_and(|s| s.iter().any(|&v| v != 1)) {
        return Err(cx.err("gradient of Slice with steps other than 1 is not supported"));
    }
    let mut pads = vec![0i64; 2 * xs.len()];
    for (j, &ax) in axes.iter().enumerate() {
        let d = xs[ax as usize]
            .as_known()
            .ok_or_else(|| cx.err("gradient of Slice along a symbolic axis is not supported"))?;
        let norm = |v: i64| (if v < 0 { v + d } else { v }).clamp(0, d);
        let (s, e) = (norm(starts[j]), norm(ends[j]).max(norm(starts[j])));
        pads[ax as usize] = s;
        pads[ax as usize + xs.len()] = d - e;
    }
    let p = cx.b.ints("pads", &pads);
    let mut out = vec![Some(cx.op("Pad", "dx", &[&g, &p]))];
    out.resize(cx.node.inputs.len(), None);
    Ok(out)
}

/// Constant-mode Pad with constant non-negative pads: the gradient is the slice of `gy`
/// the input occupies. Slice's own gradient emits this Pad, so second-order programs
/// (the exact hypergradient) need it. Ends are written from the end (`-pad`, or the
/// int64 maximum for no padding), so symbolic dims need no known size.
pub fn pad(cx: &mut GradCx) -> Out {
    let g = cx.gy(0)?;
    let mode = cx.node.attr_string("mode").unwrap_or("constant");
    if mode != "constant" {
        return Err(cx.err(format!("gradient of Pad in mode '{mode}' is not supported")));
    }
    let rank = cx.fact(&cx.x(0))?.rank();
    let pads = match cx.node.input(1) {
        Some(n) => cx
            .fact(n)?
            .known_ints()
            .ok_or_else(|| cx.err("gradient of Pad needs constant pads"))?,
        None => vec![0; 2 * rank],
    };
    if pads.iter().any(|&p| p < 0) {
        return Err(cx.err("gradient of Pad with negative pads is not supported"));
    }
    let r = pads.len() as i64 / 2;
    let axes: Vec<i64> = match cx.node.input(3) {
        Some(n) if !n.is_empty() => cx
            .fact(n)?
            .known_ints()
            .ok_or_else(|| cx.err("gradient of Pad needs constant axes"))?
            .into_iter()
            .map(|a| if a < 0 { a + rank as i64 } else { a })
            .collect(),
        _ => (0..r).collect(),
    };
    let starts: Vec<i64> = (0..r as usize).map(|j| pads[j]).collect();
    let ends: Vec<i64> = (0..r as usize)
        .map(|j| match pads[j + r as usize] {
            0 => i64::MAX,
            e => -e,
        })
        .collect();
    let (s, e, a) = (
        cx.b.ints("starts", &starts),
        cx.b.ints("ends", &ends),
        cx.b.ints("axes", &axes),
    );
    let mut out = vec![Some(cx.op("Slice", "dx", &[&g, &s, &e, &a]))];
    out.resize(cx.node.inputs.len(), None);
    Ok(out)
}
