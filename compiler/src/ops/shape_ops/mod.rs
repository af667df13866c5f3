//! Ops that move, select or produce data without arithmetic: `Shape`, `Size`, `Reshape`,
//! `Flatten`, `Squeeze`, `Unsqueeze`, `Transpose`, `Concat`, `Split`, `Slice`, `Gather`,
//! `GatherElements`, `GatherND`, `ScatterND`, `Expand`, `Tile`, `Range`, `ConstantOfShape`,
//! `Constant`, `Pad`.
//!
//! Opset differences handled: Squeeze/Unsqueeze/Split axes or sizes as attributes before 13
//! and inputs from 13, Split's `num_outputs` (18), Shape's `start`/`end` (15), Reshape's
//! `allowzero` (14). Integer contents are propagated through all of them, so shape
//! computations built from `Shape` stay symbolic. Not covered: GatherND with batch_dims > 0
//! on symbolic shapes (falls back to fresh dims), Pad with negative pads on symbolic dims.

use super::attr::{float, floats, int, ints, sparse_tensor, string, strings, tensor};
use super::{dims_str, InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::{tensor_fact, DimExpr, Fact, MAX_TRACKED_VALUES};
use crate::ir::{AttrValue, DataType};

pub(crate) mod grads;

pub const OPS: &[OpDef] = &[
    OpDef {
        op: "Shape",
        infer: shape,
        grad: None,
        attrs: &[int("start").since(15), int("end").since(15)],
        same_type: SameType::None,
    },
    OpDef {
        op: "Size",
        infer: size,
        grad: None,
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "Reshape",
        infer: reshape,
        grad: Some(grads::reshape_back),
        attrs: &[int("allowzero").since(14)],
        same_type: SameType::None,
    },
    OpDef {
        op: "Flatten",
        infer: flatten,
        grad: Some(grads::reshape_back),
        attrs: &[int("axis")],
        same_type: SameType::None,
    },
    OpDef {
        op: "Squeeze",
        infer: squeeze,
        grad: Some(grads::reshape_back),
        attrs: &[ints("axes").until(12)],
        same_type: SameType::None,
    },
    OpDef {
        op: "Unsqueeze",
        infer: unsqueeze,
        grad: Some(grads::reshape_back),
        attrs: &[ints("axes").until(12)],
        same_type: SameType::None,
    },
    OpDef {
        op: "Transpose",
        infer: transpose,
        grad: Some(grads::transpose),
        attrs: &[ints("perm")],
        same_type: SameType::None,
    },
    OpDef {
        op: "Concat",
        infer: concat,
        grad: Some(grads::concat),
        attrs: &[int("axis")],
        same_type: SameType::All,
    },
    OpDef {
        op: "Split",
        infer: split,
        grad: Some(grads::split),
        attrs: &[
            int("axis"),
            ints("split").until(12),
            int("num_outputs").since(18),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "Slice",
        infer: slice,
        grad: Some(grads::slice),
        attrs: &[],
        same_type: SameType::Inputs(&[1, 2, 3, 4]),
    },
    OpDef {
        op: "Gather",
        infer: gather,
        grad: Some(grads::gather),
        attrs: &[int("axis")],
        same_type: SameType::None,
    },
    OpDef {
        op: "GatherElements",
        infer: gather_elements,
        grad: Some(grads::gather_elements),
        attrs: &[int("axis")],
        same_type: SameType::None,
    },
    OpDef {
        op: "GatherND",
        infer: gather_nd,
        grad: Some(grads::gather_nd),
        attrs: &[int("batch_dims")],
        same_type: SameType::None,
    },
    OpDef {
        op: "ScatterND",
        infer: scatter_nd,
        grad: Some(grads::scatter_nd),
        attrs: &[string("reduction").since(16)],
        same_type: SameType::Inputs(&[0, 2]),
    },
    OpDef {
        op: "Expand",
        infer: expand,
        grad: Some(grads::expand),
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "Tile",
        infer: tile,
        grad: None,
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "Range",
        infer: range,
        grad: None,
        attrs: &[],
        same_type: SameType::All,
    },
    OpDef {
        op: "ConstantOfShape",
        infer: constant_of_shape,
        grad: None,
        attrs: &[tensor("value")],
        same_type: SameType::None,
    },
    OpDef {
        op: "Constant",
        infer: constant,
        grad: None,
        attrs: &[
            sparse_tensor("sparse_value"),
            tensor("value"),
            float("value_float"),
            floats("value_floats"),
            int("value_int"),
            ints("value_ints"),
            string("value_string"),
            strings("value_strings"),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "Pad",
        infer: pad,
        grad: Some(grads::pad),
        attrs: &[string("mode")],
        same_type: SameType::Inputs(&[0, 2]),
    },
];

fn k(v: i64) -> DimExpr {
    DimExpr::known(v)
}

fn clamp_range(cx: &InferCx, start: i64, end: i64, rank: usize) -> (usize, usize) {
    let _ = cx;
    let r = rank as i64;
    let norm = |v: i64| {
        if v < 0 {
            (v + r).clamp(0, r)
        } else {
            v.clamp(0, r)
        }
    };
    (norm(start) as usize, norm(end).max(norm(start)) as usize)
}

fn shape(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let (s, e) = clamp_range(
        cx,
        cx.node.attr_int("start").unwrap_or(0),
        cx.node.attr_int("end").unwrap_or(i64::MAX),
        x.rank(),
    );
    let dims = x.shape[s..e].to_vec();
    Ok(vec![
        Fact::new(DataType::Int64, vec![k(dims.len() as i64)]).with_value(dims)
    ])
}

fn size(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let n = x.shape.iter().fold(k(1), |a, d| a.mul(d));
    Ok(vec![Fact::new(DataType::Int64, vec![]).with_value(vec![n])])
}

fn reshape(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let target = cx
        .input(1)?
        .value
        .clone()
        .ok_or_else(|| cx.err("the target shape is not known at compile time"))?;
    let allowzero = cx.node.attr_int("allowzero").unwrap_or(0) != 0;
    let mut out: Vec<Option<DimExpr>> = vec![];
    for (i, d) in target.iter().enumerate() {
        out.push(match d.as_known() {
            Some(0) if !allowzero => Some(x.shape.get(i).cloned().ok_or_else(|| {
                cx.err(format!("0 at position {i} copies a dim the input lacks"))
            })?),
            Some(-1) => None,
            Some(v) if v < -1 => return Err(cx.err(format!("invalid target dim {v}"))),
            _ => Some(d.clone()),
        });
    }
    let holes = out.iter().filter(|d| d.is_none()).count();
    if holes > 1 {
        return Err(cx.err("more than one -1 in the target shape"));
    }
    let total = x.shape.iter().fold(k(1), |a, d| a.mul(d));
    let known = out.iter().flatten().fold(k(1), |a, d| a.mul(d));
    let fill = if holes == 1 {
        Some(total.div(&known).unwrap_or_else(|| cx.fresh()))
    } else {
        // Only two known counts can be proved different; symbols may hide anything.
        if let (Some(a), Some(b)) = (total.as_known(), known.as_known()) {
            if a != b {
                return Err(cx.err(format!(
                    "cannot reshape {} ({a} elements) to {}",
                    dims_str(&x.shape),
                    dims_str(&target)
                )));
            }
        }
        None
    };
    let shape = out
        .into_iter()
        .map(|d| d.or_else(|| fill.clone()).unwrap_or_else(|| cx.fresh()))
        .collect();
    let mut f = Fact::new(x.dtype, shape);
    f.value = x.value.clone();
    Ok(vec![f])
}

fn flatten(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let r = x.rank() as i64;
    let a = cx.node.attr_int("axis").unwrap_or(1);
    let a = if a < 0 { a + r } else { a };
    if !(0..=r).contains(&a) {
        return Err(cx.err(format!("axis {a} out of range for rank {r}")));
    }
    let (lo, hi) = x.shape.split_at(a as usize);
    let prod = |s: &[DimExpr]| s.iter().fold(k(1), |acc, d| acc.mul(d));
    let mut f = Fact::new(x.dtype, vec![prod(lo), prod(hi)]);
    f.value = x.value.clone();
    Ok(vec![f])
}

/// Axes from input 1 (opset ≥ 13) or the `axes` attribute.
fn axes_of(cx: &InferCx) -> Result<Option<Vec<i64>>> {
    if cx.opset >= 13 {
        match cx.opt_input(1) {
            Some(_) => Ok(Some(cx.input_ints(1)?)),
            None => Ok(None),
        }
    } else {
        Ok(cx.node.attr_ints("axes").map(<[i64]>::to_vec))
    }
}

fn squeeze(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let axes: Vec<usize> = match axes_of(cx)? {
        Some(a) => a
            .iter()
            .map(|&v| cx.axis(v, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..x.rank()).filter(|&i| x.shape[i] == k(1)).collect(),
    };
    if let Some(&a) = axes
        .iter()
        .find(|&&a| x.shape[a].as_known().is_some_and(|d| d != 1))
    {
        return Err(cx.err(format!(
            "cannot squeeze axis {a} of size {} in {}",
            x.shape[a],
            dims_str(&x.shape)
        )));
    }
    let shape = x
        .shape
        .iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, d)| d.clone())
        .collect();
    let mut f = Fact::new(x.dtype, shape);
    f.value = x.value.clone();
    Ok(vec![f])
}

fn unsqueeze(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let given = axes_of(cx)?.ok_or_else(|| cx.err("Unsqueeze needs axes"))?;
    let out_rank = x.rank() + given.len();
    let mut axes: Vec<usize> = given
        .iter()
        .map(|&a| cx.axis(a, out_rank))
        .collect::<Result<_>>()?;
    axes.sort_unstable();
    // ONNX requires distinct axes; a repeated one would insert past the end of the shape.
    if axes.windows(2).any(|w| w[0] == w[1]) {
        return Err(cx.err(format!(
            "Unsqueeze axes {given:?} name an output axis twice (output rank {out_rank})"
        )));
    }
    let mut shape = x.shape.clone();
    for a in axes {
        shape.insert(a, k(1));
    }
    let mut f = Fact::new(x.dtype, shape);
    f.value = x.value.clone();
    Ok(vec![f])
}

fn transpose(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let perm: Vec<usize> = match cx.node.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| cx.axis(a, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..x.rank()).rev().collect(),
    };
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return Err(cx.err(format!(
            "perm {:?} is not a permutation of rank {}",
            cx.node.attr_ints("perm").unwrap_or_default(),
            x.rank()
        )));
    }
    Ok(vec![Fact::new(
        x.dtype,
        perm.iter().map(|&p| x.shape[p].clone()).collect(),
    )])
}

