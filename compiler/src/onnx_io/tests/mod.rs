//! Tests of model I/O: schema round trips, external data, refusals, atomic writes.

use super::*;
use crate::proto::onnx::tensor_proto::Segment;
use crate::proto::onnx::{
    attribute_proto::AttributeType, simple_sharded_dim_proto, tensor_shape_proto, type_proto,
    DeviceConfigurationProto, IntIntListEntryProto, NodeDeviceConfigurationProto,
    OperatorSetIdProto, ShardedDimProto, ShardingSpecProto, SimpleShardedDimProto,
    TensorAnnotation, TensorShapeProto, TypeProto, ValueInfoProto,
};

mod files;
mod schema;

// --- builders -------------------------------------------------------------------------

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn kv(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: s(key),
        value: s(value),
    }
}

fn props(owner: &str) -> Vec<StringStringEntryProto> {
    vec![kv("owner", owner), kv("note", &format!("{owner} note"))]
}

/// Deterministic bytes that differ per seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn raw(name: &str, dims: &[i64], data_type: DataType, bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: s(name),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(bytes.into()),
        ..Default::default()
    }
}

fn floats(name: &str, n: usize, seed: u64) -> TensorProto {
    raw(name, &[n as i64], DataType::Float, pattern(n * 4, seed))
}

fn dim_value(v: i64) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimValue(v)),
        denotation: None,
    }
}

fn dim_param(p: &str) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimParam(p.into())),
        denotation: None,
    }
}

fn tensor_type(elem: DataType, dims: Vec<tensor_shape_proto::Dimension>) -> TypeProto {
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem as i32),
            shape: Some(TensorShapeProto { dim: dims }),
        })),
        denotation: None,
    }
}

/// One TypeProto of each variant, with denotations and every kind of dimension.
fn every_type() -> Vec<TypeProto> {
    let mut batch = dim_value(2);
    batch.denotation = s("DATA_BATCH");
    let unknown = tensor_shape_proto::Dimension::default();
    let mut image = tensor_type(DataType::Float, vec![batch, dim_param("seq"), unknown]);
    image.denotation = s("IMAGE");
    let wrap = |value| TypeProto {
        value: Some(value),
        denotation: None,
    };
    vec![
        image,
        wrap(type_proto::Value::SequenceType(Box::new(
            type_proto::Sequence {
                elem_type: Some(Box::new(tensor_type(DataType::Int64, vec![]))),
            },
        ))),
        wrap(type_proto::Value::MapType(Box::new(type_proto::Map {
            key_type: Some(DataType::String as i32),
            value_type: Some(Box::new(tensor_type(DataType::Double, vec![dim_value(1)]))),
        }))),
        wrap(type_proto::Value::OptionalType(Box::new(
            type_proto::Optional {
                elem_type: Some(Box::new(tensor_type(DataType::Bfloat16, vec![]))),
            },
        ))),
        wrap(type_proto::Value::SparseTensorType(
            type_proto::SparseTensor {
                elem_type: Some(DataType::Float8e4m3fn as i32),
                shape: Some(TensorShapeProto {
                    dim: vec![dim_value(10), dim_param("n")],
                }),
            },
        )),
        wrap(type_proto::Value::OpaqueType(type_proto::Opaque {
            domain: s("com.example"),
            name: s("Handle"),
        })),
    ]
}

fn value_info(name: &str, ty: TypeProto) -> ValueInfoProto {
    ValueInfoProto {
        name: s(name),
        r#type: Some(ty),
        doc_string: s(&format!("doc of {name}")),
        metadata_props: props(name),
    }
}

fn sparse(tag: &str) -> SparseTensorProto {
    SparseTensorProto {
        values: Some(floats(&format!("{tag}_values"), 3, 11)),
        indices: Some(raw("", &[3], DataType::Int64, pattern(24, 12))),
        dims: vec![4, 5],
    }
}

/// A small graph with its own initializer and a node carrying a tensor attribute.
fn subgraph(tag: &str) -> GraphProto {
    GraphProto {
        name: s(tag),
        initializer: vec![floats(&format!("{tag}_w"), 8, 21)],
        node: vec![NodeProto {
            op_type: s("Constant"),
            output: vec![format!("{tag}_c")],
            attribute: vec![AttributeProto {
                name: s("value"),
                r#type: Some(AttributeType::Tensor as i32),
                t: Some(raw("", &[2], DataType::Int32, pattern(8, 22))),
                ..Default::default()
            }],
            ..Default::default()
        }],
        output: vec![value_info(
            &format!("{tag}_c"),
            tensor_type(DataType::Int32, vec![dim_value(2)]),
        )],
        ..Default::default()
    }
}

fn attribute(name: &str, kind: AttributeType) -> AttributeProto {
    AttributeProto {
        name: s(name),
        r#type: Some(kind as i32),
        doc_string: s(&format!("doc of {name}")),
        ..Default::default()
    }
}

