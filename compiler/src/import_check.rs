//! The rules of the ONNX checker that matter to bidora, run on every model the importer loads
//! ([`crate::load_model`], [`crate::load_model_bytes`], export's source model) before any
//! pass reads it. ONNX Runtime enforces each of them when it loads a model, so a model that
//! broke one used to compile into an artifact that ONNX Runtime refused, far from the cause;
//! the tract backend and the shape rules often took such a model silently (a misspelled
//! attribute read as its default). Each refusal names the node (op type and name), the rule
//! and what the user can do.
//!
//! 1. **IR version** within the range onnx.proto's `Version` enum defines.
//! 2. **Opset**: the ai.onnx opset is one the op tables know ([`crate::check_opset`]).
//! 3. **Unique names**: graph inputs and graph outputs are declared once, every value is
//!    assigned once (a node output is no graph input, initializer or other node output),
//!    a node sets each attribute once. An initializer may share a graph input's name: that
//!    is a default a caller may override, legal ONNX.
//! 4. **Attribute sizes**: lists, strings and tensors in attributes are bounded.
//! 5. **Known attributes**: each attribute of a supported op is one the op has at the model's
//!    opset, of the spec's type ([`crate::ops::OpDef::attrs`]). Unknown ops are left to the
//!    shape inference, which names them with what to do.
//! 6. **One element type** for the inputs the spec types with one variable (MatMul's `A: T,
//!    B: T`). That one needs the inferred dtypes of intermediate values, so the inference
//!    driver runs it ([`crate::shape::same_types`]) at every node: on the input model before the rewrite
//!    (`pipeline::compile` type-checks it first) and on every emitted program
//!    ([`crate::check::program`]).
//!
//! The rules look at the main graph; subgraphs belong to ops (If, Loop, Scan) that have no
//! shape rule here, so a model with one is refused by inference anyway.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::ir::convert::MAX_NAME_BYTES;
use crate::ir::{AttrValue, Model, Node, TensorData};
use crate::ops::{self, AttrKind};
use crate::proto::onnx::Version;

/// The first IR version with `opset_import` (2017-11-03); older files have no opset, and the
/// importer needs one to know the ops' semantics.
pub const MIN_IR_VERSION: i64 = Version::IrVersion2017113 as i64;
/// The newest IR version in the vendored onnx.proto's `Version` enum (`IR_VERSION`). A file
/// stamped higher comes from an ONNX this bidora does not know, or was corrupted (99).
pub const MAX_IR_VERSION: i64 = Version::IrVersion as i64;

/// Most elements in an ints or floats attribute, and most strings in a strings attribute.
/// The largest real ones are a Constant's `value_ints` (a shape, a few entries) or Conv's
/// `pads`; passes copy a node's attributes into every program they emit.
pub const MAX_ATTR_ELEMENTS: usize = 1 << 20;
/// Longest string in an attribute (Conv's `auto_pad`, DoRA's `module`): names, so the name cap.
pub const MAX_ATTR_STRING_BYTES: usize = MAX_NAME_BYTES;
/// Largest tensor (or list of tensors, or sparse tensor) in an attribute. Exporters put
/// weights in initializers, which are stored once and may live in external data; a Constant
/// node's tensor is copied with the node into each program.
pub const MAX_ATTR_TENSOR_BYTES: usize = 1 << 28;

pub use crate::error::Violation;

/// Rules 1 to 5 on a freshly imported model.
pub fn model(m: &Model) -> Result<()> {
    if !(MIN_IR_VERSION..=MAX_IR_VERSION).contains(&m.ir_version) {
        return Err(Violation::IrVersion {
            found: m.ir_version,
            min: MIN_IR_VERSION,
            max: MAX_IR_VERSION,
        }
        .into());
    }
    crate::check_opset(m)?;
    let opset = m.onnx_opset().unwrap_or(crate::MAX_OPSET);
    names(m)?;
    for n in &m.graph.nodes {
        attribute_sizes(n)?;
        known_attributes(n, opset)?;
    }
    Ok(())
}