fn concat(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let first = cx.input(0)?;
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(0), first.rank())?;
    let mut shape = first.shape.clone();
    let mut total = Some(first.shape[axis].clone());
    let mut values = first.value.clone();
    for i in 1..cx.inputs.len() {
        let f = cx.input(i)?;
        if f.rank() != first.rank() {
            return Err(cx.err(format!(
                "inputs of different ranks: {} and {}",
                dims_str(&first.shape),
                dims_str(&f.shape)
            )));
        }
        let clash = (0..f.rank()).find(|&d| {
            d != axis
                && matches!((shape[d].as_known(), f.shape[d].as_known()), (Some(p), Some(q)) if p != q)
        });
        if let Some(d) = clash {
            return Err(cx.err(format!(
                "inputs differ on axis {d}, which is not the concat axis: {} and {}",
                dims_str(&first.shape),
                dims_str(&f.shape)
            )));
        }
        for d in (0..f.rank()).filter(|&d| d != axis) {
            cx.unify(&shape[d], &f.shape[d]);
        }
        total = total.and_then(|t| t.add(&f.shape[axis]));
        values = match (values, &f.value) {
            (Some(mut a), Some(b)) if first.rank() <= 1 => {
                a.extend(b.iter().cloned());
                Some(a)
            }
            _ => None,
        };
    }
    shape[axis] = total.unwrap_or_else(|| cx.fresh());
    let mut f = Fact::new(first.dtype, shape);
    f.value = values;
    Ok(vec![f])
}