/// A node with one attribute of every type, an overload, metadata and device annotations.
fn node_with_every_attribute() -> NodeProto {
    let mut attrs = vec![
        AttributeProto {
            f: Some(0.5),
            ..attribute("f", AttributeType::Float)
        },
        AttributeProto {
            i: Some(-7),
            ..attribute("i", AttributeType::Int)
        },
        AttributeProto {
            s: Some(b"text".to_vec()),
            ..attribute("s", AttributeType::String)
        },
        AttributeProto {
            t: Some(floats("attr_t", 4, 31)),
            ..attribute("t", AttributeType::Tensor)
        },
        AttributeProto {
            g: Some(subgraph("then_branch")),
            ..attribute("g", AttributeType::Graph)
        },
        AttributeProto {
            sparse_tensor: Some(sparse("attr_sparse")),
            ..attribute("sparse_tensor", AttributeType::SparseTensor)
        },
        AttributeProto {
            tp: Some(every_type()[2].clone()),
            ..attribute("tp", AttributeType::TypeProto)
        },
        AttributeProto {
            floats: vec![1.0, -2.5],
            ..attribute("floats", AttributeType::Floats)
        },
        AttributeProto {
            ints: vec![1, -2, 3],
            ..attribute("ints", AttributeType::Ints)
        },
        AttributeProto {
            strings: vec![b"a".to_vec(), b"bc".to_vec()],
            ..attribute("strings", AttributeType::Strings)
        },
        AttributeProto {
            tensors: vec![floats("attr_t0", 2, 32), floats("", 3, 33)],
            ..attribute("tensors", AttributeType::Tensors)
        },
        AttributeProto {
            graphs: vec![subgraph("body_a"), subgraph("body_b")],
            ..attribute("graphs", AttributeType::Graphs)
        },
        AttributeProto {
            sparse_tensors: vec![sparse("attr_sparse0")],
            ..attribute("sparse_tensors", AttributeType::SparseTensors)
        },
        AttributeProto {
            type_protos: every_type(),
            ..attribute("type_protos", AttributeType::TypeProtos)
        },
    ];
    attrs.push(AttributeProto {
        ref_attr_name: s("alpha"),
        ..attribute("alpha", AttributeType::Float)
    });
    NodeProto {
        input: vec!["x".into(), String::new(), "w".into()],
        output: vec!["y".into()],
        name: s("everything"),
        op_type: s("Custom"),
        domain: s("com.example"),
        overload: s("v2"),
        attribute: attrs,
        doc_string: s("a node with every attribute"),
        metadata_props: props("node"),
        device_configurations: vec![NodeDeviceConfigurationProto {
            configuration_id: s("two_gpus"),
            sharding_spec: vec![ShardingSpecProto {
                tensor_name: s("x"),
                device: vec![0, 1, 100],
                index_to_device_group_map: vec![IntIntListEntryProto {
                    key: Some(100),
                    value: vec![0, 1],
                }],
                sharded_dim: vec![ShardedDimProto {
                    axis: Some(-1),
                    simple_sharding: vec![
                        SimpleShardedDimProto {
                            dim: Some(simple_sharded_dim_proto::Dim::DimValue(64)),
                            num_shards: Some(2),
                        },
                        SimpleShardedDimProto {
                            dim: Some(simple_sharded_dim_proto::Dim::DimParam("seq".into())),
                            num_shards: Some(2),
                        },
                    ],
                }],
            }],
            pipeline_stage: Some(1),
        }],
    }
}

/// Typed-field tensors (never moved to external data) and some odd raw ones.
fn typed_tensors() -> Vec<TensorProto> {
    vec![
        TensorProto {
            name: s("typed_f"),
            dims: vec![2],
            data_type: Some(DataType::Float as i32),
            float_data: vec![1.5, -0.25],
            doc_string: s("float_data"),
            metadata_props: props("typed_f"),
            ..Default::default()
        },
        TensorProto {
            name: s("typed_i32"),
            dims: vec![3],
            data_type: Some(DataType::Int8 as i32),
            int32_data: vec![-1, 0, 127],
            ..Default::default()
        },
        TensorProto {
            name: s("typed_str"),
            dims: vec![2],
            data_type: Some(DataType::String as i32),
            string_data: vec![b"x".to_vec(), vec![0xff, 0]],
            ..Default::default()
        },
        TensorProto {
            name: s("typed_i64"),
            dims: vec![1],
            data_type: Some(DataType::Int64 as i32),
            int64_data: vec![i64::MIN],
            ..Default::default()
        },
        TensorProto {
            name: s("typed_f64"),
            dims: vec![1],
            data_type: Some(DataType::Double as i32),
            double_data: vec![std::f64::consts::PI],
            ..Default::default()
        },
        TensorProto {
            name: s("typed_u64"),
            dims: vec![1],
            data_type: Some(DataType::Uint64 as i32),
            uint64_data: vec![u64::MAX],
            ..Default::default()
        },
        TensorProto {
            segment: Some(Segment {
                begin: Some(0),
                end: Some(2),
            }),
            ..raw("segmented", &[4], DataType::Float16, pattern(4, 41))
        },
        raw("packed_int4", &[3], DataType::Int4, pattern(2, 42)),
        raw("empty", &[0], DataType::Float, Vec::new()),
        raw("scalar_f4", &[], DataType::Float4e2m1, pattern(1, 43)),
    ]
}

