//! Emitting new nodes into a graph with names derived from a prefix (`{prefix}.{tag}`), the
//! way tract's gemm expansion names its parts: rewrites stay readable in dumps.

use super::names::Names;
use super::{AttrValue, DataType, Graph, Node, Tensor};

/// Collects nodes for a later splice; constants go straight into the graph's initializers.
pub struct Builder<'g> {
    pub g: &'g mut Graph,
    pub prefix: String,
    pub nodes: Vec<Node>,
    /// The names in use, including those handed out but not yet in the graph (the nodes are
    /// spliced in at the end).
    names: NameIndex<'g>,
}

/// A builder's own index, made from the graph when first needed, or one a pass shares across
/// its builders so it indexes the graph once, not once per builder.
enum NameIndex<'g> {
    Own(Option<Names>),
    Shared(&'g mut Names),
}

impl<'g> Builder<'g> {
    /// A builder with its own name index (built from `g` at the first name, O(graph)): for
    /// passes that make one builder. Passes that make one per node use [`Builder::sharing`].
    pub fn new(g: &'g mut Graph, prefix: impl Into<String>) -> Builder<'g> {
        Builder {
            g,
            prefix: prefix.into(),
            nodes: vec![],
            names: NameIndex::Own(None),
        }
    }

    /// A builder drawing names from `names`, which must hold `g`'s names (see [`Names`]).
    pub fn sharing(
        g: &'g mut Graph,
        names: &'g mut Names,
        prefix: impl Into<String>,
    ) -> Builder<'g> {
        Builder {
            g,
            prefix: prefix.into(),
            nodes: vec![],
            names: NameIndex::Shared(names),
        }
    }

    fn names(&mut self) -> &mut Names {
        match &mut self.names {
            NameIndex::Own(own) => own.get_or_insert_with(|| Names::of(self.g)),
            NameIndex::Shared(shared) => shared,
        }
    }

    /// A fresh value name `{prefix}.{tag}` (or with a `_k` suffix).
    pub fn fresh(&mut self, tag: &str) -> String {
        let base = format!("{}.{tag}", self.prefix);
        self.names().value(&base)
    }

    /// A fresh value name derived from `base` itself, without the prefix.
    pub fn fresh_unprefixed(&mut self, base: &str) -> String {
        self.names().value(base)
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
        self.names().node(&base)
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

    // Typed shorthands for the ops graph-building code uses most, so a loss or a regulariser
    // reads as its formula.

    /// `op(x)`, no attributes.
    pub fn unary(&mut self, op: &str, tag: &str, x: &str) -> String {
        self.op(op, tag, &[x], vec![])
    }

    /// `op(a, b)`, no attributes.
    pub fn binary(&mut self, op: &str, tag: &str, a: &str, b: &str) -> String {
        self.op(op, tag, &[a, b], vec![])
    }

    pub fn cast(&mut self, tag: &str, x: &str, to: DataType) -> String {
        self.op("Cast", tag, &[x], vec![("to", AttrValue::Int(to as i64))])
    }

    /// `op` (ReduceSum, ReduceMean, ...) over every axis, to a scalar: no axes and
    /// `keepdims = 0` mean that in every opset.
    pub fn reduce_all(&mut self, op: &str, tag: &str, x: &str) -> String {
        self.op(op, tag, &[x], vec![("keepdims", AttrValue::Int(0))])
    }

    /// `op` over the axes held by the constant `axes`, an input (ReduceSum from opset 13, the
    /// other reductions from 18).
    pub fn reduce_axes(&mut self, op: &str, tag: &str, x: &str, axes: &str, keep: bool) -> String {
        self.op(
            op,
            tag,
            &[x, axes],
            vec![("keepdims", AttrValue::Int(keep as i64))],
        )
    }

    pub fn concat(&mut self, tag: &str, inputs: &[&str], axis: i64) -> String {
        self.op("Concat", tag, inputs, vec![("axis", AttrValue::Int(axis))])
    }

    pub fn finish(self) -> Vec<Node> {
        self.nodes
    }
}