fn split(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(0), x.rank())?;
    let n = cx.node.outputs.len();
    let sizes: Vec<DimExpr> = if cx.opset >= 13 && cx.opt_input(1).is_some() {
        // Sizes may be symbolic (computed from a Shape), so take the contents, not just ints.
        cx.input(1)?
            .value
            .clone()
            .ok_or_else(|| cx.err("the split sizes are not known at compile time"))?
    } else if let Some(s) = cx.node.attr_ints("split") {
        s.iter().map(|&v| k(v)).collect()
    } else {
        // The sizes are allocated per part: a num_outputs other than the node's own output
        // count (ONNX requires them equal) aborted on a 64 GiB allocation.
        if let Some(v) = cx.node.attr_int("num_outputs").filter(|&v| v != n as i64) {
            return Err(cx.err(format!("num_outputs is {v} but the node has {n} outputs")));
        }
        let parts = n;
        if parts == 0 {
            return Err(cx.err("Split into 0 outputs"));
        }
        let d = &x.shape[axis];
        match d.as_known() {
            Some(len) => {
                if len < 0 {
                    return Err(cx.err(format!("cannot split an axis of size {len}")));
                }
                // Opset 18: the last chunk may be smaller. Written so that a size near
                // i64::MAX (a mutated Reshape can make one) cannot overflow.
                let p = parts as i64;
                let chunk = len / p + i64::from(len % p != 0);
                (0..parts)
                    .map(|i| {
                        k(chunk
                            .min(len.saturating_sub(chunk.saturating_mul(i as i64)))
                            .max(0))
                    })
                    .collect()
            }
            None => {
                let each = d.div(&k(parts as i64)).unwrap_or_else(|| cx.fresh());
                vec![each; parts]
            }
        }
    };
    if sizes.len() != n {
        return Err(cx.err(format!("{} split sizes for {n} outputs", sizes.len())));
    }
    let known: Option<Vec<i64>> = sizes.iter().map(DimExpr::as_known).collect();
    if let (Some(len), Some(known)) = (x.shape[axis].as_known(), known) {
        let sum = known.iter().try_fold(0i64, |a, &v| a.checked_add(v));
        if known.iter().any(|&v| v < 0) || sum != Some(len) {
            return Err(cx.err(format!(
                "split sizes {known:?} do not add up to {len}, the size of axis {axis}"
            )));
        }
    }
    Ok(sizes
        .into_iter()
        .map(|s| {
            let mut shape = x.shape.clone();
            shape[axis] = s;
            Fact::new(x.dtype, shape)
        })
        .collect())
}

