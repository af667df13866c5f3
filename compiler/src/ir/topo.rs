//! Topological ordering of a graph's nodes.

use std::collections::{HashMap, HashSet};

use super::Graph;
use crate::error::{Error, Result};

/// Reorders `graph.nodes` so that every node comes after the producers of its inputs, keeping
/// the original order wherever it already is valid (stable Kahn), so dumps and snapshots stay
/// close to what the exporter wrote.
///
/// Values that are graph inputs or initializers, and names used by subgraphs from the outer
/// scope, need no producer. A cycle, or an input produced by no one, is an error naming the node.
pub fn toposort(graph: &mut Graph) -> Result<()> {
    let mut available: HashSet<String> = graph
        .inputs
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializers.keys().cloned())
        .collect();
    let produced: HashMap<&str, usize> = graph.producers();
    let n = graph.nodes.len();
    let mut deps: Vec<usize> = vec![0; n];
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        let mut seen = HashSet::new();
        for inp in node.inputs.iter().filter(|v| !v.is_empty()) {
            if available.contains(inp) {
                continue;
            }
            match produced.get(inp.as_str()) {
                Some(&p) if seen.insert(p) => {
                    deps[i] += 1;
                    users[p].push(i);
                }
                Some(_) => {}
                None => {
                    return Err(Error::Graph(format!(
                        "{} reads '{inp}', which no node, graph input or initializer defines",
                        node.label()
                    )))
                }
            }
        }
    }
    // A min-heap over original indices keeps the exporter's order where possible.
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| deps[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            deps[u] -= 1;
            if deps[u] == 0 {
                ready.push(std::cmp::Reverse(u));
            }
        }
    }
    if order.len() != n {
        let stuck = (0..n).find(|&i| deps[i] > 0).unwrap();
        return Err(Error::Graph(format!(
            "the graph has a cycle through {}",
            graph.nodes[stuck].label()
        )));
    }
    let mut old: Vec<Option<super::Node>> = std::mem::take(&mut graph.nodes)
        .into_iter()
        .map(Some)
        .collect();
    graph.nodes = order.into_iter().map(|i| old[i].take().unwrap()).collect();
    available.clear();
    Ok(())
}