fn names(m: &Model) -> Result<()> {
    let g = &m.graph;
    // Value name → what defines it, for the message of a second definition.
    let mut defined: HashMap<&str, String> = HashMap::new();
    let mut inputs = HashSet::new();
    for i in &g.inputs {
        if !inputs.insert(i.name.as_str()) {
            return Err(Violation::DuplicateInput {
                name: i.name.clone(),
            }
            .into());
        }
        defined.insert(&i.name, format!("graph input '{}'", i.name));
    }
    for name in g.initializers.keys() {
        // Beside an input of the same name it is the input's default value: legal ONNX.
        defined
            .entry(name)
            .or_insert_with(|| format!("initializer '{name}'"));
    }
    for n in &g.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if let Some(first) = defined.get(o.as_str()) {
                return Err(Violation::Reassigned {
                    node: n.label(),
                    value: o.clone(),
                    first: first.clone(),
                }
                .into());
            }
            defined.insert(o, n.label());
        }
        let mut attrs = HashSet::new();
        for a in &n.attributes {
            if !attrs.insert(a.name.as_str()) {
                return Err(Violation::DuplicateAttribute {
                    node: n.label(),
                    attr: a.name.clone(),
                }
                .into());
            }
        }
    }
    // Legal to ONNX Runtime, but every program keeps the model's outputs and
    // `check::program` refuses a repeated one there: refused here, it is the model's fault
    // with a message, not a failed check blamed on the compiler.
    let mut outputs = HashSet::new();
    for o in &g.outputs {
        if !outputs.insert(o.name.as_str()) {
            return Err(Violation::DuplicateOutput {
                name: o.name.clone(),
            }
            .into());
        }
    }
    Ok(())
}

fn attribute_sizes(n: &Node) -> Result<()> {
    for a in &n.attributes {
        let too_large = |size: usize, unit: &'static str, limit: usize| {
            (size > limit).then(|| Violation::AttributeTooLarge {
                node: n.label(),
                attr: a.name.clone(),
                size,
                unit,
                limit,
            })
        };
        let longest = |v: &[Vec<u8>]| v.iter().map(Vec::len).max().unwrap_or(0);
        let found = match &a.value {
            AttrValue::Ints(v) => too_large(v.len(), "elements", MAX_ATTR_ELEMENTS),
            AttrValue::Floats(v) => too_large(v.len(), "elements", MAX_ATTR_ELEMENTS),
            AttrValue::String(s) => too_large(s.len(), "bytes", MAX_ATTR_STRING_BYTES),
            AttrValue::Strings(v) => too_large(v.len(), "strings", MAX_ATTR_ELEMENTS)
                .or_else(|| too_large(longest(v), "bytes in one string", MAX_ATTR_STRING_BYTES)),
            AttrValue::Tensor(t) => too_large(tensor_bytes(t), "bytes", MAX_ATTR_TENSOR_BYTES),
            AttrValue::Tensors(v) => too_large(
                v.iter().map(tensor_bytes).sum(),
                "bytes",
                MAX_ATTR_TENSOR_BYTES,
            ),
            AttrValue::SparseTensor(s) => too_large(
                prost::Message::encoded_len(&**s),
                "bytes",
                MAX_ATTR_TENSOR_BYTES,
            ),
            _ => None,
        };
        if let Some(v) = found {
            return Err(v.into());
        }
    }
    Ok(())
}

fn tensor_bytes(t: &crate::ir::Tensor) -> usize {
    match &t.data {
        TensorData::Raw(b) => b.len(),
        TensorData::Strings(s) => s.iter().map(Vec::len).sum(),
    }
}

