//! A readable text form of models and graphs: one line per value declaration or node,
//! `%out = Op<attrs>(%in, ...)  # node name`. Used by `--dump` and by the snapshot tests, so
//! the output is stable (no addresses, no hash-map order).

use std::fmt::Write;

use crate::ir::{AttrValue, DataType, Graph, Model, Tensor, TensorData, ValueInfo, ValueType};

pub fn model(m: &Model) -> String {
    let mut s = String::new();
    let opsets: Vec<String> = m
        .opset_imports
        .iter()
        .map(|o| {
            let d = if o.domain.is_empty() {
                "ai.onnx"
            } else {
                &o.domain
            };
            format!("{d} {}", o.version)
        })
        .collect();
    let _ = writeln!(
        s,
        "model ir_version={} producer=\"{} {}\" opsets=[{}]",
        m.ir_version,
        m.producer_name,
        m.producer_version,
        opsets.join(", ")
    );
    for (k, v) in &m.metadata_props {
        let _ = writeln!(s, "meta {k} = {v:?}");
    }
    graph_into(&mut s, &m.graph, "");
    s
}

pub fn graph(g: &Graph) -> String {
    let mut s = String::new();
    graph_into(&mut s, g, "");
    s
}

fn value_type(t: &Option<ValueType>) -> String {
    match t {
        None => "?".into(),
        Some(ValueType::Other(_)) => "<non-tensor>".into(),
        Some(ValueType::Tensor { elem, shape, .. }) => match shape {
            None => format!("{}[..]", elem.short_name()),
            Some(dims) => format!(
                "{}[{}]",
                elem.short_name(),
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

fn value_info(v: &ValueInfo) -> String {
    format!("%{}: {}", v.name, value_type(&v.ty))
}

/// `f32[64, 8]`, plus the values when there are at most 8 of them.
pub fn tensor_summary(t: &Tensor) -> String {
    let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
    let mut s = format!("{}[{}]", t.dtype.short_name(), dims.join(", "));
    if t.numel().is_some_and(|n| n <= 8) {
        let vals = match &t.data {
            TensorData::Strings(v) => Some(
                v.iter()
                    .map(|b| format!("{:?}", String::from_utf8_lossy(b)))
                    .collect::<Vec<_>>(),
            ),
            // f32 prints through f32's Display, so 0.1 reads as 0.1, not its f64 widening.
            TensorData::Raw(_) if t.dtype == DataType::Float => t
                .to_f32_vec()
                .map(|v| v.iter().map(|x| x.to_string()).collect()),
            TensorData::Raw(_) => t
                .to_i64_vec()
                .map(|v| v.iter().map(|x| x.to_string()).collect())
                .or_else(|| {
                    t.to_f64_vec()
                        .map(|v| v.iter().map(|x| x.to_string()).collect())
                }),
        };
        if let Some(vals) = vals {
            let _ = write!(s, " = [{}]", vals.join(", "));
        }
    }
    s
}

fn attr(v: &AttrValue) -> String {
    fn list<T: ToString>(v: &[T]) -> String {
        format!(
            "[{}]",
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
    match v {
        AttrValue::Float(f) => format!("{f}"),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::String(b) => format!("{:?}", String::from_utf8_lossy(b)),
        AttrValue::Tensor(t) => format!("tensor<{}>", tensor_summary(t)),
        AttrValue::Graph(g) => format!("graph<{} nodes>", g.nodes.len()),
        AttrValue::SparseTensor(_) => "sparse_tensor".into(),
        AttrValue::Type(_) => "type".into(),
        AttrValue::Floats(v) => list(v),
        AttrValue::Ints(v) => list(v),
        AttrValue::Strings(v) => format!(
            "[{}]",
            v.iter()
                .map(|b| format!("{:?}", String::from_utf8_lossy(b)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AttrValue::Tensors(v) => format!("tensors<{}>", v.len()),
        AttrValue::Graphs(v) => format!("graphs<{}>", v.len()),
        AttrValue::SparseTensors(v) => format!("sparse_tensors<{}>", v.len()),
        AttrValue::Types(v) => format!("types<{}>", v.len()),
        AttrValue::Undefined => "undefined".into(),
    }
}

fn graph_into(s: &mut String, g: &Graph, indent: &str) {
    let _ = writeln!(s, "{indent}graph {:?} {{", g.name);
    for v in &g.inputs {
        let _ = writeln!(s, "{indent}  input  {}", value_info(v));
    }
    for v in &g.outputs {
        let _ = writeln!(s, "{indent}  output {}", value_info(v));
    }
    for (name, t) in &g.initializers {
        let _ = writeln!(s, "{indent}  const  %{name}: {}", tensor_summary(t));
    }
    for n in &g.nodes {
        let outs: Vec<String> = n.outputs.iter().map(|o| format!("%{o}")).collect();
        let ins: Vec<String> = n
            .inputs
            .iter()
            .map(|i| {
                if i.is_empty() {
                    "_".into()
                } else {
                    format!("%{i}")
                }
            })
            .collect();
        let op = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        let attrs = if n.attributes.is_empty() {
            String::new()
        } else {
            let a: Vec<String> = n
                .attributes
                .iter()
                .map(|a| format!("{}={}", a.name, attr(&a.value)))
                .collect();
            format!("<{}>", a.join(", "))
        };
        let _ = writeln!(
            s,
            "{indent}  {} = {op}{attrs}({})  # {}",
            outs.join(", "),
            ins.join(", "),
            n.name
        );
        for a in &n.attributes {
            let sub = format!("{indent}    ");
            match &a.value {
                AttrValue::Graph(g) => graph_into(s, g, &sub),
                AttrValue::Graphs(gs) => gs.iter().for_each(|g| graph_into(s, g, &sub)),
                _ => {}
            }
        }
    }
    let _ = writeln!(s, "{indent}}}");
}