/// Resolves one Slice bound against a dim, following the ONNX clamping rules; `None` when
/// the dim is symbolic and the bound depends on its value.
fn slice_len(dim: &DimExpr, start: &DimExpr, end: &DimExpr, step: i64) -> Option<DimExpr> {
    match (dim.as_known(), start.as_known(), end.as_known()) {
        (Some(d), Some(s), Some(e)) => {
            // i128: bounds like INT64_MIN and steps like INT64_MAX must not overflow.
            if d <= 0 {
                // Empty axis (and `clamp` below needs d ≥ 1 for a negative step).
                return Some(k(0));
            }
            let (d, s, e, step) = (d as i128, s as i128, e as i128, step as i128);
            let wrap = |v: i128| if v < 0 { v + d } else { v };
            // ONNX: for a negative step, starts clamp to [0, d-1] and ends to [-1, d-1].
            let (s, e) = if step > 0 {
                (wrap(s).clamp(0, d), wrap(e).clamp(0, d))
            } else {
                (wrap(s).clamp(0, d - 1), wrap(e).clamp(-1, d - 1))
            };
            let n = if step > 0 {
                (e - s + step - 1).div_euclid(step)
            } else {
                (s - e - step - 1).div_euclid(-step)
            };
            Some(k(n.max(0) as i64))
        }
        // The whole symbolic axis: `0..INT_MAX` (exporters' "to the end").
        (None, Some(0), Some(e)) if step == 1 && e >= i32::MAX as i64 => Some(dim.clone()),
        // `0..n` of a symbolic axis whose end is itself symbolic (e.g. `[:seq]`): the end.
        (None, Some(0), None) if step == 1 && end == dim => Some(dim.clone()),
        (_, Some(0), None) if step == 1 && end.is_symbolic() => Some(end.clone()),
        _ => None,
    }
}

