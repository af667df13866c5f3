//! Splits a fused projection into one linear op per column block.
//!
//! GPT-2's `c_attn` computes q|k|v with one `[in, 3·d]` weight, Phi-3's `qkv_proj` with
//! grouped-query attention one `[in, dq + 2·dkv]` weight (e.g. q 64 | k 32 | v 32). peft can
//! only adapt it whole; we let users adapt single blocks (`c_attn:q,v`) by rewriting
//! `y = Gemm(x, W, b)` into `y = Concat(Gemm(x, W_q, b_q), Gemm(x, W_k, b_k), Gemm(x, W_v, b_v))`.
//! Per-output-feature norms make DoRA on a block identical to DoRA on a standalone matrix, so
//! the block ops are then adapted like any other target. Outputs are unchanged bit for bit up to
//! the matmul's summation order.
//!
//! The block widths come from the graph, from how the model itself cuts the fused output
//! ([`crate::targets::blocks::block_widths`]): a `Split` into three, or three `Slice`s tiling the features. The weight's
//! width alone cannot tell 64|32|32 from three equal blocks.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::names::Names;
use crate::ir::{AttrValue, Graph, Node, Tensor};
use crate::targets::blocks::block_widths;
use crate::targets::{Block, Candidate, Layout, Selected};

/// Splits every selection that names blocks and returns the selections re-pointed at the new
/// per-block ops (one per requested block), in graph order. Others pass through.
pub fn split_fused(
    graph: &mut Graph,
    selected: Vec<Selected>,
) -> Result<Vec<(Selected, Option<Block>)>> {
    if selected.iter().all(|s| s.blocks.is_none()) {
        return Ok(selected.into_iter().map(|s| (s, None)).collect());
    }
    // Everything read from the graph is gathered first, once, so the pass stays linear in
    // the graph however many fused projections it splits.
    let position: HashMap<String, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let mut plans = vec![];
    {
        let consumers = graph.consumers();
        let producers = graph.producers();
        for sel in &selected {
            if sel.blocks.is_none() {
                continue;
            }
            let c = &sel.candidate;
            let idx = *position
                .get(&c.node)
                .ok_or_else(|| rewrite_err(c, "node vanished before the split".into()))?;
            let widths = block_widths(
                graph,
                &consumers,
                &producers,
                &graph.nodes[idx],
                c.out_features,
            )
            .map_err(|msg| rewrite_err(c, msg))?;
            plans.push((idx, widths));
        }
    }
    let mut names = Names::of(graph);
    let mut replacements: HashMap<usize, Vec<Node>> = HashMap::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let mut plans = plans.into_iter();
    let mut out = vec![];
    for sel in selected {
        let Some(blocks) = sel.blocks.clone() else {
            out.push((sel, None));
            continue;
        };
        let (idx, widths) = plans.next().expect("one plan per fused selection");
        let c = &sel.candidate;
        let node = graph.nodes[idx].clone();
        let (new_nodes, block_nodes) = split_one(graph, &mut names, &node, c, widths)?;
        replaced.insert(c.weight.clone());
        if let Some(b) = node.input(2) {
            replaced.insert(b.to_string());
        }
        if replacements.insert(idx, new_nodes).is_some() {
            return Err(rewrite_err(c, "selected twice".into()));
        }
        for b in blocks {
            let j = b.index();
            let (node_name, weight, transpose) = block_nodes[j].clone();
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
                        out_features: widths[j],
                        unsupported: None,
                        fused_weight: Some(c.weight.clone()),
                        block_offset: Some(widths[..j].iter().sum()),
                        fused_out_features: Some(c.out_features),
                    },
                    blocks: None,
                },
                Some(b),
            ));
        }
    }
    let old = std::mem::take(&mut graph.nodes);
    graph.nodes = old
        .into_iter()
        .enumerate()
        .flat_map(|(i, n)| replacements.remove(&i).unwrap_or_else(|| vec![n]))
        .collect();
    remove_unused(graph, &replaced);
    Ok(out)
}

fn rewrite_err(c: &Candidate, msg: String) -> Error {
    Error::Rewrite {
        node: format!("{} node '{}'", c.op, c.node),
        msg,
    }
}

/// The nodes replacing the fused `node` and, per block q, k, v: (linear node name, weight
/// name, transpose node name).
type BlockNodes = Vec<(String, String, Option<String>)>;