fn function() -> FunctionProto {
    FunctionProto {
        name: s("Scale"),
        input: vec!["a".into()],
        output: vec!["b".into()],
        attribute: vec!["plain".into()],
        attribute_proto: vec![AttributeProto {
            t: Some(floats("default_scale", 2, 51)),
            ..attribute("scale", AttributeType::Tensor)
        }],
        node: vec![NodeProto {
            op_type: s("Mul"),
            input: vec!["a".into(), "k".into()],
            output: vec!["b".into()],
            attribute: vec![AttributeProto {
                t: Some(raw("", &[1], DataType::Float, pattern(4, 52))),
                ..attribute("value", AttributeType::Tensor)
            }],
            metadata_props: props("function node"),
            ..Default::default()
        }],
        doc_string: s("multiplies"),
        opset_import: vec![OperatorSetIdProto {
            domain: s(""),
            version: Some(21),
        }],
        domain: s("com.example"),
        overload: s("v2"),
        value_info: vec![value_info("k", every_type()[0].clone())],
        metadata_props: props("function"),
    }
}

/// A model that sets every message type and most fields.
fn full_model() -> ModelProto {
    let types = every_type();
    let mut initializer = vec![
        floats("w", 64, 1),
        raw("b", &[2, 3], DataType::Float16, pattern(12, 2)),
        raw("big", &[300], DataType::Uint8, pattern(300, 3)),
    ];
    initializer[0].doc_string = s("weight");
    initializer[0].metadata_props = props("w");
    initializer.extend(typed_tensors());
    let graph = GraphProto {
        node: vec![node_with_every_attribute()],
        name: s("main"),
        initializer,
        sparse_initializer: vec![sparse("sp")],
        doc_string: s("the main graph"),
        input: vec![value_info("x", types[0].clone())],
        output: vec![value_info("y", types[0].clone())],
        value_info: types
            .iter()
            .enumerate()
            .map(|(i, t)| value_info(&format!("v{i}"), t.clone()))
            .collect(),
        quantization_annotation: vec![TensorAnnotation {
            tensor_name: s("y"),
            quant_parameter_tensor_names: vec![
                kv("SCALE_TENSOR", "y_scale"),
                kv("ZERO_POINT_TENSOR", "y_zp"),
            ],
        }],
        metadata_props: props("graph"),
    };
    ModelProto {
        ir_version: Some(11),
        opset_import: vec![
            OperatorSetIdProto {
                domain: s(""),
                version: Some(21),
            },
            OperatorSetIdProto {
                domain: s("com.example"),
                version: Some(1),
            },
        ],
        producer_name: s("bidora-tests"),
        producer_version: s("0.1"),
        domain: s("org.bidora"),
        model_version: Some(3),
        doc_string: s("everything at once"),
        graph: Some(graph),
        metadata_props: props("model"),
        training_info: vec![TrainingInfoProto {
            initialization: Some(subgraph("init")),
            algorithm: Some(subgraph("step")),
            initialization_binding: vec![kv("w", "init_w")],
            update_binding: vec![kv("w", "step_w")],
        }],
        functions: vec![function()],
        configuration: vec![DeviceConfigurationProto {
            name: s("two_gpus"),
            num_devices: Some(2),
            device: vec!["cuda:0".into(), "cuda:1".into()],
        }],
    }
}

fn minimal_model(initializer: Vec<TensorProto>) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: s(""),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: s("g"),
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn external(
    name: &str,
    dims: &[i64],
    data_type: DataType,
    entries: &[(&str, &str)],
) -> TensorProto {
    TensorProto {
        name: s(name),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        external_data: entries.iter().map(|(k, v)| kv(k, v)).collect(),
        data_location: Some(DataLocation::External as i32),
        ..Default::default()
    }
}

/// Writes `model` as-is (external references untouched) to `dir/model.onnx`.
fn save(dir: &Path, model: &ModelProto) -> PathBuf {
    let path = dir.join("model.onnx");
    fs::write(&path, encode_model(model)).unwrap();
    path
}

fn read_one(dir: &Path, tensor: TensorProto) -> Result<ModelProto> {
    read_model(&save(dir, &minimal_model(vec![tensor])))
}

fn all_tensors(model: &ModelProto) -> Vec<TensorProto> {
    let mut out = Vec::new();
    visit_model(model, &mut |t, _| {
        out.push(t.clone());
        Ok(())
    })
    .unwrap();
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
