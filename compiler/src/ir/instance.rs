//! Instantiating a graph inside another: the building block of programs that evaluate the
//! same model several times (BiDoRA's upper program runs the model at V̄ on the validation
//! batch and at V± on the training batch).
//!
//! Every value the source graph computes gets a prefixed name; its inputs are either bound to
//! values of the destination or, when unbound, shared by name (the destination must define
//! them). Initializers are shared by name, never copied: frozen weights stay in memory once;
//! a source constant whose name the destination already uses for other contents is kept
//! under a prefixed name.

use std::collections::{HashMap, HashSet};

use super::{Graph, Node};
use crate::error::{Error, Result};

/// Copies `src`'s nodes into `dst` under `prefix`. `bind` maps source input names to
/// destination value names. Returns the map from each source output to its new name.
pub fn instantiate(
    dst: &mut Graph,
    src: &Graph,
    prefix: &str,
    bind: &HashMap<String, String>,
) -> Result<HashMap<String, String>> {
    let mut rename: HashMap<String, String> = bind.clone();
    // Every name the destination uses, gathered once: instantiating a large graph must not
    // rescan the destination per value.
    let mut taken: HashSet<String> = dst
        .initializers
        .keys()
        .cloned()
        .chain(dst.inputs.iter().map(|i| i.name.clone()))
        .chain(dst.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
        .collect();
    let fresh = |taken: &mut HashSet<String>, base: String| {
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        taken.insert(name.clone());
        name
    };
    for (name, t) in &src.initializers {
        if rename.contains_key(name) {
            continue;
        }
        match dst.initializers.get(name) {
            Some(existing) if existing == t => {}
            // Two sources may name different constants alike (each backward pass numbers its
            // own seeds and shapes): keep both, the source's under a prefixed name.
            Some(_) => {
                let new = fresh(&mut taken, format!("{prefix}/{name}"));
                let mut c = t.clone();
                c.name = new.clone();
                dst.initializers.insert(new.clone(), c);
                rename.insert(name.clone(), new);
            }
            None => {
                dst.initializers.insert(name.clone(), t.clone());
                taken.insert(name.clone());
            }
        }
    }
    for i in &src.inputs {
        if !rename.contains_key(&i.name) && !src.initializers.contains_key(&i.name) {
            if !taken.contains(&i.name) {
                return Err(Error::Graph(format!(
                    "instantiating under '{prefix}': input '{}' is neither bound nor defined",
                    i.name
                )));
            }
            rename.insert(i.name.clone(), i.name.clone());
        }
    }
    let mut new_nodes = Vec::with_capacity(src.nodes.len());
    for n in &src.nodes {
        let mut c: Node = n.clone();
        c.name = format!("{prefix}/{}", n.name);
        for o in c.outputs.iter_mut().filter(|o| !o.is_empty()) {
            let new = fresh(&mut taken, format!("{prefix}/{o}"));
            rename.insert(o.clone(), new.clone());
            *o = new;
        }
        for i in c.inputs.iter_mut().filter(|i| !i.is_empty()) {
            if let Some(r) = rename.get(i.as_str()) {
                *i = r.clone();
            } else if !src.initializers.contains_key(i.as_str()) {
                return Err(Error::Graph(format!(
                    "instantiating under '{prefix}': {} reads '{i}', which nothing defines",
                    n.label()
                )));
            }
        }
        new_nodes.push(c);
    }
    dst.nodes.extend(new_nodes);
    Ok(src
        .outputs
        .iter()
        .map(|o| {
            (
                o.name.clone(),
                rename
                    .get(&o.name)
                    .cloned()
                    .unwrap_or_else(|| o.name.clone()),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Dim, Tensor, ValueInfo, ValueType};

    fn affine() -> Graph {
        let mut g = Graph::default();
        let ty = ValueType::tensor(DataType::Float, vec![Dim::Sym("b".into()), Dim::Known(2)]);
        g.inputs.push(ValueInfo::new("x", ty.clone()));
        g.outputs.push(ValueInfo::new("y", ty));
        g.initializers.insert(
            "w".into(),
            Tensor::from_f32("w", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
        );
        g.nodes.push(Node::new(
            "MatMul",
            "mm",
            vec!["x".into(), "w".into()],
            vec!["h".into()],
        ));
        g.nodes
            .push(Node::new("Relu", "act", vec!["h".into()], vec!["y".into()]));
        g
    }

    #[test]
    fn two_instances_share_weights_and_get_distinct_names() {
        let src = affine();
        let mut dst = Graph::default();
        let ty = ValueType::tensor(DataType::Float, vec![Dim::Sym("b".into()), Dim::Known(2)]);
        dst.inputs.push(ValueInfo::new("x_train", ty.clone()));
        dst.inputs.push(ValueInfo::new("x_val", ty));
        let a = instantiate(
            &mut dst,
            &src,
            "train",
            &HashMap::from([("x".into(), "x_train".into())]),
        )
        .unwrap();
        let b = instantiate(
            &mut dst,
            &src,
            "val",
            &HashMap::from([("x".into(), "x_val".into())]),
        )
        .unwrap();
        assert_eq!(a["y"], "train/y");
        assert_eq!(b["y"], "val/y");
        assert_eq!(dst.initializers.len(), 1, "the weight is shared");
        assert_eq!(dst.nodes.len(), 4);
        assert!(dst
            .nodes
            .iter()
            .any(|n| n.name == "val/mm" && n.inputs == ["x_val", "w"]));
        crate::ir::topo::toposort(&mut dst).unwrap();
        let facts = crate::shape::infer_graph(&dst, 18).unwrap();
        assert_eq!(facts.get("val/y").unwrap().display(), "f32[b, 2]");
    }

    #[test]
    fn unbound_undefined_input_is_an_error() {
        let src = affine();
        let mut dst = Graph::default();
        let e = instantiate(&mut dst, &src, "p", &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'x'") && e.contains("neither bound nor defined"),
            "{e}"
        );
    }
}