fn split_one(
    graph: &mut Graph,
    names: &mut Names,
    node: &Node,
    c: &Candidate,
    widths: [i64; 3],
) -> Result<(Vec<Node>, BlockNodes)> {
    let err = |msg: String| rewrite_err(c, msg);
    let w = &graph.initializers[&c.weight];
    let wv = w.to_f32_vec().ok_or_else(|| {
        err(format!(
            "weight '{}' is {}, not f32",
            w.name,
            w.dtype.short_name()
        ))
    })?;
    let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
    // A 1-D bias of all the features splits with the weight; any other C is added after the
    // Concat.
    let bias = node.input(2).and_then(|b| graph.constant(b)).cloned();
    let split_bias = bias
        .as_ref()
        .filter(|t| t.dims == [c.out_features])
        .and_then(|t| t.to_f32_vec());
    let out_name = node.outputs[0].clone();
    let mut new_nodes = vec![];
    let mut result = vec![];
    let mut parts = vec![];
    let mut lo = 0usize;
    for b in Block::ALL {
        let d = widths[b.index()] as usize;
        let hi = lo + d;
        let (vals, dims): (Vec<f32>, Vec<i64>) = match c.layout {
            Layout::InOut => (
                (0..rows)
                    .flat_map(|i| wv[i * cols + lo..i * cols + hi].iter().copied())
                    .collect(),
                vec![rows as i64, d as i64],
            ),
            Layout::OutIn => (
                wv[lo * cols..hi * cols].to_vec(),
                vec![d as i64, cols as i64],
            ),
        };
        let wname = names.value(&format!("{}.{}", c.weight, b.name()));
        graph
            .initializers
            .insert(wname.clone(), Tensor::from_f32(wname.clone(), dims, &vals));
        let node_name = names.node(&format!("{}.{}", c.node, b.name()));
        let y = names.value(&format!("{out_name}.{}", b.name()));
        let mut transpose = None;
        let mut inputs = vec![node.inputs[0].clone(), wname.clone()];
        if let Some(tname) = &c.transpose {
            let t_out = names.value(&format!("{wname}.T"));
            let t_node = names.node(&format!("{tname}.{}", b.name()));
            let t = Node::new(
                "Transpose",
                t_node.clone(),
                vec![wname.clone()],
                vec![t_out.clone()],
            )
            .with_attr("perm", AttrValue::Ints(vec![1, 0]));
            new_nodes.push(t);
            transpose = Some(t_node);
            inputs[1] = t_out;
        }
        if let Some(bv) = &split_bias {
            let bname = names.value(&format!("{}.{}", node.inputs[2], b.name()));
            graph.initializers.insert(
                bname.clone(),
                Tensor::from_f32(bname.clone(), vec![d as i64], &bv[lo..hi]),
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
        lo = hi;
    }
    let concat_out = if bias.is_some() && split_bias.is_none() {
        names.value(&format!("{out_name}.qkv"))
    } else {
        out_name.clone()
    };
    new_nodes.push(
        Node::new(
            "Concat",
            names.node(&format!("{}.concat", c.node)),
            parts,
            vec![concat_out.clone()],
        )
        .with_attr("axis", AttrValue::Int(-1)),
    );
    if let (Some(_), None) = (&bias, &split_bias) {
        new_nodes.push(Node::new(
            "Add",
            names.node(&format!("{}.bias", c.node)),
            vec![concat_out, node.inputs[2].clone()],
            vec![out_name],
        ));
    }
    Ok((new_nodes, result))
}

/// Drops the fused weights, their Transposes and split biases (`replaced`) once nothing reads
/// them: one pass over the graph for all the splits.
fn remove_unused(graph: &mut Graph, replaced: &HashSet<String>) {
    if replaced.is_empty() {
        return;
    }
    let read = |g: &Graph| -> HashSet<String> {
        g.nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(g.outputs.iter().map(|o| o.name.clone()))
            .collect()
    };
    let used = read(graph);
    graph.nodes.retain(|n| {
        !(n.op_type == "Transpose"
            && n.input(0).is_some_and(|w| replaced.contains(w))
            && n.outputs.iter().all(|o| !used.contains(o)))
    });
    let used = read(graph);
    graph
        .initializers
        .retain(|name, _| !replaced.contains(name) || used.contains(name));
}
