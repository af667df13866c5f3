//! The checks every emitted program passes before it is written. `pipeline::compile` runs
//! them on each program it emits; the tests run them again on every program of every fixture.
//!
//! 1. **Structure**: the rules of the ONNX checker that runtimes enforce at load: an ai.onnx
//!    opset import, unique graph-input names, every value defined exactly once (an input, an
//!    initializer or one node output), nodes in topological order, every graph output
//!    defined, and only standard ops (the compiler's `ai.bidora` nodes must be lowered).
//! 2. **Types**: shape inference succeeds, which checks dtypes, ranks and broadcasts, and
//!    that the inputs an op's spec types with one variable hold one element type (no f32
//!    activation times an f16 weight: [`crate::shape`]'s `same_types`, run by the
//!    inference driver at every node, here as on the input model).
//! 3. **Independent inputs**: a program's inputs fall into groups that are fed independently
//!    (BiDoRA's upper program takes a training batch and a validation batch, padded each to
//!    its own longest example). A symbolic dimension name means "one size" to ONNX Runtime's
//!    memory planner, so no name may size inputs of two groups, and no node may join sizes of
//!    two groups (a broadcast of `train_batch` against `val_batch`): inference cannot prove
//!    such sizes equal, and at run time they are not.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::{Dim, Model, ValueType};
use crate::shape::{self, Facts};

/// Inputs that are fed together (one batch), so that their equal dimension names are equal
/// sizes by construction. A program input in no group forms a group of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputGroup {
    pub name: String,
    pub inputs: Vec<String>,
}

impl InputGroup {
    pub fn new(name: &str, inputs: impl IntoIterator<Item = String>) -> InputGroup {
        InputGroup {
            name: name.to_string(),
            inputs: inputs.into_iter().collect(),
        }
    }
}

/// Runs every check on one emitted program (`name` is its file name, for messages) and
/// returns the facts inference found.
pub fn program(name: &str, model: &Model, groups: &[InputGroup]) -> Result<Facts> {
    let fail = |msg: String| Error::Program {
        program: name.to_string(),
        msg,
    };
    structure(model).map_err(fail)?;
    let facts = shape::infer(model).map_err(|e| fail(e.to_string()))?;
    independent_inputs(model, groups, &facts).map_err(fail)?;
    Ok(facts)
}

fn structure(model: &Model) -> std::result::Result<(), String> {
    if model.onnx_opset().is_none() {
        return Err("it imports no ai.onnx opset".into());
    }
    let g = &model.graph;
    let mut defined: HashSet<&str> = HashSet::new();
    for i in &g.inputs {
        if !defined.insert(&i.name) {
            return Err(format!("graph input '{}' is declared twice", i.name));
        }
    }
    for name in g.initializers.keys() {
        // An initializer may also be listed as an input (a default a caller may override).
        defined.insert(name);
    }
    for n in &g.nodes {
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(format!(
                "{} is in domain '{}': emitted programs hold standard ops only",
                n.label(),
                n.domain
            ));
        }
        for i in n.inputs.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i.as_str()) {
                return Err(format!(
                    "{} reads '{i}' before anything defines it (nodes must be in topological \
                     order)",
                    n.label()
                ));
            }
        }
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if !defined.insert(o) {
                return Err(format!(
                    "{} defines '{o}', which is already defined (ONNX values are assigned once)",
                    n.label()
                ));
            }
        }
    }
    let mut outs = HashSet::new();
    for o in &g.outputs {
        if !defined.contains(o.name.as_str()) {
            return Err(format!("graph output '{}' is never defined", o.name));
        }
        if !outs.insert(&o.name) {
            return Err(format!("graph output '{}' is declared twice", o.name));
        }
    }
    Ok(())
}

