//! Folds frozen low-rank factors into their weight for programs that never differentiate them.
//!
//! The lowering ([`super::lower`]) keeps a DoRA/LoRA layer factored, `x·W + s·(x·A)·B`, because
//! a pass that trains A and B needs `x·A` and must not pay for a dense `[in, out]` gradient of
//! a merged weight. BiDoRA's mixed-term passes (`fd`, `fd-forward`, `betty`) differentiate only
//! the magnitudes: A and B are constants there, so the layer is one matmul with
//! `V' = W + s·A·B` (an `[in, out]` sum, costing `r·in·out` once instead of two `[tokens, out]`
//! matmuls, an elementwise scale and an add in the forward, and two more matmuls and an add
//! into `∂x` in the backward). The norm and magnitude scaling are left as they are.
//!
//! The rewrite matches exactly what `lower_adapter` emits,
//! `Add(base, Mul(MatMul(MatMul(x, A), B), s))` with `base = MatMul(x, W)` or
//! `Gemm(x, W, transB=1)`, A and B frozen graph inputs and `s` a constant, and leaves anything
//! else alone: it is a plain algebraic identity, so the program computes the same function.

use std::collections::HashSet;

use crate::error::Result;
use crate::ir::builder::Builder;
use crate::ir::{AttrValue, Graph, Model, Node};

/// Returns `model` with every factored adapter whose A and B are in `frozen` (graph inputs
/// that the program treats as constants) computed through its merged weight.
pub fn merge_frozen_factors(model: &Model, frozen: &[String]) -> Result<Model> {
    let mut model = model.clone();
    let g = &mut model.graph;
    let frozen: HashSet<&str> = frozen
        .iter()
        .map(String::as_str)
        .filter(|n| g.is_graph_input(n))
        .collect();
    let mut dead: Vec<String> = vec![];
    let mut i = 0;
    while i < g.nodes.len() {
        let Some(m) = match_adapter(g, &g.nodes[i], &frozen) else {
            i += 1;
            continue;
        };
        let sum = g.nodes[i].outputs[0].clone();
        let prefix = g.nodes[i].name.trim_end_matches(".sum").to_string();
        let mut b = Builder::new(g, prefix);
        let (x, w, a, bb, s) = (&m.x, &m.w, &m.a, &m.b, &m.scale);
        if m.transposed {
            // W is [out, in]: add (A·B)ᵀ = Bᵀ·Aᵀ and keep the Gemm's transB.
            let abt = b.op(
                "Gemm",
                "merged.ABt",
                &[bb, a],
                vec![("transA", AttrValue::Int(1)), ("transB", AttrValue::Int(1))],
            );
            let sab = b.op("Mul", "merged.sAB", &[&abt, s], vec![]);
            let v = b.op("Add", "merged.W", &[w, &sab], vec![]);
            b.op_into(
                "Gemm",
                "merged.out",
                &[x, &v],
                vec![("transB", AttrValue::Int(1))],
                sum,
            );
        } else {
            let ab = b.op("MatMul", "merged.AB", &[a, bb], vec![]);
            let sab = b.op("Mul", "merged.sAB", &[&ab, s], vec![]);
            let v = b.op("Add", "merged.W", &[w, &sab], vec![]);
            b.op_into("MatMul", "merged.out", &[x, &v], vec![], sum);
        }
        let new = b.finish();
        let n = new.len();
        g.nodes.splice(i..=i, new);
        i += n;
        dead.extend(m.replaced);
    }
    remove_unused(g, &dead);
    Ok(model)
}

/// One matched factored adapter.
struct Matched {
    x: String,
    w: String,
    a: String,
    b: String,
    scale: String,
    transposed: bool,
    /// Outputs of the nodes the merged form replaces (base, x·A, x·A·B, the scaled delta).
    replaced: Vec<String>,
}

fn match_adapter(g: &Graph, add: &Node, frozen: &HashSet<&str>) -> Option<Matched> {
    if !add.domain.is_empty() || add.op_type != "Add" || add.inputs.len() != 2 {
        return None;
    }
    let producer = |v: &str| {
        g.nodes
            .iter()
            .find(|n| n.domain.is_empty() && n.outputs.iter().any(|o| o == v))
    };
    let plain = |n: &Node, op: &str, arity: usize| {
        n.op_type == op && n.inputs.len() == arity && n.outputs.len() == 1
    };
    let base = producer(&add.inputs[0])?;
    let delta = producer(&add.inputs[1])?;
    if !plain(delta, "Mul", 2) {
        return None;
    }
    let scale = delta.inputs[1].clone();
    if g.constant(&scale).and_then(|t| t.numel()) != Some(1) {
        return None;
    }
    let xab = producer(&delta.inputs[0])?;
    if !plain(xab, "MatMul", 2) || !frozen.contains(xab.inputs[1].as_str()) {
        return None;
    }
    let xa = producer(&xab.inputs[0])?;
    if !plain(xa, "MatMul", 2) || !frozen.contains(xa.inputs[1].as_str()) {
        return None;
    }
    let x = xa.inputs[0].clone();
    let transposed = if plain(base, "MatMul", 2) && base.attributes.is_empty() {
        false
    } else if plain(base, "Gemm", 2)
        && base.attr_int("transB") == Some(1)
        && base.attributes.len() == 1
    {
        true
    } else {
        return None;
    };
    if base.inputs[0] != x {
        return None;
    }
    Some(Matched {
        x,
        w: base.inputs[1].clone(),
        a: xa.inputs[1].clone(),
        b: xab.inputs[1].clone(),
        scale,
        transposed,
        replaced: [base, xa, xab, delta]
            .iter()
            .map(|n| n.outputs[0].clone())
            .collect(),
    })
}

/// Drops the replaced nodes whose outputs nothing reads any more (the lowering gives them no
/// other consumer, but a value that is also read elsewhere, or a graph output, stays).
fn remove_unused(g: &mut Graph, candidates: &[String]) {
    loop {
        let used: HashSet<String> = g
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(g.outputs.iter().map(|o| o.name.clone()))
            .collect();
        let before = g.nodes.len();
        g.nodes.retain(|n| {
            !(n.outputs.len() == 1
                && candidates.contains(&n.outputs[0])
                && !used.contains(&n.outputs[0]))
        });
        if g.nodes.len() == before {
            break;
        }
    }
}
