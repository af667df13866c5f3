//! Shape inference on every fixture, checked against what the exporters declared: graph
//! outputs, and (dynamo exports) the `value_info` annotation of every intermediate value.
//! The adapted (composite DoRA) and forward (lowered) graphs must infer too.

use bidora_compiler::ir::{Dim, ValueInfo, ValueType};
use bidora_compiler::load_model;
use bidora_compiler::rewrite::Method;
use bidora_compiler::shape::{self, DimExpr, Facts};
use bidora_tests::*;

fn declared(v: &ValueInfo) -> Option<(bidora_compiler::ir::DataType, Vec<Dim>)> {
    match &v.ty {
        Some(ValueType::Tensor {
            elem,
            shape: Some(s),
            ..
        }) => Some((*elem, s.clone())),
        _ => None,
    }
}

/// Compares one declared type with the inferred fact; returns a mismatch description.
fn mismatch(facts: &Facts, v: &ValueInfo) -> Option<String> {
    let (elem, dims) = declared(v)?;
    let f = facts.get(&v.name)?;
    let same_rank = f.shape.len() == dims.len();
    let dims_agree = same_rank
        && dims.iter().zip(&f.shape).all(|(d, e)| match d {
            Dim::Known(k) => e.as_known() == Some(*k),
            // Exporters' symbol names differ from ours (s0 vs sequence); a symbol must not be
            // inferred as a number unless the exporter did.
            Dim::Sym(_) | Dim::Unknown => e.is_symbolic() || *e == DimExpr::known(1),
        });
    (f.dtype != elem || !dims_agree).then(|| {
        format!(
            "'{}': declared {:?} {:?}, inferred {}",
            v.name,
            elem,
            dims,
            f.display()
        )
    })
}

#[test]
fn every_value_of_every_fixture_gets_a_fact_matching_the_exporter() {
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(&path).unwrap();
        let facts = shape::infer(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in &model.graph.nodes {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                assert!(
                    facts.get(o).is_some(),
                    "{name}: no fact for '{o}' of {}",
                    n.label()
                );
            }
        }
        let mut bad = vec![];
        for v in model.graph.outputs.iter().chain(&model.graph.value_info) {
            bad.extend(mismatch(&facts, v));
        }
        assert!(
            bad.is_empty(),
            "{name}: {} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
        let opaque = model
            .graph
            .nodes
            .iter()
            .flat_map(|n| &n.outputs)
            .filter(|o| {
                facts
                    .get(o)
                    .is_some_and(|f| f.shape.iter().any(|d| d.to_string().contains('?')))
            })
            .count();
        eprintln!(
            "{name}: {} values, {} declared value_info checked, {opaque} with an opaque dim",
            facts.len(),
            model.graph.value_info.len()
        );
        // Every dim is a number or a product of the input symbols: nothing is left unknown.
        assert_eq!(opaque, 0, "{name}: values with an opaque dim");
        let logits = facts.get(&model.graph.outputs[0].name).unwrap();
        let want_rank = if family(&path) == "gpt2" { 3 } else { 2 };
        assert_eq!(logits.rank(), want_rank, "{name}: {}", logits.display());
        assert!(
            logits.shape[0].is_symbolic(),
            "{name}: batch stays symbolic: {}",
            logits.display()
        );

        let c = compile(&model, &options(qv_targets(&family(&path)), Method::Dora));
        shape::infer(&c.adapted).unwrap_or_else(|e| panic!("{name} adapted: {e}"));
        let ff = shape::infer(&c.forward).unwrap_or_else(|e| panic!("{name} forward: {e}"));
        assert_eq!(
            ff.get(&c.forward.graph.outputs[0].name).unwrap().display(),
            logits.display(),
            "{name}: the adapted model's output shape changed"
        );
    }
}