fn independent_inputs(
    model: &Model,
    groups: &[InputGroup],
    facts: &Facts,
) -> std::result::Result<(), String> {
    let group_of: HashMap<&str, &str> = groups
        .iter()
        .flat_map(|g| g.inputs.iter().map(|i| (i.as_str(), g.name.as_str())))
        .collect();
    // Dimension name → (group, the input that first used it).
    let mut owner: HashMap<&str, (&str, &str)> = HashMap::new();
    for input in &model.graph.inputs {
        if model.graph.initializers.contains_key(&input.name) {
            continue;
        }
        let Some(ValueType::Tensor {
            shape: Some(dims), ..
        }) = &input.ty
        else {
            continue;
        };
        let group = group_of
            .get(input.name.as_str())
            .copied()
            .unwrap_or(input.name.as_str());
        for d in dims {
            let Dim::Sym(s) = d else { continue };
            match owner.get(s.as_str()) {
                Some((g, first)) if *g != group => {
                    return Err(format!(
                        "inputs '{first}' ({g}) and '{}' ({group}) share the dimension name \
                         '{s}', but they are fed independently: a runtime would assume equal \
                         sizes (name the dimensions of each group apart)",
                        input.name
                    ));
                }
                Some(_) => {}
                None => {
                    owner.insert(s, (group, &input.name));
                }
            }
        }
    }
    let groups_of = |d: &shape::DimExpr| -> Vec<&str> {
        d.symbols()
            .filter_map(|s| owner.get(s).map(|(g, _)| *g))
            .collect()
    };
    for a in &facts.assumed {
        let (ga, gb) = (groups_of(&a.a), groups_of(&a.b));
        if let Some((x, y)) = ga
            .iter()
            .flat_map(|x| gb.iter().map(move |y| (x, y)))
            .find(|(x, y)| x != y)
        {
            return Err(format!(
                "{} takes the sizes {} ({x}) and {} ({y}) to be equal, but they come from \
                 inputs that are fed independently",
                a.node, a.a, a.b
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Graph, Node, ValueInfo};

    fn input(name: &str, dims: &[&str]) -> ValueInfo {
        ValueInfo::new(
            name,
            ValueType::tensor(
                DataType::Float,
                dims.iter().map(|d| Dim::Sym(d.to_string())).collect(),
            ),
        )
    }

    /// `y = a + b` with `a: [da]`, `b: [db]`.
    fn add(da: &str, db: &str) -> Model {
        let mut g = Graph::default();
        g.inputs.push(input("a", &[da]));
        g.inputs.push(input("b", &[db]));
        g.nodes.push(Node::new(
            "Add",
            "add",
            vec!["a".into(), "b".into()],
            vec!["y".into()],
        ));
        g.outputs.push(input("y", &[da]));
        Model::emitted(g, 18, "")
    }

    fn two_groups() -> Vec<InputGroup> {
        vec![
            InputGroup::new("train batch", ["a".to_string()]),
            InputGroup::new("val batch", ["b".to_string()]),
        ]
    }

    #[test]
    fn one_group_may_share_names_and_join_sizes() {
        let one = [InputGroup::new("batch", ["a".into(), "b".into()])];
        program("p.onnx", &add("n", "n"), &one).unwrap();
        program("p.onnx", &add("n", "m"), &one).unwrap();
        program("p.onnx", &add("train_n", "val_n"), &two_groups()).unwrap_err();
    }

    #[test]
    fn a_name_shared_by_two_groups_is_refused() {
        let e = program("upper.onnx", &add("batch", "batch"), &two_groups())
            .unwrap_err()
            .to_string();
        assert!(e.contains("upper.onnx"), "{e}");
        assert!(
            e.contains("'a' (train batch) and 'b' (val batch) share the dimension name 'batch'"),
            "{e}"
        );
    }

    #[test]
    fn joining_sizes_of_two_groups_is_refused() {
        let e = program(
            "upper.onnx",
            &add("train_batch", "val_batch"),
            &two_groups(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Add node 'add' takes the sizes train_batch (train batch) and val_batch"),
            "{e}"
        );
    }

    #[test]
    fn structural_rules() {
        let mut m = add("n", "n");
        m.graph.nodes[0].inputs[1] = "later".into();
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(
            e.contains("reads 'later' before anything defines it"),
            "{e}"
        );

        let mut m = add("n", "n");
        m.graph.nodes.push(m.graph.nodes[0].clone());
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(e.contains("defines 'y', which is already defined"), "{e}");

        let mut m = add("n", "n");
        m.graph.outputs[0].name = "z".into();
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(e.contains("graph output 'z' is never defined"), "{e}");

        let mut m = add("n", "n");
        m.graph.nodes[0].domain = "ai.bidora".into();
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(e.contains("standard ops only"), "{e}");

        let mut m = add("n", "n");
        m.graph.inputs[1] = ValueInfo::new(
            "b",
            ValueType::tensor(DataType::Double, vec![Dim::Sym("n".into())]),
        );
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(e.contains("emitted program p.onnx fails its check"), "{e}");
        assert!(
            e.contains("Add node 'add' takes 'a' as f32 and 'b' as f64"),
            "{e}"
        );

        let mut m = add("n", "n");
        m.opset_imports.clear();
        let e = program("p.onnx", &m, &[]).unwrap_err().to_string();
        assert!(e.contains("imports no ai.onnx opset"), "{e}");
    }
}