fn slice(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let r = x.rank();
    let vals = |i: usize| -> Result<Vec<DimExpr>> {
        cx.input(i)?
            .value
            .clone()
            .ok_or_else(|| cx.err(format!("input {i} of Slice must be known at compile time")))
    };
    let (starts, ends) = (vals(1)?, vals(2)?);
    let axes: Vec<usize> = match cx.opt_input(3) {
        Some(_) => cx
            .input_ints(3)?
            .iter()
            .map(|&a| cx.axis(a, r))
            .collect::<Result<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps: Vec<i64> = match cx.opt_input(4) {
        Some(_) => cx.input_ints(4)?,
        None => vec![1; starts.len()],
    };
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(cx.err("starts, ends, axes and steps differ in length"));
    }
    let mut shape = x.shape.clone();
    for (j, &a) in axes.iter().enumerate() {
        if steps[j] == 0 {
            return Err(cx.err("a step of 0"));
        }
        shape[a] =
            slice_len(&x.shape[a], &starts[j], &ends[j], steps[j]).unwrap_or_else(|| cx.fresh());
    }
    let mut f = Fact::new(x.dtype, shape);
    // Contents of a sliced 1-D shape vector.
    if let (Some(v), 1, Some(s), Some(e)) = (&x.value, r, starts[0].as_known(), ends[0].as_known())
    {
        if steps[0] == 1 {
            let n = v.len() as i64;
            let s = (if s < 0 { s + n } else { s }).clamp(0, n) as usize;
            let e = (if e < 0 { e + n } else { e }).clamp(0, n) as usize;
            f.value = Some(v[s..e.max(s)].to_vec());
        }
    }
    Ok(vec![f])
}

fn gather(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (x, idx) = (cx.input(0)?, cx.input(1)?);
    if x.rank() == 0 {
        return Err(cx.err("Gather on a scalar"));
    }
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(0), x.rank())?;
    let mut shape = x.shape[..axis].to_vec();
    shape.extend(idx.shape.iter().cloned());
    shape.extend(x.shape[axis + 1..].iter().cloned());
    let mut f = Fact::new(x.dtype, shape);
    if let (Some(v), Some(ix), 1) = (&x.value, idx.known_ints(), x.rank()) {
        let n = v.len() as i64;
        f.value = ix
            .iter()
            .map(|&i| v.get((if i < 0 { i + n } else { i }) as usize).cloned())
            .collect();
    }
    Ok(vec![f])
}

fn gather_elements(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (x, idx) = (cx.input(0)?, cx.input(1)?);
    Ok(vec![Fact::new(x.dtype, idx.shape.clone())])
}

fn gather_nd(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (x, idx) = (cx.input(0)?, cx.input(1)?);
    let b = cx.node.attr_int("batch_dims").unwrap_or(0);
    let last = idx
        .shape
        .last()
        .and_then(DimExpr::as_known)
        .ok_or_else(|| cx.err("the last dim of the indices must be known"))?;
    // Both come from the file: a negative one cast to usize overflowed the sum.
    let end = usize::try_from(b)
        .ok()
        .zip(usize::try_from(last).ok())
        .and_then(|(b, l)| b.checked_add(l))
        .filter(|&e| e <= x.rank());
    let Some(end) = end else {
        return Err(cx.err(format!(
            "indices do not fit the data's rank {} (batch_dims {b}, index length {last})",
            x.rank()
        )));
    };
    let mut shape = idx.shape[..idx.rank() - 1].to_vec();
    shape.extend(x.shape[end..].iter().cloned());
    Ok(vec![Fact::new(x.dtype, shape)])
}

