//! How a model cuts a fused projection's output into q|k|v blocks, read from the graph. Target
//! selection checks a `module:q,v` request with it before any rewriting, and
//! [`crate::rewrite::split_fused`] splits the weight at the widths it finds.

use std::collections::HashMap;

use crate::ir::{Graph, Node};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Tensor;

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
