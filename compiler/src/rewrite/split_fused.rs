//! Splits a fused projection into one linear op per column block.
//!
//! GPT-2's `c_attn` computes q|k|v with one `[in, 3·d]` weight. peft can only adapt it whole;
//! we let users adapt single blocks (`c_attn:q,v`) by rewriting
//! `y = Gemm(x, W, b)` into `y = Concat(Gemm(x, W_q, b_q), Gemm(x, W_k, b_k), Gemm(x, W_v, b_v))`.
//! Per-output-feature norms make DoRA on a block identical to DoRA on a standalone matrix, so
//! the block ops are then adapted like any other target. Outputs are unchanged bit for bit up to
//! the matmul's summation order.

use crate::error::{Error, Result};
use crate::ir::{AttrValue, Graph, Node, Tensor};
use crate::targets::{Block, Candidate, Layout, Selected};

/// Splits every selection that names blocks and returns the selections re-pointed at the new
/// per-block ops (one per requested block), in graph order. Others pass through.
pub fn split_fused(
    graph: &mut Graph,
    selected: Vec<Selected>,
) -> Result<Vec<(Selected, Option<Block>)>> {
    let mut out = vec![];
    for sel in selected {
        let Some(blocks) = sel.blocks.clone() else {
            out.push((sel, None));
            continue;
        };
        let block_nodes = split_one(graph, &sel.candidate)?;
        for b in blocks {
            let (node_name, weight, transpose) = block_nodes[b.index()].clone();
            let c = &sel.candidate;
            out.push((
                Selected {
                    candidate: Candidate {
                        module: c.module.clone(),
                        node_index: 0,
                        node: node_name,
                        op: c.op.clone(),
                        weight,
                        layout: c.layout,
                        transpose,
                        in_features: c.in_features,
                        out_features: c.out_features / 3,
                        unsupported: None,
                        fused_weight: Some(c.weight.clone()),
                    },
                    blocks: None,
                },
                Some(b),
            ));
        }
    }
    Ok(out)
}

/// Returns, per block q, k, v: (linear node name, weight name, transpose node name).
fn split_one(graph: &mut Graph, c: &Candidate) -> Result<Vec<(String, String, Option<String>)>> {
    let err = |msg: String| Error::Rewrite {
        node: format!("{} node '{}'", c.op, c.node),
        msg,
    };
    let idx = graph
        .nodes
        .iter()
        .position(|n| n.name == c.node)
        .ok_or_else(|| err("node vanished before the split".into()))?;
    let node = graph.nodes[idx].clone();
    let w = graph.initializers[&c.weight].clone();
    let wv = w.to_f32_vec().ok_or_else(|| {
        err(format!(
            "weight '{}' is {}, not f32",
            w.name,
            w.dtype.short_name()
        ))
    })?;
    let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
    let d = c.out_features as usize / 3;
    // A 1-D bias of 3·d features splits with the weight; any other C is added after the Concat.
    let bias = node.input(2).and_then(|b| graph.constant(b)).cloned();
    let split_bias = bias
        .as_ref()
        .filter(|t| t.dims == [c.out_features])
        .and_then(|t| t.to_f32_vec());
    let out_name = node.outputs[0].clone();
    let mut new_nodes = vec![];
    let mut result = vec![];
    let mut parts = vec![];
    for b in Block::ALL {
        let j = b.index();
        let (vals, dims): (Vec<f32>, Vec<i64>) = match c.layout {
            Layout::InOut => (
                (0..rows)
                    .flat_map(|i| wv[i * cols + j * d..i * cols + (j + 1) * d].iter().copied())
                    .collect(),
                vec![rows as i64, d as i64],
            ),
            Layout::OutIn => (
                wv[j * d * cols..(j + 1) * d * cols].to_vec(),
                vec![d as i64, cols as i64],
            ),
        };
        let wname = graph.fresh_name(&format!("{}.{}", c.weight, b.name()));
        graph
            .initializers
            .insert(wname.clone(), Tensor::from_f32(wname.clone(), dims, &vals));
        let node_name = format!("{}.{}", c.node, b.name());
        let y = graph.fresh_name(&format!("{out_name}.{}", b.name()));
        let mut transpose = None;
        let mut inputs = vec![node.inputs[0].clone(), wname.clone()];
        if let Some(tname) = &c.transpose {
            let t_out = graph.fresh_name(&format!("{wname}.T"));
            let t = Node::new(
                "Transpose",
                format!("{tname}.{}", b.name()),
                vec![wname.clone()],
                vec![t_out.clone()],
            )
            .with_attr("perm", AttrValue::Ints(vec![1, 0]));
            new_nodes.push(t);
            transpose = Some(format!("{tname}.{}", b.name()));
            inputs[1] = t_out;
        }
        if let Some(bv) = &split_bias {
            let bname = graph.fresh_name(&format!("{}.{}", node.inputs[2], b.name()));
            graph.initializers.insert(
                bname.clone(),
                Tensor::from_f32(bname.clone(), vec![d as i64], &bv[j * d..(j + 1) * d]),
            );
            inputs.push(bname);
        }
        let mut bn = node.clone();
        bn.name = node_name.clone();
        bn.inputs = inputs;
        bn.outputs = vec![y.clone()];
        new_nodes.push(bn);
        parts.push(y);
        result.push((node_name, wname, transpose));
    }
    let concat_out = if bias.is_some() && split_bias.is_none() {
        graph.fresh_name(&format!("{out_name}.qkv"))
    } else {
        out_name.clone()
    };
    new_nodes.push(
        Node::new(
            "Concat",
            format!("{}.concat", c.node),
            parts,
            vec![concat_out.clone()],
        )
        .with_attr("axis", AttrValue::Int(-1)),
    );
    if let (Some(_), None) = (&bias, &split_bias) {
        new_nodes.push(Node::new(
            "Add",
            format!("{}.bias", c.node),
            vec![concat_out, node.inputs[2].clone()],
            vec![out_name],
        ));
    }
    graph.nodes.splice(idx..=idx, new_nodes);
    remove_if_unused(graph, c.transpose.as_deref(), &c.weight);
    if split_bias.is_some() {
        let b = node.inputs[2].clone();
        if !graph.nodes.iter().any(|n| n.inputs.contains(&b)) {
            graph.initializers.shift_remove(&b);
        }
    }
    Ok(result)
}

/// Drops the fused weight (and its Transpose) once nothing reads them.
fn remove_if_unused(graph: &mut Graph, transpose: Option<&str>, weight: &str) {
    if let Some(t) = transpose {
        if let Some(i) = graph.nodes.iter().position(|n| n.name == t) {
            let out = graph.nodes[i].outputs[0].clone();
            if !graph.nodes.iter().any(|n| n.inputs.contains(&out)) {
                graph.nodes.remove(i);
            }
        }
    }
    let used = graph
        .nodes
        .iter()
        .any(|n| n.inputs.iter().any(|v| v == weight))
        || graph.outputs.iter().any(|o| o.name == weight);
    if !used {
        graph.initializers.shift_remove(weight);
    }
}
