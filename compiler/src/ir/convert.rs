//! Lossless conversion between the prost ONNX messages and the IR.
//!
//! Import normalises tensor payloads to packed little-endian bytes and validates every size
//! (checked arithmetic, payload length against dims) before anything is allocated from it.
//! Export writes `raw_data` and sets optional fields only when they carry information, so
//! `import(export(import(m))) == import(m)` for every model.

use super::*;
use crate::error::{Error, Result};
use crate::proto::onnx::{
    attribute_proto::AttributeType, tensor_proto, tensor_shape_proto, type_proto,
};

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn props_in(p: &[pb::StringStringEntryProto]) -> Vec<(String, String)> {
    p.iter()
        .map(|e| (e.key().to_string(), e.value().to_string()))
        .collect()
}

fn props_out(p: &[(String, String)]) -> Vec<pb::StringStringEntryProto> {
    p.iter()
        .map(|(k, v)| pb::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(v.clone()),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// import

/// Longest name (node, value, tensor, attribute, op, domain, symbolic dim) the importer
/// accepts. Exporters write names of a few hundred bytes at most, and passes derive many names
/// from each one, so a 2 MB node name cost the fuzzer's mutant 12 GB and 18 s.
pub const MAX_NAME_BYTES: usize = 4096;

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.len() <= MAX_NAME_BYTES {
        return Ok(());
    }
    let mut cut = 64;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    Err(Error::Invalid(format!(
        "{what} '{}…' is {} bytes long; names are limited to {MAX_NAME_BYTES} bytes",
        crate::printable(&name[..cut]),
        name.len()
    )))
}

pub fn model_from_proto(m: pb::ModelProto) -> Result<Model> {
    let graph = m
        .graph
        .ok_or_else(|| Error::Invalid("the model has no graph".into()))?;
    Ok(Model {
        ir_version: m.ir_version.unwrap_or(0),
        opset_imports: m
            .opset_import
            .iter()
            .map(|o| OpsetImport {
                domain: o.domain().to_string(),
                version: o.version(),
                domain_explicit: o.domain.is_some(),
            })
            .collect(),
        producer_name: m.producer_name.unwrap_or_default(),
        producer_version: m.producer_version.unwrap_or_default(),
        domain: m.domain.unwrap_or_default(),
        model_version: m.model_version.unwrap_or(0),
        doc_string: m.doc_string.unwrap_or_default(),
        metadata_props: props_in(&m.metadata_props),
        graph: graph_from_proto(graph)?,
        passthrough: ModelPassthrough {
            functions: m.functions,
            training_info: m.training_info,
            configuration: m.configuration,
        },
    })
}

pub fn graph_from_proto(g: pb::GraphProto) -> Result<Graph> {
    let mut initializers = IndexMap::with_capacity(g.initializer.len());
    for t in g.initializer {
        let t = tensor_from_proto(t)?;
        if let Some(old) = initializers.insert(t.name.clone(), t) {
            return Err(Error::Graph(format!(
                "initializer '{}' is defined twice",
                old.name
            )));
        }
    }
    let nodes = g
        .node
        .into_iter()
        .map(node_from_proto)
        .collect::<Result<Vec<_>>>()?;
    Ok(Graph {
        name: g.name.unwrap_or_default(),
        doc_string: g.doc_string.unwrap_or_default(),
        inputs: g
            .input
            .into_iter()
            .map(value_info_from_proto)
            .collect::<Result<_>>()?,
        outputs: g
            .output
            .into_iter()
            .map(value_info_from_proto)
            .collect::<Result<_>>()?,
        value_info: g
            .value_info
            .into_iter()
            .map(value_info_from_proto)
            .collect::<Result<_>>()?,
        initializers,
        nodes,
        metadata_props: props_in(&g.metadata_props),
        passthrough: GraphPassthrough {
            sparse_initializers: g.sparse_initializer,
            quantization_annotation: g.quantization_annotation,
        },
    })
}

fn node_from_proto(n: pb::NodeProto) -> Result<Node> {
    check_name("node name", n.name())?;
    check_name("op type", n.op_type())?;
    check_name("op domain", n.domain())?;
    let label = format!("{} node '{}'", n.op_type(), n.name());
    for v in n.input.iter().chain(&n.output) {
        check_name(&format!("{label}: value name"), v)?;
    }
    let attributes = n
        .attribute
        .into_iter()
        .map(|a| attribute_from_proto(a).map_err(|e| Error::Invalid(format!("{label}: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Node {
        name: n.name.unwrap_or_default(),
        op_type: n.op_type.unwrap_or_default(),
        domain: n.domain.unwrap_or_default(),
        inputs: n.input,
        outputs: n.output,
        attributes,
        doc_string: n.doc_string.unwrap_or_default(),
        overload: n.overload.unwrap_or_default(),
        metadata_props: props_in(&n.metadata_props),
        device_configurations: n.device_configurations,
    })
}

fn attribute_from_proto(a: pb::AttributeProto) -> Result<Attribute> {
    let name = a.name.clone().unwrap_or_default();
    check_name("attribute name", &name)?;
    let ty = match a.r#type {
        Some(t) => AttributeType::try_from(t)
            .map_err(|_| Error::Invalid(format!("attribute '{name}' has unknown type {t}")))?,
        // IR < 2 files may omit the type: infer it from the one field that is set.
        None => infer_attr_type(&a),
    };
    let value = match ty {
        AttributeType::Float => AttrValue::Float(a.f.unwrap_or(0.0)),
        AttributeType::Int => AttrValue::Int(a.i.unwrap_or(0)),
        AttributeType::String => AttrValue::String(a.s.unwrap_or_default()),
        AttributeType::Tensor => {
            AttrValue::Tensor(tensor_from_proto(a.t.ok_or_else(|| missing(&name, "t"))?)?)
        }
        AttributeType::Graph => AttrValue::Graph(Box::new(graph_from_proto(
            a.g.ok_or_else(|| missing(&name, "g"))?,
        )?)),
        AttributeType::SparseTensor => AttrValue::SparseTensor(Box::new(
            a.sparse_tensor
                .ok_or_else(|| missing(&name, "sparse_tensor"))?,
        )),
        AttributeType::TypeProto => {
            AttrValue::Type(Box::new(a.tp.ok_or_else(|| missing(&name, "tp"))?))
        }
        AttributeType::Floats => AttrValue::Floats(a.floats),
        AttributeType::Ints => AttrValue::Ints(a.ints),
        AttributeType::Strings => AttrValue::Strings(a.strings),
        AttributeType::Tensors => AttrValue::Tensors(
            a.tensors
                .into_iter()
                .map(tensor_from_proto)
                .collect::<Result<_>>()?,
        ),
        AttributeType::Graphs => AttrValue::Graphs(
            a.graphs
                .into_iter()
                .map(graph_from_proto)
                .collect::<Result<_>>()?,
        ),
        AttributeType::SparseTensors => AttrValue::SparseTensors(a.sparse_tensors),
        AttributeType::TypeProtos => AttrValue::Types(a.type_protos),
        AttributeType::Undefined => AttrValue::Undefined,
    };
    Ok(Attribute {
        name,
        value,
        doc_string: a.doc_string.unwrap_or_default(),
        ref_attr_name: a.ref_attr_name.unwrap_or_default(),
    })
}

fn missing(attr: &str, field: &str) -> Error {
    Error::Invalid(format!(
        "attribute '{attr}' declares a type whose field '{field}' is unset"
    ))
}

fn infer_attr_type(a: &pb::AttributeProto) -> AttributeType {
    if a.f.is_some() {
        AttributeType::Float
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if a.sparse_tensor.is_some() {
        AttributeType::SparseTensor
    } else if a.tp.is_some() {
        AttributeType::TypeProto
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else if !a.sparse_tensors.is_empty() {
        AttributeType::SparseTensors
    } else if !a.type_protos.is_empty() {
        AttributeType::TypeProtos
    } else {
        AttributeType::Undefined
    }
}

fn value_info_from_proto(v: pb::ValueInfoProto) -> Result<ValueInfo> {
    check_name("value name", v.name())?;
    Ok(ValueInfo {
        name: v.name.unwrap_or_default(),
        ty: v.r#type.map(type_from_proto).transpose()?,
        doc_string: v.doc_string.unwrap_or_default(),
        metadata_props: props_in(&v.metadata_props),
    })
}

fn type_from_proto(t: pb::TypeProto) -> Result<ValueType> {
    if let Some(type_proto::Value::TensorType(tt)) = &t.value {
        if let Some(elem) = tt.elem_type.and_then(DataType::from_i32) {
            let (shape, dim_denotations) = match &tt.shape {
                None => (None, vec![]),
                Some(s) => {
                    for d in &s.dim {
                        if let Some(tensor_shape_proto::dimension::Value::DimParam(p)) = &d.value {
                            check_name("dimension name", p)?;
                        }
                    }
                    let dims = s
                        .dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(tensor_shape_proto::dimension::Value::DimValue(v)) => {
                                Dim::Known(*v)
                            }
                            Some(tensor_shape_proto::dimension::Value::DimParam(p)) => {
                                Dim::Sym(p.clone())
                            }
                            None => Dim::Unknown,
                        })
                        .collect();
                    let den = s.dim.iter().map(|d| d.denotation().to_string()).collect();
                    (Some(dims), den)
                }
            };
            return Ok(ValueType::Tensor {
                elem,
                shape,
                dim_denotations,
                denotation: t.denotation().to_string(),
            });
        }
    }
    Ok(ValueType::Other(Box::new(t)))
}

/// Converts a tensor to the canonical packed form, checking its size first.
pub fn tensor_from_proto(t: pb::TensorProto) -> Result<Tensor> {
    let name = t.name.clone().unwrap_or_default();
    check_name("tensor name", &name)?;
    let bad = |msg: String| Error::Invalid(format!("tensor '{name}': {msg}"));
    if t.segment.is_some() {
        return Err(bad("segmented tensors are not supported".into()));
    }
    if t.data_location == Some(tensor_proto::DataLocation::External as i32) {
        return Err(bad("external data was not resolved before import".into()));
    }
    let code = t.data_type.unwrap_or(0);
    let dtype = DataType::from_i32(code).ok_or_else(|| bad(format!("unknown data type {code}")))?;
    if let Some(d) = t.dims.iter().find(|&&d| d < 0) {
        return Err(bad(format!("negative dimension {d}")));
    }
    let numel = t
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
    let data = if dtype == DataType::String {
        if t.string_data.len() != numel {
            return Err(bad(format!(
                "holds {} strings but its dims {:?} need {numel}",
                t.string_data.len(),
                t.dims
            )));
        }
        TensorData::Strings(t.string_data)
    } else {
        let want = dtype
            .byte_len(numel)
            .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
        let raw = typed_to_raw(&t, dtype, numel).map_err(bad)?;
        if raw.len() != want {
            return Err(bad(format!(
                "holds {} bytes of data but its dims {:?} of {} need {want}",
                raw.len(),
                t.dims,
                dtype.short_name()
            )));
        }
        TensorData::Raw(raw)
    };
    Ok(Tensor {
        name,
        dtype,
        dims: t.dims,
        data,
        doc_string: t.doc_string.unwrap_or_default(),
        metadata_props: props_in(&t.metadata_props),
    })
}

/// Packs the typed repeated fields (`float_data`, `int32_data`, ...) into little-endian bytes.
fn typed_to_raw(
    t: &pb::TensorProto,
    dtype: DataType,
    numel: usize,
) -> std::result::Result<bytes::Bytes, String> {
    if let Some(raw) = &t.raw_data {
        return Ok(raw.clone());
    }
    use DataType::*;
    // Never trust `numel` for an allocation: the element count comes from the payload itself.
    let _ = numel;
    let v: Vec<u8> = match dtype {
        Float => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Complex64 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Double | Complex128 => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Int64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Uint32 => t
            .uint64_data
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect(),
        Uint64 => t.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Int32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Int16 | Uint16 | Float16 | Bfloat16 => t
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect(),
        // One byte per int32 element (sub-byte types arrive already packed two per byte).
        Int8 | Uint8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
        | Float8e8m0 | Uint4 | Int4 | Float4e2m1 | Uint2 | Int2 => {
            t.int32_data.iter().map(|&v| v as u8).collect()
        }
        String => unreachable!("strings are handled by the caller"),
    };
    Ok(v.into())
}

// ---------------------------------------------------------------------------------------------
// export

/// Writes IR models into `folder` through [`crate::onnx_io::write_models_sharing_data`]: their
/// large tensors in one data file `data_name` every model references, a tensor several models
/// share stored once. The messages live only while this call writes them.
pub fn write_models_sharing_data(
    folder: &std::path::Path,
    models: &[(&str, &Model)],
    data_name: &str,
    threshold: usize,
) -> Result<()> {
    let protos: Vec<(&str, pb::ModelProto)> = models
        .iter()
        .map(|(file, model)| (*file, model_to_proto(model)))
        .collect();
    let refs: Vec<(&str, &pb::ModelProto)> = protos.iter().map(|(f, p)| (*f, p)).collect();
    crate::onnx_io::write_models_sharing_data(folder, &refs, data_name, threshold)?;
    Ok(())
}

pub fn model_to_proto(m: &Model) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: Some(m.ir_version),
        opset_import: m
            .opset_imports
            .iter()
            .map(|o| pb::OperatorSetIdProto {
                domain: (o.domain_explicit || !o.domain.is_empty()).then(|| o.domain.clone()),
                version: Some(o.version),
            })
            .collect(),
        producer_name: opt(&m.producer_name),
        producer_version: opt(&m.producer_version),
        domain: opt(&m.domain),
        model_version: (m.model_version != 0).then_some(m.model_version),
        doc_string: opt(&m.doc_string),
        graph: Some(graph_to_proto(&m.graph)),
        metadata_props: props_out(&m.metadata_props),
        training_info: m.passthrough.training_info.clone(),
        functions: m.passthrough.functions.clone(),
        configuration: m.passthrough.configuration.clone(),
    }
}

