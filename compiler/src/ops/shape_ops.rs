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

// ---------------------------------------------------------------------------------------------
// Gradient rules. Data-movement ops move the gradient back: reshaping ops reshape it to the
// input's runtime shape, Transpose inverts its permutation, Concat slices, Split concatenates,
// Slice pads, Expand sums over the broadcast axes, GatherND and ScatterND undo each other.

pub(crate) mod grads {
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
            out.push(if cx.needs(i) {
                Some(cx.op("Slice", "dx", &[&g, &start, &end, &axes]))
            } else {
                None
            });
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
            let d = xs[ax as usize].as_known().ok_or_else(|| {
                cx.err("gradient of Slice along a symbolic axis is not supported")
            })?;
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
}