fn known_attributes(n: &Node, opset: i64) -> Result<()> {
    let Some(def) = ops::lookup(&n.domain, &n.op_type) else {
        return Ok(());
    };
    // The opset ranges are ai.onnx's; the compiler's own domain has one version.
    let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
    for a in &n.attributes {
        let Some(spec) = def.attrs.iter().find(|d| d.name == a.name) else {
            let known: Vec<String> = def
                .attrs
                .iter()
                .filter(|d| !onnx || d.in_opset(opset))
                .map(|d| format!("'{}'", d.name))
                .collect();
            return Err(Violation::UnknownAttribute {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                opset,
                known: if known.is_empty() {
                    "no attributes".into()
                } else {
                    known.join(", ")
                },
            }
            .into());
        };
        if onnx && !spec.in_opset(opset) {
            return Err(Violation::AttributeNotInOpset {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                opset,
                range: match (spec.since, spec.until) {
                    (s, i64::MAX) => format!("from opset {s}"),
                    (1, u) => format!("up to opset {u}"),
                    (s, u) => format!("at opsets {s} to {u}"),
                },
            }
            .into());
        }
        let found = AttrKind::of(&a.value);
        if found != Some(spec.kind) {
            return Err(Violation::AttributeType {
                node: n.label(),
                op: n.op_type.clone(),
                attr: a.name.clone(),
                found: match found {
                    Some(k) => k.name(),
                    None => "of a type no supported op takes (a graph, type or reference)",
                },
                expected: spec.kind.name(),
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use prost::Message;

    use super::*;
    use crate::ir::{Attribute, DataType, Dim, Graph, OpsetImport, Tensor, ValueInfo, ValueType};

    fn f32_input(name: &str) -> ValueInfo {
        ValueInfo::new(
            name,
            ValueType::tensor(
                DataType::Float,
                vec![Dim::Sym("batch".into()), Dim::Known(4)],
            ),
        )
    }

    /// x[batch, 4] → MatMul(x, w[4, 4]) → Softmax → y, at `opset`; `w` in `w_dtype`.
    fn model(opset: i64, w_dtype: DataType) -> Model {
        let mut g = Graph::default();
        g.inputs.push(f32_input("x"));
        g.outputs.push(f32_input("y"));
        let w: Vec<f64> = (0..16).map(|i| i as f64 * 0.1).collect();
        g.initializers.insert(
            "w".into(),
            Tensor::from_f64_as(w_dtype, "w", vec![4, 4], &w),
        );
        g.nodes.push(Node::new(
            "MatMul",
            "mm",
            vec!["x".into(), "w".into()],
            vec!["h".into()],
        ));
        g.nodes.push(
            Node::new("Softmax", "sm", vec!["h".into()], vec!["y".into()])
                .with_attr("axis", AttrValue::Int(-1)),
        );
        let mut m = Model::emitted(g, opset, "");
        m.ir_version = 8;
        m
    }

    fn ok() -> Model {
        model(17, DataType::Float)
    }

    /// The model through the importer's real path: encoded, decoded, converted, checked.
    fn load(m: &Model) -> Result<Model> {
        let bytes = crate::ir::convert::model_to_proto(m).encode_to_vec();
        crate::load_model_bytes(bytes, Path::new("m.onnx"))
    }

    fn refused(m: &Model) -> String {
        match load(m) {
            Ok(_) => panic!("the model was accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn node<'a>(m: &'a mut Model, name: &str) -> &'a mut Node {
        m.graph.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    fn set_attr(n: &mut Node, name: &str, value: AttrValue) {
        n.attributes.retain(|a| a.name != name);
        n.attributes.push(Attribute {
            name: name.into(),
            value,
            doc_string: String::new(),
            ref_attr_name: String::new(),
        });
    }

    #[test]
    fn the_base_model_loads_and_types() {
        crate::shape::infer(&load(&ok()).unwrap()).unwrap();
    }

    #[test]
    fn ir_versions_outside_onnx_protos_enum_are_refused() {
        for bad in [99, 14, 2, -1] {
            let mut m = ok();
            m.ir_version = bad;
            let e = refused(&m);
            // Negative versions already stop in the decoder, which names them too.
            assert!(e.contains(&format!("ir_version {bad}")), "{e}");
            if bad > 0 {
                assert!(e.contains("(3 to 13, the versions in onnx.proto"), "{e}");
            }
        }
        for good in [MIN_IR_VERSION, 8, 10, MAX_IR_VERSION] {
            let mut m = ok();
            m.ir_version = good;
            load(&m).unwrap();
        }
    }

    #[test]
    fn opsets_outside_the_op_tables_are_refused() {
        for bad in [1, 12, 24] {
            let e = refused(&model(bad, DataType::Float));
            assert!(
                e.contains(&format!("opset {bad}; bidora supports opsets 13 to 23")),
                "{e}"
            );
        }
        let mut m = ok();
        m.opset_imports = vec![OpsetImport::new("com.example", 1)];
        assert!(refused(&m).contains("imports no ai.onnx opset"));
    }

    #[test]
    fn a_graph_input_declared_twice_is_refused() {
        let mut m = ok();
        m.graph.inputs.push(f32_input("x"));
        let e = refused(&m);
        assert!(e.contains("graph input 'x' is declared twice"), "{e}");
    }

    #[test]
    fn an_initializer_may_share_an_inputs_name() {
        // `w` listed as an input too: a default the caller may override (legal ONNX).
        let mut m = ok();
        m.graph.inputs.push(ValueInfo::new(
            "w",
            ValueType::tensor(DataType::Float, vec![Dim::Known(4), Dim::Known(4)]),
        ));
        load(&m).unwrap();
    }

    #[test]
    fn a_value_assigned_twice_is_refused_naming_both_definitions() {
        let mut m = ok();
        m.graph.nodes.push(Node::new(
            "Relu",
            "again",
            vec!["x".into()],
            vec!["h".into()],
        ));
        let e = refused(&m);
        assert!(
            e.contains("Relu node 'again' assigns 'h', which MatMul node 'mm' already defines"),
            "{e}"
        );

        let mut m = ok();
        node(&mut m, "sm").outputs = vec!["x".into()];
        m.graph.outputs[0].name = "x".into();
        let e = refused(&m);
        assert!(
            e.contains("Softmax node 'sm' assigns 'x', which graph input 'x' already defines"),
            "{e}"
        );

        let mut m = ok();
        node(&mut m, "sm").outputs = vec!["w".into()];
        let e = refused(&m);
        assert!(e.contains("which initializer 'w' already defines"), "{e}");

        let mut m = ok();
        node(&mut m, "mm").outputs = vec!["h".into(), "h".into()];
        let e = refused(&m);
        assert!(
            e.contains("MatMul node 'mm' assigns 'h', which MatMul node 'mm'"),
            "{e}"
        );
    }

    #[test]
    fn a_graph_output_or_attribute_declared_twice_is_refused() {
        let mut m = ok();
        m.graph.outputs.push(f32_input("y"));
        let e = refused(&m);
        assert!(e.contains("graph output 'y' is declared twice"), "{e}");

        let mut m = ok();
        let sm = node(&mut m, "sm");
        *sm = sm.clone().with_attr("axis", AttrValue::Int(0));
        let e = refused(&m);
        assert!(
            e.contains("Softmax node 'sm' sets attribute 'axis' twice"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelled_attribute_is_refused_with_the_known_ones() {
        let mut m = ok();
        let sm = node(&mut m, "sm");
        sm.attributes.clear();
        set_attr(sm, "axsi", AttrValue::Int(-1));
        let e = refused(&m);
        assert!(
            e.contains(
                "Softmax node 'sm' has attribute 'axsi', which Softmax does not have (at \
                 opset 17 it takes 'axis')"
            ),
            "{e}"
        );
        assert!(e.contains("what you can do"), "{e}");

        let mut m = ok();
        set_attr(node(&mut m, "mm"), "transB", AttrValue::Int(1));
        let e = refused(&m);
        assert!(
            e.contains("which MatMul does not have (at opset 17 it takes no attributes)"),
            "{e}"
        );
    }

    #[test]
    fn an_attribute_of_another_opset_is_refused() {
        // ReduceMean's axes became an input at opset 18; Cast's saturate arrived at 19.
        let reduce = |opset: i64| {
            let mut m = model(opset, DataType::Float);
            let mut n = Node::new("ReduceMean", "mean", vec!["h".into()], vec!["y".into()]);
            set_attr(&mut n, "axes", AttrValue::Ints(vec![-1]));
            *node(&mut m, "sm") = n;
            m
        };
        load(&reduce(17)).unwrap();
        let e = refused(&reduce(18));
        assert!(
            e.contains(
                "ReduceMean node 'mean' has attribute 'axes', which ReduceMean takes up to \
                 opset 17 only, not at the model's opset 18"
            ),
            "{e}"
        );
        let cast = |opset: i64| {
            let mut m = model(opset, DataType::Float);
            let mut n = Node::new("Cast", "cast", vec!["h".into()], vec!["y".into()]);
            set_attr(&mut n, "to", AttrValue::Int(DataType::Float as i64));
            set_attr(&mut n, "saturate", AttrValue::Int(1));
            *node(&mut m, "sm") = n;
            m
        };
        load(&cast(19)).unwrap();
        let e = refused(&cast(17));
        assert!(e.contains("which Cast takes from opset 19 only"), "{e}");
    }

    #[test]
    fn an_attribute_of_the_wrong_type_is_refused() {
        // The shape rule reads axis with attr_int: a float would silently become -1.
        let mut m = ok();
        set_attr(node(&mut m, "sm"), "axis", AttrValue::Float(0.0));
        let e = refused(&m);
        assert!(
            e.contains(
                "Softmax node 'sm': attribute 'axis' is a float, but Softmax's 'axis' is an int"
            ),
            "{e}"
        );
    }

    #[test]
    fn oversized_attributes_are_refused() {
        let mut m = ok();
        let t = Node::new("Transpose", "t", vec!["h".into()], vec!["y".into()])
            .with_attr("perm", AttrValue::Ints(vec![0; MAX_ATTR_ELEMENTS + 1]));
        *node(&mut m, "sm") = t;
        let e = refused(&m);
        assert!(
            e.contains(&format!(
                "Transpose node 't': attribute 'perm' holds {} elements, over the limit of {}",
                MAX_ATTR_ELEMENTS + 1,
                MAX_ATTR_ELEMENTS
            )),
            "{e}"
        );

        let mut m = ok();
        let g = Node::new("Gelu", "gelu", vec!["h".into()], vec!["y".into()]).with_attr(
            "approximate",
            AttrValue::String(vec![b'a'; MAX_ATTR_STRING_BYTES + 1]),
        );
        *node(&mut m, "sm") = g;
        let e = refused(&m);
        assert!(
            e.contains("Gelu node 'gelu': attribute 'approximate' holds 4097 bytes"),
            "{e}"
        );

        // Checked on the IR directly: encoding 256 MiB to go through the decoder would only
        // make the test slow. calloc'd zeros, never touched.
        let mut m = ok();
        let big = Tensor::from_raw(
            "",
            DataType::Uint8,
            vec![MAX_ATTR_TENSOR_BYTES as i64 + 1],
            vec![0; MAX_ATTR_TENSOR_BYTES + 1],
        );
        m.graph.nodes.push(
            Node::new("Constant", "c", vec![], vec!["big".into()])
                .with_attr("value", AttrValue::Tensor(big)),
        );
        let e = super::model(&m).unwrap_err().to_string();
        assert!(
            e.contains("Constant node 'c': attribute 'value' holds 268435457 bytes"),
            "{e}"
        );
    }

    #[test]
    fn an_f64_weight_beside_f32_activations_is_refused_naming_both() {
        // It imports (the types of intermediate values need inference), and the type check
        // that the compile runs first refuses it.
        let m = load(&model(17, DataType::Double)).unwrap();
        let e = crate::shape::infer(&m).unwrap_err().to_string();
        assert!(
            e.contains(
                "MatMul node 'mm' takes 'x' as f32 and 'w' as f64, but MatMul needs all its \
                 inputs to share one element type"
            ),
            "{e}"
        );
        assert!(e.contains("cast the weight"), "{e}");
        assert!(e.contains("re-export the model in one dtype"), "{e}");
    }

    #[test]
    fn inputs_of_independent_types_may_differ() {
        // Pow's exponent (T1) and Where's condition (B) are typed apart from the data.
        let mut m = ok();
        m.graph
            .initializers
            .insert("two".into(), Tensor::from_i64("two", vec![], &[2]));
        *node(&mut m, "sm") = Node::new(
            "Pow",
            "pow",
            vec!["h".into(), "two".into()],
            vec!["y".into()],
        );
        crate::shape::infer(&load(&m).unwrap()).unwrap();

        let mut m = ok();
        m.graph.initializers.insert(
            "c".into(),
            Tensor::from_raw("c", DataType::Bool, vec![], vec![1]),
        );
        m.graph.initializers.insert(
            "half".into(),
            Tensor::from_f64_as(DataType::Float16, "half", vec![], &[0.5]),
        );
        *node(&mut m, "sm") = Node::new(
            "Where",
            "where",
            vec!["c".into(), "h".into(), "half".into()],
            vec!["y".into()],
        );
        let e = crate::shape::infer(&load(&m).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Where node 'where' takes 'h' as f32 and 'half' as f16, but Where needs those inputs"),
            "{e}"
        );
    }

    /// Every fixture, as real exporters wrote it (both torch exporters, f16/bf16, external
    /// data), passes every rule: a rule that refused one would be wrong, not the fixture.
    #[test]
    fn every_fixture_passes() {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "onnx") {
                    out.push(p);
                }
            }
        }
        let mut files = vec![];
        walk(&crate::fuzz::models_dir(), &mut files);
        assert!(files.len() >= 20, "{files:?}");
        for f in files {
            let m = crate::load_model(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            crate::shape::infer(&m).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }
}