pub fn graph_to_proto(g: &Graph) -> pb::GraphProto {
    pb::GraphProto {
        node: g.nodes.iter().map(node_to_proto).collect(),
        name: opt(&g.name),
        initializer: g.initializers.values().map(tensor_to_proto).collect(),
        sparse_initializer: g.passthrough.sparse_initializers.clone(),
        doc_string: opt(&g.doc_string),
        input: g.inputs.iter().map(value_info_to_proto).collect(),
        output: g.outputs.iter().map(value_info_to_proto).collect(),
        value_info: g.value_info.iter().map(value_info_to_proto).collect(),
        quantization_annotation: g.passthrough.quantization_annotation.clone(),
        metadata_props: props_out(&g.metadata_props),
    }
}

fn node_to_proto(n: &Node) -> pb::NodeProto {
    pb::NodeProto {
        input: n.inputs.clone(),
        output: n.outputs.clone(),
        name: opt(&n.name),
        op_type: Some(n.op_type.clone()),
        domain: opt(&n.domain),
        overload: opt(&n.overload),
        attribute: n.attributes.iter().map(attribute_to_proto).collect(),
        doc_string: opt(&n.doc_string),
        metadata_props: props_out(&n.metadata_props),
        device_configurations: n.device_configurations.clone(),
    }
}

