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
//! ([`block_widths`]): a `Split` into three, or three `Slice`s tiling the features. The weight's
//! width alone cannot tell 64|32|32 from three equal blocks.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::names::Names;
use crate::ir::{AttrValue, Graph, Node, Tensor};
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

/// The widths of the q, k and v blocks of the fused linear `node` (`total` output features),
/// read from how the graph cuts its output (after a bias `Add` and `Reshape`s back from the
/// 2-D view GPT-2's Conv1D multiplies in, if they follow): one `Split` into three parts, or
/// `Slice`s with constant bounds (initializers or `Constant` nodes) and unit steps tiling
/// `[0, total)` in three. `Shape` readers are ignored. The cut's axis is not checked against
/// the rank (no shapes are known here): constant sizes summing exactly to the feature count
/// on another axis would be a coincidence, and shape inference checks the rewritten graph
/// afterwards.
pub fn block_widths(
    g: &Graph,
    consumers: &HashMap<&str, Vec<usize>>,
    producers: &HashMap<&str, usize>,
    node: &Node,
    total: i64,
) -> std::result::Result<[i64; 3], String> {
    let Some(mut v) = node.outputs.first().map(String::as_str) else {
        return Err("the node has no output".into());
    };
    let readers = |v: &str| -> Vec<&Node> {
        consumers
            .get(v)
            .into_iter()
            .flatten()
            .map(|&u| &g.nodes[u])
            .filter(|n| n.op_type != "Shape")
            .collect()
    };
    let ints = |name: Option<&str>| -> Option<Vec<i64>> {
        let name = name.filter(|s| !s.is_empty())?;
        let t = match g.constant(name) {
            Some(t) => t,
            None => {
                let p = &g.nodes[*producers.get(name)?];
                (p.op_type == "Constant").then(|| p.attr_tensor("value"))??
            }
        };
        t.to_i64_vec()
    };
    // At most a bias Add and two Reshapes (a few nodes, whatever the graph's size).
    for _ in 0..3 {
        let [next] = readers(v)[..] else { break };
        let is_bias = |i: &String| g.constant(i).is_some_and(|t| t.dims == [total]);
        let passes =
            (next.op_type == "Add" && next.inputs.iter().any(is_bias)) || next.op_type == "Reshape";
        if !passes {
            break;
        }
        v = next.outputs[0].as_str();
    }
    let users = readers(v);
    let found: Option<Vec<i64>> = match users.as_slice() {
        [split] if split.op_type == "Split" && split.outputs.len() == 3 => {
            match ints(split.input(1)).or_else(|| split.attr_ints("split").map(<[i64]>::to_vec)) {
                Some(sizes) => Some(sizes),
                // No sizes: equal parts (Split's default).
                None if total % 3 == 0 => Some(vec![total / 3; 3]),
                None => None,
            }
        }
        slices if !slices.is_empty() && slices.iter().all(|n| n.op_type == "Slice") => {
            let mut spans = vec![];
            for s in slices {
                let (Some(st), Some(en)) = (ints(s.input(1)), ints(s.input(2))) else {
                    return Err(format!(
                        "its output is cut by {} with non-constant bounds",
                        s.label()
                    ));
                };
                if st.len() != 1 || en.len() != 1 || ints(s.input(4)).is_some_and(|t| t != [1]) {
                    return Err(format!(
                        "its output is cut by {}, which is not a unit-step slice of one axis",
                        s.label()
                    ));
                }
                let clamp = |x: i64| (if x < 0 { x + total } else { x }).clamp(0, total);
                spans.push((clamp(st[0]), clamp(en[0])));
            }
            spans.sort();
            spans.dedup();
            let tiles = spans.first().is_some_and(|s| s.0 == 0)
                && spans.last().is_some_and(|s| s.1 == total)
                && spans.windows(2).all(|w| w[0].1 == w[1].0);
            tiles.then(|| spans.iter().map(|(a, b)| b - a).collect())
        }
        _ => None,
    };
    match found {
        Some(w) if w.len() == 3 && w.iter().all(|&x| x > 0) && w.iter().sum::<i64>() == total => {
            Ok([w[0], w[1], w[2]])
        }
        Some(w) => Err(format!(
            "its {total} output features are cut into {w:?}, not three q|k|v blocks; adapt the whole module (without ':q,v')"
        )),
        None => Err(format!(
            "cannot tell how its {total} output features split into q|k|v blocks: no Split into three or Slices tiling them read its output; adapt the whole module (without ':q,v')"
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `y = x · W[4, 16]`, read by `readers` (op, inputs after `y`, outputs).
    fn fused(readers: &[(&str, &[&str], usize)], consts: &[(&str, &[i64])]) -> Graph {
        let mut g = Graph::default();
        g.initializers
            .insert("W".into(), Tensor::from_f32("W", vec![4, 16], &[0.0; 64]));
        for (name, v) in consts {
            g.initializers.insert(
                name.to_string(),
                Tensor::from_i64(*name, vec![v.len() as i64], v),
            );
        }
        g.nodes.push(Node::new(
            "MatMul",
            "qkv",
            vec!["x".into(), "W".into()],
            vec!["y".into()],
        ));
        for (k, (op, ins, outs)) in readers.iter().enumerate() {
            let mut inputs = vec!["y".to_string()];
            inputs.extend(ins.iter().map(|s| s.to_string()));
            let outputs = (0..*outs).map(|o| format!("r{k}.{o}")).collect();
            g.nodes
                .push(Node::new(op, format!("r{k}"), inputs, outputs));
        }
        g
    }

    fn widths(g: &Graph) -> std::result::Result<[i64; 3], String> {
        block_widths(g, &g.consumers(), &g.producers(), &g.nodes[0], 16)
    }

    #[test]
    fn block_widths_come_from_the_graphs_cut() {
        // Phi-3 style: q | k | v sliced with [..., :8], [..., 8:12], [..., 12:] (an open end).
        let slices = fused(
            &[
                ("Slice", &["s0", "e0", "ax"], 1),
                ("Slice", &["s1", "e1", "ax"], 1),
                ("Slice", &["s2", "e2", "ax"], 1),
                ("Shape", &[], 1),
            ],
            &[
                ("s0", &[0]),
                ("e0", &[8]),
                ("s1", &[8]),
                ("e1", &[12]),
                ("s2", &[-4]),
                ("e2", &[i64::MAX]),
                ("ax", &[-1]),
            ],
        );
        assert_eq!(widths(&slices), Ok([8, 4, 4]));
        // GPT-2 style: one Split, sizes from an input.
        let split = fused(&[("Split", &["sizes"], 3)], &[("sizes", &[4, 6, 6])]);
        assert_eq!(widths(&split), Ok([4, 6, 6]));
        // Slices leaving a gap, or a cut into two, say what to do.
        let gap = fused(
            &[
                ("Slice", &["s0", "e0", "ax"], 1),
                ("Slice", &["s1", "e1", "ax"], 1),
            ],
            &[
                ("s0", &[0]),
                ("e0", &[8]),
                ("s1", &[9]),
                ("e1", &[16]),
                ("ax", &[-1]),
            ],
        );
        let err = widths(&gap).unwrap_err();
        assert!(err.contains("adapt the whole module"), "{err}");
        let two = fused(&[("Split", &["sizes"], 3)], &[("sizes", &[8, 8, 0])]);
        assert!(widths(&two).unwrap_err().contains("[8, 8, 0]"));
        // Nothing cutting the output: no guess at equal thirds.
        let none = fused(&[("Relu", &[], 1)], &[]);
        assert!(widths(&none).unwrap_err().contains("cannot tell"));
    }
}
