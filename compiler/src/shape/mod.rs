//! Dtype and symbolic shape inference over the IR.
//!
//! Every value gets a [`Fact`]: its element type, its shape as [`DimExpr`]s (rank always
//! known for the ops we support), and, for small integer tensors, their contents. Exported
//! transformers compute shapes in the graph (`Shape → Gather → Concat → Reshape`), so
//! propagating those contents, symbols included, is what lets inference see through them.
//! The facts themselves are [`crate::fact`]'s; the per-op rules live in [`crate::ops`]; this
//! module is the driver, and checks the one rule of the ONNX checker that needs facts (rule 6
//! of [`crate::import_check`]: inputs that share a type constraint share one element type).

use std::cell::{Cell, RefCell};

pub use crate::fact::{tensor_fact, Assumed, DimExpr, Fact, Facts, MAX_TRACKED_VALUES};

use crate::error::{Error, Result, Violation};
use crate::ir::{DataType, Dim, Graph, Model, Node, ValueType};
use crate::ops::{self, InferCx, OpDef};

pub fn infer(model: &Model) -> Result<Facts> {
    infer_graph(&model.graph, model.onnx_opset().unwrap_or(crate::MAX_OPSET))
}

pub fn infer_graph(graph: &Graph, opset: i64) -> Result<Facts> {
    let fresh = Cell::new(0usize);
    let assumed = RefCell::new(vec![]);
    let mut facts = Facts::default();
    for (name, t) in &graph.initializers {
        facts.insert(name.clone(), tensor_fact(t));
    }
    for input in &graph.inputs {
        if graph.initializers.contains_key(&input.name) {
            continue;
        }
        let Some(ValueType::Tensor {
            elem,
            shape: Some(dims),
            ..
        }) = &input.ty
        else {
            return Err(Error::Shape {
                node: format!("graph input '{}'", input.name),
                msg: "needs a tensor type with a known rank".into(),
            });
        };
        let shape = dims
            .iter()
            .map(|d| match d {
                Dim::Known(v) => DimExpr::known(*v),
                Dim::Sym(s) => DimExpr::sym(s),
                Dim::Unknown => ops::fresh_dim(&fresh),
            })
            .collect();
        facts.insert(input.name.clone(), Fact::new(*elem, shape));
    }
    for node in &graph.nodes {
        let inputs: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| if i.is_empty() { None } else { facts.get(i) })
            .collect();
        if let Some(missing) = node
            .inputs
            .iter()
            .zip(&inputs)
            .find(|(n, f)| !n.is_empty() && f.is_none())
        {
            return Err(Error::Shape {
                node: node.label(),
                msg: format!("input '{}' has no known type", missing.0),
            });
        }
        let rule =
            ops::lookup(&node.domain, &node.op_type).ok_or_else(|| Error::UnsupportedOp {
                op: node.op_type.clone(),
                node: node.name.clone(),
                msg: format!("no shape rule; {}", crate::error::HINT_NO_SHAPE_RULE),
            })?;
        // Before the rule, which types its output after one input and would hide the mix.
        same_types(node, rule, &inputs)?;
        let mut cx = InferCx {
            node,
            inputs,
            opset,
            fresh: &fresh,
            assumed: &assumed,
        };
        let outs = (rule.infer)(&mut cx)?;
        // A named output the op does not have would otherwise stay without a fact and fail
        // later at some consumer, far from its cause.
        if let Some(last) = node.outputs.iter().rposition(|o| !o.is_empty()) {
            if last >= outs.len() {
                return Err(Error::Shape {
                    node: node.label(),
                    msg: format!(
                        "the node has {} outputs, the op at most {}",
                        last + 1,
                        outs.len()
                    ),
                });
            }
        }
        for (name, fact) in node.outputs.iter().zip(outs) {
            if !name.is_empty() {
                facts.insert(name.clone(), fact);
            }
        }
    }
    facts.assumed = assumed.into_inner();
    Ok(facts)
}