fn attribute_to_proto(a: &Attribute) -> pb::AttributeProto {
    let mut p = pb::AttributeProto {
        name: Some(a.name.clone()),
        ref_attr_name: opt(&a.ref_attr_name),
        doc_string: opt(&a.doc_string),
        ..Default::default()
    };
    let ty = match &a.value {
        AttrValue::Float(v) => {
            p.f = Some(*v);
            AttributeType::Float
        }
        AttrValue::Int(v) => {
            p.i = Some(*v);
            AttributeType::Int
        }
        AttrValue::String(v) => {
            p.s = Some(v.clone());
            AttributeType::String
        }
        AttrValue::Tensor(t) => {
            p.t = Some(tensor_to_proto(t));
            AttributeType::Tensor
        }
        AttrValue::Graph(g) => {
            p.g = Some(graph_to_proto(g));
            AttributeType::Graph
        }
        AttrValue::SparseTensor(s) => {
            p.sparse_tensor = Some((**s).clone());
            AttributeType::SparseTensor
        }
        AttrValue::Type(t) => {
            p.tp = Some((**t).clone());
            AttributeType::TypeProto
        }
        AttrValue::Floats(v) => {
            p.floats = v.clone();
            AttributeType::Floats
        }
        AttrValue::Ints(v) => {
            p.ints = v.clone();
            AttributeType::Ints
        }
        AttrValue::Strings(v) => {
            p.strings = v.clone();
            AttributeType::Strings
        }
        AttrValue::Tensors(v) => {
            p.tensors = v.iter().map(tensor_to_proto).collect();
            AttributeType::Tensors
        }
        AttrValue::Graphs(v) => {
            p.graphs = v.iter().map(graph_to_proto).collect();
            AttributeType::Graphs
        }
        AttrValue::SparseTensors(v) => {
            p.sparse_tensors = v.clone();
            AttributeType::SparseTensors
        }
        AttrValue::Types(v) => {
            p.type_protos = v.clone();
            AttributeType::TypeProtos
        }
        AttrValue::Undefined => AttributeType::Undefined,
    };
    p.r#type = Some(ty as i32);
    p
}

