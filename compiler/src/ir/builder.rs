//! Emitting new nodes into a graph with names derived from a prefix (`{prefix}.{tag}`), the
//! way tract's gemm expansion names its parts: rewrites stay readable in dumps.

use std::collections::HashSet;

use super::{AttrValue, Graph, Node, Tensor};

/// Collects nodes for a later splice; constants go straight into the graph's initializers.
pub struct Builder<'g> {
    pub g: &'g mut Graph,
    pub prefix: String,
    pub nodes: Vec<Node>,
    /// Names handed out but not yet in the graph (the nodes are spliced in at the end).
    taken: HashSet<String>,
    /// Node names handed out (runtimes such as tract require unique node names).
    node_names: HashSet<String>,
}

impl<'g> Builder<'g> {
    pub fn new(g: &'g mut Graph, prefix: impl Into<String>) -> Builder<'g> {
        Builder {
            g,
            prefix: prefix.into(),
            nodes: vec![],
            taken: HashSet::new(),
            node_names: HashSet::new(),
        }
    }

    pub fn fresh(&mut self, tag: &str) -> String {
        let base = self.g.fresh_name(&format!("{}.{tag}", self.prefix));
        let mut name = base.clone();
        let mut k = 1;
        while self.taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    /// Emits `op(inputs)` with a fresh output name, which it returns.
    pub fn op(
        &mut self,
        op: &str,
        tag: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
    ) -> String {
        let out = self.fresh(tag);
        self.op_into(op, tag, inputs, attrs, out)
    }

    /// Emits `op(inputs)` writing to the given output name.
    pub fn op_into(
        &mut self,
        op: &str,
        tag: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
        out: String,
    ) -> String {
        let name = self.node_name(tag);
        let mut n = Node::new(
            op,
            name,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![out.clone()],
        );
        for (k, v) in attrs {
            n = n.with_attr(k, v);
        }
        self.nodes.push(n);
        out
    }

    /// A node name `{prefix}.{tag}` not used in the graph or by this builder.
    fn node_name(&mut self, tag: &str) -> String {
        let base = format!("{}.{tag}", self.prefix);
        let used =
            |b: &Self, n: &str| b.node_names.contains(n) || b.g.nodes.iter().any(|x| x.name == n);
        let mut name = base.clone();
        let mut k = 1;
        while used(self, &name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.node_names.insert(name.clone());
        name
    }

    /// Emits an op of a non-default domain (the compiler's own `ai.bidora` markers).
    pub fn op_in(&mut self, domain: &str, op: &str, tag: &str, inputs: &[&str]) -> String {
        let out = self.op(op, tag, inputs, vec![]);
        self.nodes.last_mut().expect("just pushed").domain = domain.to_string();
        out
    }

    /// Adds a constant initializer and returns its name.
    pub fn constant(&mut self, tag: &str, mut t: Tensor) -> String {
        let name = self.fresh(tag);
        t.name = name.clone();
        self.g.initializers.insert(name.clone(), t);
        name
    }

    pub fn ints(&mut self, tag: &str, v: &[i64]) -> String {
        self.constant(tag, Tensor::from_i64("", vec![v.len() as i64], v))
    }

    pub fn finish(self) -> Vec<Node> {
        self.nodes
    }
}
