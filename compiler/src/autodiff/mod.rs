//! Reverse-mode differentiation of IR graphs into standard ONNX ops.
//!
//! The driver, not the rules, decides what to differentiate (tinygrad's and JAX's split):
//! 1. *active* values: float values reachable from the requested inputs (integer and shape
//!    subgraphs are never active, and `ai.bidora.StopGradient` stops activity);
//! 2. *path* nodes: nodes with an active input and an output that reaches the loss;
//! 3. reverse sweep over path nodes: output gradients are summed, the op's rule (registered
//!    beside its shape rule in [`crate::ops`]) emits the input gradients, and only inputs that
//!    are active get one, so frozen weights cost no weight-gradient matmul.
//!
//! An op on a path without a rule is an error naming the op, the node and the path from the
//! input to the loss through it.

use std::collections::{HashMap, HashSet};

// The rules' API lives with the op tables (`ops::grad_cx`), so `ops` never imports the
// driver; re-exported here for the rules' callers.
pub use crate::ops::grad_cx::{self as cx, GradCx};
pub use crate::ops::STOP_GRADIENT;

use crate::error::{Error, Result, HINT_NO_GRADIENT};
use crate::ir::builder::Builder;
use crate::ir::names::Names;
use crate::ir::{Dim, Model, ValueInfo, ValueType, BIDORA_DOMAIN};
use crate::ops;
use crate::shape;

/// The model with the gradients added as graph outputs.
pub struct Gradients {
    pub model: Model,
    /// (input, name of the output holding d loss / d input), in the order requested.
    pub grads: Vec<(String, String)>,
}

fn is_float(f: &shape::Fact) -> bool {
    f.dtype.is_float()
}