/// Rule 6 at one node: the inputs `def.same_type` names hold one element type. `inputs` are
/// the node's input facts as the inference driver has them (None: omitted).
pub fn same_types(node: &Node, def: &OpDef, inputs: &[Option<&Fact>]) -> Result<()> {
    let mut first: Option<(usize, DataType)> = None;
    for (i, fact) in inputs.iter().enumerate() {
        let Some(fact) = fact.filter(|_| def.same_type.applies(i)) else {
            continue;
        };
        match first {
            None => first = Some((i, fact.dtype)),
            Some((j, t)) if t != fact.dtype => {
                return Err(Violation::MixedTypes {
                    node: node.label(),
                    op: node.op_type.clone(),
                    which: match def.same_type {
                        ops::SameType::All => "all its inputs",
                        _ => "those inputs",
                    },
                    a: node.inputs[j].clone(),
                    a_type: t.short_name(),
                    b: node.inputs[i].clone(),
                    b_type: fact.dtype.short_name(),
                }
                .into())
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{AttrValue, Node, Tensor, ValueInfo};

    /// A graph with `x: f32[batch, 8]` and the given i64 initializers.
    fn graph(consts: &[(&str, &[i64])], nodes: Vec<Node>) -> Graph {
        let mut g = Graph::default();
        g.inputs.push(ValueInfo::new(
            "x",
            ValueType::tensor(
                DataType::Float,
                vec![Dim::Sym("batch".into()), Dim::Known(8)],
            ),
        ));
        for (name, v) in consts {
            // One element: a scalar (Range, Gather indices); more: a 1-D vector.
            let dims = if v.len() == 1 {
                vec![]
            } else {
                vec![v.len() as i64]
            };
            g.initializers
                .insert(name.to_string(), Tensor::from_i64(*name, dims, v));
        }
        g.nodes = nodes;
        g
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Node::new(op, format!("the_{op}"), s(inputs), s(outputs))
    }

    #[test]
    fn unknown_op_and_missing_input_name_the_node() {
        let e = infer_graph(&graph(&[], vec![node("Frobnicate", &["x"], &["y"])]), 18)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Frobnicate") && e.contains("the_Frobnicate"),
            "{e}"
        );
        let e = infer_graph(&graph(&[], vec![node("Relu", &["nowhere"], &["y"])]), 18)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the_Relu") && e.contains("nowhere"), "{e}");
    }

    #[test]
    fn an_output_the_op_lacks_is_an_error_at_the_node() {
        let e = infer_graph(&graph(&[], vec![node("Relu", &["x"], &["y", "extra"])]), 18)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the_Relu") && e.contains("2 outputs"), "{e}");
        // Omitted trailing outputs are fine.
        let f = infer_graph(&graph(&[], vec![node("Dropout", &["x"], &["y", ""])]), 18).unwrap();
        assert_eq!(f.get("y").unwrap().display(), "f32[batch, 8]");
    }

    #[test]
    fn range_split_slice_and_constants_propagate_contents() {
        let c = [
            ("zero", &[0i64][..]),
            ("five", &[5]),
            ("two", &[2]),
            ("mone", &[-1]),
            ("big", &[i64::MAX]),
            ("rev", &[8]),
            ("shape", &[2, 3]),
        ];
        let mut g = graph(
            &c,
            vec![
                node("Range", &["zero", "five", "two"], &["r"]),
                node("Range", &["five", "zero", "mone"], &["down"]),
                // A whole axis backwards: x[:, ::-1].
                node("Slice", &["x", "mone", "big", "one_ax", "mone"], &["flip"]),
                node("Split", &["x"], &["a", "b", "c"])
                    .with_attr("axis", AttrValue::Int(1))
                    .with_attr("num_outputs", AttrValue::Int(3)),
                node("ConstantOfShape", &["shape"], &["z"]),
                node("Constant", &[], &["ints"])
                    .with_attr("value_ints", AttrValue::Ints(vec![4, -1])),
            ],
        );
        g.initializers
            .insert("one_ax".into(), Tensor::from_i64("one_ax", vec![1], &[1]));
        // Slice's starts/ends/steps are 1-D.
        for n in ["mone", "big"] {
            let t = g.initializers.get_mut(n).unwrap();
            t.dims = vec![1];
        }
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("r").unwrap().display(), "i64[3]");
        assert_eq!(f.get("r").unwrap().known_ints(), Some(vec![0, 2, 4]));
        assert_eq!(
            f.get("down").unwrap().known_ints(),
            Some(vec![5, 4, 3, 2, 1])
        );
        // Start -1 → 7, end INT64_MAX clamps to 7 for a negative step: empty.
        assert_eq!(f.get("flip").unwrap().display(), "f32[batch, 0]");
        // Opset 18 num_outputs: 8 = 3 + 3 + 2.
        let sizes: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|n| f.get(n).unwrap().display())
            .collect();
        assert_eq!(sizes, ["f32[batch, 3]", "f32[batch, 3]", "f32[batch, 2]"]);
        assert_eq!(f.get("z").unwrap().display(), "f32[2, 3]");
        assert_eq!(f.get("ints").unwrap().known_ints(), Some(vec![4, -1]));
    }

    #[test]
    fn negative_step_slices_follow_the_onnx_clamping() {
        let mut g = graph(&[], vec![]);
        let v = |name: &str, vals: &[i64]| Tensor::from_i64(name, vec![vals.len() as i64], vals);
        for t in [
            v("s", &[-1]),
            v("e", &[i64::MIN]),
            v("ax", &[1]),
            v("st", &[-1]),
            v("s2", &[-100]),
            v("e2", &[-200]),
            v("st2", &[-3]),
        ] {
            g.initializers.insert(t.name.clone(), t);
        }
        g.nodes = vec![
            // x[:, ::-1]: all 8.
            node("Slice", &["x", "s", "e", "ax", "st"], &["all"]),
            // Start below the axis clamps to 0, end to -1: one element (index 0).
            node("Slice", &["x", "s2", "e2", "ax", "st"], &["one"]),
            // x[:, 7::-3]: indices 7, 4, 1.
            node("Slice", &["x", "s", "e", "ax", "st2"], &["three"]),
        ];
        let f = infer_graph(&g, 18).unwrap();
        assert_eq!(f.get("all").unwrap().display(), "f32[batch, 8]");
        assert_eq!(f.get("one").unwrap().display(), "f32[batch, 1]");
        assert_eq!(f.get("three").unwrap().display(), "f32[batch, 3]");
    }

    /// Malformed graphs must give an error (or a fact), never a panic.
    #[test]
    fn hostile_inputs_are_errors_not_panics() {
        let c: &[(&str, &[i64])] = &[
            ("min", &[i64::MIN]),
            ("max", &[i64::MAX]),
            ("mone", &[-1]),
            ("zero", &[0]),
            ("ax1", &[1, 1]),
            ("bad_shape", &[3, 5]),
            ("neg_shape", &[-2, 3]),
        ];
        let attr = |n: Node, k: &str, v: AttrValue| n.with_attr(k, v);
        let cases: Vec<(Vec<Node>, bool)> = vec![
            (vec![node("Div", &["min", "mone"], &["y"])], true),
            (vec![node("Sub", &["zero", "min"], &["y"])], true),
            (vec![node("Range", &["min", "max", "max"], &["y"])], true),
            (vec![node("Range", &["max", "min", "min"], &["y"])], true),
            (vec![node("Range", &["zero", "max", "zero"], &["y"])], true),
            (
                vec![node(
                    "Slice",
                    &["ax1", "zero", "max", "zero", "max"],
                    &["y"],
                )],
                true,
            ),
            (
                vec![node("Slice", &["ax1", "max", "min", "zero", "min"], &["y"])],
                true,
            ),
            (vec![node("Split", &["x"], &[])], false),
            (
                vec![attr(
                    node("Split", &["x"], &[]),
                    "num_outputs",
                    AttrValue::Int(0),
                )],
                false,
            ),
            (vec![node("Reshape", &["ax1", "bad_shape"], &["y"])], false),
            (vec![node("ConstantOfShape", &["neg_shape"], &["y"])], false),
            (
                vec![attr(
                    node("Transpose", &["x"], &["y"]),
                    "perm",
                    AttrValue::Ints(vec![0, 0]),
                )],
                false,
            ),
            (
                vec![attr(
                    node("Transpose", &["x"], &["y"]),
                    "perm",
                    AttrValue::Ints(vec![5, 0]),
                )],
                false,
            ),
            (vec![node("Squeeze", &["x", "ax1"], &["y"])], false),
            (vec![node("Gather", &["min", "zero"], &["y"])], false),
            (vec![node("MatMul", &["min", "x"], &["y"])], false),
            (vec![node("Concat", &[], &["y"])], false),
            (vec![node("Constant", &[], &["y"])], false),
            (vec![node("Cast", &["x"], &["y"])], false),
        ];
        for (nodes, ok) in cases {
            let label = nodes[0].label();
            let r = infer_graph(&graph(c, nodes), 18);
            assert_eq!(r.is_ok(), ok, "{label}: {:?}", r.err());
        }
    }
}