fn value_info_to_proto(v: &ValueInfo) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: Some(v.name.clone()),
        r#type: v.ty.as_ref().map(type_to_proto),
        doc_string: opt(&v.doc_string),
        metadata_props: props_out(&v.metadata_props),
    }
}

pub fn type_to_proto(t: &ValueType) -> pb::TypeProto {
    match t {
        ValueType::Other(p) => (**p).clone(),
        ValueType::Tensor {
            elem,
            shape,
            dim_denotations,
            denotation,
        } => pb::TypeProto {
            denotation: opt(denotation),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(*elem as i32),
                shape: shape.as_ref().map(|dims| pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .enumerate()
                        .map(|(i, d)| tensor_shape_proto::Dimension {
                            denotation: dim_denotations.get(i).and_then(|s| opt(s)),
                            value: match d {
                                Dim::Known(v) => {
                                    Some(tensor_shape_proto::dimension::Value::DimValue(*v))
                                }
                                Dim::Sym(s) => {
                                    Some(tensor_shape_proto::dimension::Value::DimParam(s.clone()))
                                }
                                Dim::Unknown => None,
                            },
                        })
                        .collect(),
                }),
            })),
        },
    }
}

pub fn tensor_to_proto(t: &Tensor) -> pb::TensorProto {
    let mut p = pb::TensorProto {
        dims: t.dims.clone(),
        data_type: Some(t.dtype as i32),
        name: opt(&t.name),
        doc_string: opt(&t.doc_string),
        metadata_props: props_out(&t.metadata_props),
        ..Default::default()
    };
    match &t.data {
        TensorData::Raw(b) => p.raw_data = Some(b.clone()),
        TensorData::Strings(s) => p.string_data = s.clone(),
    }
    p
}