/// Differentiates `loss` (a scalar value of the graph) w.r.t. each of `wrt` (graph inputs or
/// values). The result keeps every output of `model` and adds one output per gradient, named
/// `{input}.grad`.
pub fn backward(model: &Model, loss: &str, wrt: &[String]) -> Result<Gradients> {
    let facts = shape::infer(model)?;
    let lf = facts
        .get(loss)
        .ok_or_else(|| Error::Other(format!("the loss '{loss}' is not a value of the graph")))?;
    if lf.rank() != 0 || !is_float(lf) {
        return Err(Error::Other(format!(
            "the loss '{loss}' must be a float scalar, it is {}",
            lf.display()
        )));
    }
    let g = &model.graph;

    // 1. Active values, remembering which active input activated each (for error paths).
    let mut parent: HashMap<String, Option<String>> = HashMap::new();
    for w in wrt {
        if facts.get(w).is_none() {
            return Err(Error::Other(format!(
                "cannot differentiate w.r.t. '{w}': no such value"
            )));
        }
        parent.insert(w.clone(), None);
    }
    for n in &g.nodes {
        if n.domain == BIDORA_DOMAIN && n.op_type == STOP_GRADIENT {
            continue;
        }
        if let Some(src) = n.inputs.iter().find(|i| parent.contains_key(*i)) {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if facts.get(o).is_some_and(is_float) {
                    parent.insert(o.clone(), Some(src.clone()));
                }
            }
        }
    }
    // 2. Values that reach the loss, with the next value on the way there.
    let mut child: HashMap<String, Option<String>> = HashMap::from([(loss.to_string(), None)]);
    for n in g.nodes.iter().rev() {
        if let Some(o) = n.outputs.iter().find(|o| child.contains_key(*o)) {
            let o = o.clone();
            for i in n.inputs.iter().filter(|i| parent.contains_key(*i)) {
                child.entry(i.clone()).or_insert_with(|| Some(o.clone()));
            }
        }
    }
    let on_path = |v: &str| parent.contains_key(v) && child.contains_key(v);

    let mut out = model.clone();
    let graph = &mut out.graph;
    let opset = model.onnx_opset().unwrap_or(crate::MAX_OPSET);
    let mut contributions: HashMap<String, Vec<String>> = HashMap::new();
    let mut tail = vec![];
    // One name index for the whole sweep: a builder per node each indexing the graph would
    // make the backward pass quadratic in the graph's size.
    let mut names = Names::of(graph);
    {
        let mut b = Builder::sharing(graph, &mut names, format!("{loss}.grad"));
        let shape = b.op("Shape", "seed.shape", &[loss], vec![]);
        let one = cx::scalar_tensor(lf.dtype, 1.0, vec![1])?;
        let seed = b.op(
            "ConstantOfShape",
            "seed",
            &[&shape],
            vec![("value", crate::ir::AttrValue::Tensor(one))],
        );
        contributions.insert(loss.to_string(), vec![seed]);
        tail.extend(b.finish());
    }

    // 3. The reverse sweep.
    for n in model.graph.nodes.iter().rev() {
        if !n.outputs.iter().any(|o| on_path(o)) || !n.inputs.iter().any(|i| on_path(i)) {
            continue;
        }
        if n.domain == BIDORA_DOMAIN && n.op_type == STOP_GRADIENT {
            continue;
        }
        let prefix = if n.name.is_empty() {
            n.outputs[0].clone()
        } else {
            n.name.clone()
        };
        let mut b = Builder::sharing(graph, &mut names, format!("{prefix}.grad"));
        let out_grads: Vec<Option<String>> = n
            .outputs
            .iter()
            .map(|o| sum_into(&mut b, contributions.remove(o).unwrap_or_default()))
            .collect();
        if out_grads.iter().all(Option::is_none) {
            tail.extend(b.finish());
            continue;
        }
        let needs: Vec<bool> = n.inputs.iter().map(|i| on_path(i)).collect();
        let rule = ops::lookup(&n.domain, &n.op_type).and_then(|d| d.grad);
        let Some(rule) = rule else {
            return Err(no_rule(n, loss, &parent, &child).with_hint(HINT_NO_GRADIENT));
        };
        let mut gcx = GradCx {
            node: n,
            facts: &facts,
            b,
            out_grads,
            needs: needs.clone(),
            opset,
        };
        let in_grads = rule(&mut gcx).map_err(|e| e.with_hint(HINT_NO_GRADIENT))?;
        tail.extend(gcx.b.finish());
        for (k, input) in n.inputs.iter().enumerate() {
            if !needs[k] {
                continue;
            }
            let gi = in_grads
                .get(k)
                .cloned()
                .flatten()
                .ok_or_else(|| Error::UnsupportedOp {
                    op: n.op_type.clone(),
                    node: n.name.clone(),
                    msg: format!("its gradient rule gives nothing for input {k} ('{input}')"),
                })?;
            contributions.entry(input.clone()).or_default().push(gi);
        }
    }

    // 4. One output per requested input.
    let mut grads = vec![];
    let mut b = Builder::sharing(graph, &mut names, "grad");
    for w in wrt {
        let name = b.fresh_unprefixed(&format!("{w}.grad"));
        let f = facts.get(w).unwrap();
        let src = match sum_into(&mut b, contributions.remove(w).unwrap_or_default()) {
            Some(s) => s,
            // Not on any path to the loss: its gradient is zero.
            None => {
                let shape = b.op("Shape", "zshape", &[w], vec![]);
                let zero = cx::scalar_tensor(f.dtype, 0.0, vec![1])?;
                b.op(
                    "ConstantOfShape",
                    "zeros",
                    &[&shape],
                    vec![("value", crate::ir::AttrValue::Tensor(zero))],
                )
            }
        };
        b.op_into(
            "Identity",
            &format!("{w}.out"),
            &[&src],
            vec![],
            name.clone(),
        );
        let dims = f
            .shape
            .iter()
            .map(|d| match d.as_known() {
                Some(v) => Dim::Known(v),
                None => Dim::Sym(d.to_string()),
            })
            .collect();
        grads.push((w.clone(), name.clone()));
        b.g.outputs
            .push(ValueInfo::new(name, ValueType::tensor(f.dtype, dims)));
    }
    tail.extend(b.finish());
    graph.nodes.extend(tail);
    crate::ir::topo::toposort(graph)?;
    Ok(Gradients { model: out, grads })
}

/// Adds up gradient contributions (None when there are none).
fn sum_into(b: &mut Builder, parts: Vec<String>) -> Option<String> {
    let mut it = parts.into_iter();
    let first = it.next()?;
    Some(it.fold(first, |acc, p| b.op("Add", "acc", &[&acc, &p], vec![])))
}

/// The error for a path node without a gradient rule, with the path through it.
fn no_rule(
    n: &crate::ir::Node,
    loss: &str,
    parent: &HashMap<String, Option<String>>,
    child: &HashMap<String, Option<String>>,
) -> Error {
    let start = n
        .inputs
        .iter()
        .find(|i| parent.contains_key(*i) && child.contains_key(*i));
    let mut back = vec![];
    let mut seen = HashSet::new();
    let mut cur = start.cloned();
    while let Some(v) = cur {
        if !seen.insert(v.clone()) {
            break;
        }
        back.push(v.clone());
        cur = parent.get(&v).cloned().flatten();
    }
    back.reverse();
    let mut fwd = vec![];
    let mut cur = n.outputs.iter().find(|o| child.contains_key(*o)).cloned();
    while let Some(v) = cur {
        if !seen.insert(v.clone()) {
            break;
        }
        fwd.push(v.clone());
        cur = child.get(&v).cloned().flatten();
    }
    let mut path = back.join(" → ");
    path.push_str(&format!(" → [{} '{}'] → ", n.op_type, n.name));
    path.push_str(&fwd.join(" → "));
    Error::UnsupportedOp {
        op: n.op_type.clone(),
        node: n.name.clone(),
        msg: format!("no gradient rule, and it lies on the path to the loss '{loss}': {path}"),
    }
}
