//! `--train-head`: the classifier head's weights and biases become trainable graph inputs,
//! like peft's `modules_to_save`. The head is every linear op whose module path has a
//! `classifier` or `score` component (BERT's `classifier`, RoBERTa's and ESM's
//! `classifier.dense` and `classifier.out_proj`, `score` in causal-LM classifiers).

use indexmap::IndexMap;

use crate::error::{Error, Result};
use crate::ir::{Dim, Model, Tensor, ValueInfo, ValueType};
use crate::targets;

fn is_head(module: &str) -> bool {
    module.split('.').any(|c| c == "classifier" || c == "score")
}

/// One tensor of the classifier head: a linear op's weight or its bias.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadTensor {
    /// The initializer's name in the model.
    pub name: String,
    /// The linear op's module path (`classifier.dense`).
    pub module: String,
    /// `Some(layout)` for the weight, `None` for the bias.
    pub weight_layout: Option<targets::Layout>,
}

/// The head's weights and biases in graph order (no duplicates); an error listing the
/// candidates when the model has no `classifier` or `score` linear op.
pub fn head_tensors(g: &crate::ir::Graph) -> Result<Vec<HeadTensor>> {
    let cands = targets::candidates(g);
    let head: Vec<&targets::Candidate> = cands.iter().filter(|c| is_head(&c.module)).collect();
    if head.is_empty() {
        return Err(Error::Target {
            msg: format!(
                "--train-head: no linear op belongs to a `classifier` or `score` module. Candidates:\n{}",
                targets::format_candidates(&cands)
            ),
        });
    }
    let consumers = g.consumers();
    let mut out: Vec<HeadTensor> = vec![];
    for c in head {
        let mut push = |name: String, weight_layout| {
            if !out.iter().any(|t| t.name == name) {
                out.push(HeadTensor {
                    name,
                    module: c.module.clone(),
                    weight_layout,
                });
            }
        };
        push(c.weight.clone(), Some(c.layout));
        // The bias: Gemm's C, or the 1-D constant added right after a MatMul.
        let node = &g.nodes[c.node_index];
        let bias = if node.op_type == "Gemm" {
            node.input(2).map(str::to_string)
        } else {
            consumers
                .get(node.outputs[0].as_str())
                .and_then(|users| match users.as_slice() {
                    [u] if g.nodes[*u].op_type == "Add" => g.nodes[*u]
                        .inputs
                        .iter()
                        .find(|v| g.constant(v).is_some_and(|t| t.dims.len() == 1))
                        .cloned(),
                    _ => None,
                })
        };
        if let Some(b) = bias {
            push(b, None);
        }
    }
    Ok(out)
}

/// Returns the model with the head's weights and biases as graph inputs, and their values.
pub fn make_trainable(model: &Model) -> Result<(Model, IndexMap<String, Tensor>)> {
    let mut m = model.clone();
    let g = &mut m.graph;
    let names: Vec<String> = head_tensors(g)?.into_iter().map(|t| t.name).collect();
    let mut values = IndexMap::new();
    let mut casts = vec![];
    for n in names {
        let t = g
            .initializers
            .shift_remove(&n)
            .expect("a candidate's constant");
        // A half head trains in f32 like the adapters: the input is f32 and the graph casts it
        // down where the head reads it (the export writes it back in the model's type).
        let dtype = super::adapter_dtype(t.dtype);
        g.inputs.push(ValueInfo::new(
            n.clone(),
            ValueType::tensor(dtype, t.dims.iter().map(|&d| Dim::Known(d)).collect()),
        ));
        if dtype != t.dtype {
            casts.push((n.clone(), t.dtype));
        }
        let values_f = t.to_f64_vec().expect("a float candidate");
        values.insert(
            n.clone(),
            if dtype != t.dtype {
                Tensor::from_f64_as(dtype, n, t.dims.clone(), &values_f)
            } else {
                t
            },
        );
    }
    if !casts.is_empty() {
        let mut names = crate::ir::names::Names::of(g);
        let mut front = vec![];
        let mut renamed = std::collections::HashMap::new();
        for (n, dtype) in casts {
            let down = names.value(&format!("{n}.{}", dtype.short_name()));
            front.push(
                crate::ir::Node::new(
                    "Cast",
                    names.node(&format!("{n}.down")),
                    vec![n.clone()],
                    vec![down.clone()],
                )
                .with_attr("to", crate::ir::AttrValue::Int(dtype as i64)),
            );
            renamed.insert(n, down);
        }
        for node in &mut g.nodes {
            for v in &mut node.inputs {
                if let Some(d) = renamed.get(v) {
                    *v = d.clone();
                }
            }
        }
        front.append(&mut g.nodes);
        g.nodes = front;
    }
    Ok((m, values))
}