/// ScatterND: the data's type and shape (the updates land inside it).
fn scatter_nd(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

fn expand(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let target = cx
        .input(1)?
        .value
        .clone()
        .ok_or_else(|| cx.err("the target shape is not known at compile time"))?;
    let shape = cx.broadcast(&[&x.shape, &target])?;
    let mut f = Fact::new(x.dtype, shape);
    if x.rank() <= 1 && f.known_numel() == x.value.as_ref().map(|v| v.len() as i64) {
        f.value = x.value.clone();
    }
    Ok(vec![f])
}

fn tile(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let reps = cx
        .input(1)?
        .value
        .clone()
        .ok_or_else(|| cx.err("repeats must be known at compile time"))?;
    if reps.len() != x.rank() {
        return Err(cx.err("repeats and rank differ"));
    }
    let shape = x.shape.iter().zip(&reps).map(|(d, r)| d.mul(r)).collect();
    Ok(vec![Fact::new(x.dtype, shape)])
}

fn range(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let start = cx.input(0)?;
    let scalar = |f: &Fact| f.value.as_ref().and_then(|v| v.first().cloned());
    let (s, l, d) = (scalar(start), scalar(cx.input(1)?), scalar(cx.input(2)?));
    let len = match (&s, &l, &d) {
        (Some(s), Some(l), Some(d)) => match (s.as_known(), l.as_known(), d.as_known()) {
            (Some(s), Some(l), Some(d)) if d != 0 => {
                // ceil((l - s) / d) in i128: no overflow, no float rounding.
                let (a, d) = (l as i128 - s as i128, d as i128);
                let (a, d) = if d < 0 { (-a, -d) } else { (a, d) };
                let n = (a + d - 1).div_euclid(d);
                Some(k(n.clamp(0, i64::MAX as i128) as i64))
            }
            (Some(0), None, Some(1)) => Some(l.clone()),
            _ => None,
        },
        _ => None,
    };
    let len = len.unwrap_or_else(|| cx.fresh());
    let mut f = Fact::new(start.dtype, vec![len.clone()]);
    if let (Some(n), Some(s), Some(d)) = (
        len.as_known(),
        s.as_ref().and_then(DimExpr::as_known),
        d.as_ref().and_then(DimExpr::as_known),
    ) {
        if start.dtype.is_integer() && n as usize <= MAX_TRACKED_VALUES {
            // Every element lies between start and limit, so none overflows.
            f.value = Some(
                (0..n)
                    .map(|i| k(s.wrapping_add(i.wrapping_mul(d))))
                    .collect(),
            );
        }
    }
    Ok(vec![f])
}

fn constant_of_shape(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let shape = cx
        .input(0)?
        .value
        .clone()
        .ok_or_else(|| cx.err("the shape is not known at compile time"))?;
    if let Some(d) = shape.iter().find(|d| d.as_known().is_some_and(|v| v < 0)) {
        return Err(cx.err(format!(
            "negative dim {d} in the shape {}",
            dims_str(&shape)
        )));
    }
    let value = cx.node.attr_tensor("value");
    let dtype = value.map(|t| t.dtype).unwrap_or(DataType::Float);
    let mut f = Fact::new(dtype, shape);
    if let (Some(t), Some(n)) = (value, f.known_numel()) {
        if dtype.is_integer() && n as usize <= MAX_TRACKED_VALUES {
            if let Some(v) = t.to_i64_vec().and_then(|v| v.first().copied()) {
                f.value = Some(vec![k(v); n as usize]);
            }
        }
    }
    Ok(vec![f])
}

fn constant(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let a = cx
        .node
        .attributes
        .first()
        .ok_or_else(|| cx.err("Constant without a value attribute"))?;
    Ok(vec![match (&a.name[..], &a.value) {
        ("value", AttrValue::Tensor(t)) => tensor_fact(t),
        ("value_float", AttrValue::Float(_)) => Fact::new(DataType::Float, vec![]),
        ("value_floats", AttrValue::Floats(v)) => {
            Fact::new(DataType::Float, vec![k(v.len() as i64)])
        }
        ("value_int", AttrValue::Int(v)) => {
            Fact::new(DataType::Int64, vec![]).with_value(vec![k(*v)])
        }
        ("value_ints", AttrValue::Ints(v)) => Fact::new(DataType::Int64, vec![k(v.len() as i64)])
            .with_value(v.iter().map(|&x| k(x)).collect()),
        ("value_string", AttrValue::String(_)) => Fact::new(DataType::String, vec![]),
        ("value_strings", AttrValue::Strings(v)) => {
            Fact::new(DataType::String, vec![k(v.len() as i64)])
        }
        (name, _) => return Err(cx.err(format!("unsupported Constant attribute '{name}'"))),
    }])
}

fn pad(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let pads = cx.input_ints(1)?;
    let r = x.rank();
    let axes: Vec<usize> = match cx.opt_input(3) {
        Some(_) => cx
            .input_ints(3)?
            .iter()
            .map(|&a| cx.axis(a, r))
            .collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(cx.err("pads must hold two values per axis"));
    }
    let mut shape = x.shape.clone();
    for (j, &a) in axes.iter().enumerate() {
        let extra = k(pads[j] + pads[j + axes.len()]);
        shape[a] = shape[a].add(&extra).unwrap_or_else(|| cx.fresh());
    }
    Ok(vec![Fact::new(x.dtype, shape)])
}

#[cfg(test)]
mod tests {
    use crate::ir::{AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo, ValueType};
    use crate::shape::infer_graph;

    fn graph_with_x() -> Graph {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo::new(
            "x",
            ValueType::tensor(
                DataType::Float,
                vec![
                    Dim::Sym("batch".into()),
                    Dim::Sym("seq".into()),
                    Dim::Known(64),
                ],
            ),
        ));
        g
    }

    #[test]
    fn reshape_through_a_shape_chain_and_back() {
        let mut g = graph_with_x();
        let i64s = |name: &str, v: &[i64]| Tensor::from_i64(name, vec![v.len() as i64], v);
        g.initializers
            .insert("flat".into(), i64s("flat", &[-1, 64]));
        g.initializers
            .insert("i0".into(), Tensor::from_i64("i0", vec![], &[0]));
        g.initializers
            .insert("i1".into(), Tensor::from_i64("i1", vec![], &[1]));
        g.initializers.insert("ax0".into(), i64s("ax0", &[0]));
        g.initializers.insert("c64".into(), i64s("c64", &[64]));
        let n = |op: &str, name: &str, i: &[&str], o: &str| {
            Node::new(
                op,
                name,
                i.iter().map(|s| s.to_string()).collect(),
                vec![o.to_string()],
            )
        };
        g.nodes.push(n("Reshape", "r1", &["x", "flat"], "x2"));
        g.nodes.push(n("Shape", "sh", &["x"], "s"));
        g.nodes.push(n("Gather", "g0", &["s", "i0"], "b"));
        g.nodes.push(n("Gather", "g1", &["s", "i1"], "q"));
        g.nodes.push(n("Unsqueeze", "u0", &["b", "ax0"], "b1"));
        g.nodes.push(n("Unsqueeze", "u1", &["q", "ax0"], "q1"));
        g.nodes.push(
            n("Concat", "cat", &["b1", "q1", "c64"], "target").with_attr("axis", AttrValue::Int(0)),
        );
        g.nodes.push(n("Reshape", "r2", &["x2", "target"], "x3"));
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("x2").unwrap().display(), "f32[batch*seq, 64]");
        assert_eq!(f.get("x3").unwrap().display(), "f32[batch, seq, 64]");
    }

    #[test]
    fn slice_to_int64_max_split_and_transpose() {
        let mut g = graph_with_x();
        let i64s = |name: &str, v: &[i64]| Tensor::from_i64(name, vec![v.len() as i64], v);
        g.initializers.insert("st".into(), i64s("st", &[0, 16]));
        g.initializers
            .insert("en".into(), i64s("en", &[i64::MAX, 48]));
        g.initializers.insert("ax".into(), i64s("ax", &[1, 2]));
        g.initializers.insert("sp".into(), i64s("sp", &[16, 48]));
        g.nodes.push(Node::new(
            "Slice",
            "sl",
            vec!["x".into(), "st".into(), "en".into(), "ax".into()],
            vec!["y".into()],
        ));
        g.nodes.push(
            Node::new(
                "Split",
                "split",
                vec!["x".into(), "sp".into()],
                vec!["a".into(), "b".into()],
            )
            .with_attr("axis", AttrValue::Int(-1)),
        );
        g.nodes.push(
            Node::new("Transpose", "t", vec!["x".into()], vec!["t".into()])
                .with_attr("perm", AttrValue::Ints(vec![0, 2, 1])),
        );
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("y").unwrap().display(), "f32[batch, seq, 32]");
        assert_eq!(f.get("a").unwrap().display(), "f32[batch, seq, 16]");
        assert_eq!(f.get("b").unwrap().display(), "f32[batch, seq, 48]");
        assert_eq!(f.get("t").unwrap().display(), "f32[batch, 64, seq]");
    }
}
