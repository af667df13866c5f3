//! Fresh value and node names in O(1) amortised.
//!
//! A pass that adds many nodes asks for many new names; answering each by scanning the graph
//! made compiling quadratic in its size. [`Names`] indexes the graph's names once and then
//! remembers every name it hands out, so one index can serve a whole pass, across the several
//! [`Builder`](super::builder::Builder)s it creates (one per differentiated node, one per
//! lowered adapter).
//!
//! The names are those a scan would give: `base` when free, else the first free `base_k`,
//! k = 1, 2, … A per-base counter remembers where the last search stopped: names are only ever
//! added to the index, so every suffix below it is still taken.
//!
//! The index must see the graph's names: build it from the graph (or the builder does) after
//! the last change not made with names from it.

use std::collections::{HashMap, HashSet};

use super::Graph;

#[derive(Clone, Debug, Default)]
pub struct Names {
    values: Space,
    nodes: Space,
}

/// One namespace: the names taken and, per base asked for, the next suffix to try.
#[derive(Clone, Debug, Default)]
struct Space {
    taken: HashSet<String>,
    next: HashMap<String, usize>,
}

impl Space {
    fn claim(&mut self, base: &str) -> String {
        if !self.taken.contains(base) {
            self.taken.insert(base.to_string());
            return base.to_string();
        }
        let k = self.next.entry(base.to_string()).or_insert(1);
        loop {
            let name = format!("{base}_{k}");
            *k += 1;
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }
}

impl Names {
    /// The names `g` uses: values (graph inputs, initializers, node outputs) and node names.
    pub fn of(g: &Graph) -> Names {
        let values = g
            .inputs
            .iter()
            .map(|v| v.name.clone())
            .chain(g.initializers.keys().cloned())
            .chain(g.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
            .filter(|n| !n.is_empty())
            .collect();
        let nodes = g.nodes.iter().map(|n| n.name.clone()).collect();
        Names {
            values: Space {
                taken: values,
                next: HashMap::new(),
            },
            nodes: Space {
                taken: nodes,
                next: HashMap::new(),
            },
        }
    }

    /// A value name derived from `base` that is neither in the graph nor handed out before.
    pub fn value(&mut self, base: &str) -> String {
        self.values.claim(base)
    }

    /// A node name derived from `base`, likewise (runtimes such as tract require unique node
    /// names).
    pub fn node(&mut self, base: &str) -> String {
        self.nodes.claim(base)
    }

    /// Records a value name chosen elsewhere (a graph output kept by a rewrite), so it is not
    /// handed out.
    pub fn reserve_value(&mut self, name: &str) {
        self.values.taken.insert(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Node;

    #[test]
    fn names_are_those_a_scan_gives_and_never_repeat() {
        let mut g = Graph::default();
        g.nodes
            .push(Node::new("Relu", "r", vec!["x".into()], vec!["y".into()]));
        g.nodes.push(Node::new(
            "Relu",
            "r_1",
            vec!["y".into()],
            vec!["y_2".into()],
        ));
        let mut names = Names::of(&g);
        assert_eq!(names.value("z"), "z");
        assert_eq!(names.value("y"), "y_1");
        // y_2 is the graph's: skipped.
        assert_eq!(names.value("y"), "y_3");
        assert_eq!(names.value("z"), "z_1");
        assert_eq!(names.node("r"), "r_2");
        assert_eq!(names.node("s"), "s");
        // Node and value names are separate spaces, as in ONNX.
        assert_eq!(names.node("y"), "y");
        names.reserve_value("w");
        assert_eq!(names.value("w"), "w_1");
    }
}
