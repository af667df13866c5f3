//! Tests of model I/O: schema round trips, external data, refusals, atomic writes.

use super::*;
use crate::proto::onnx::tensor_proto::Segment;
use crate::proto::onnx::{
    attribute_proto::AttributeType, simple_sharded_dim_proto, tensor_shape_proto, type_proto,
    DeviceConfigurationProto, IntIntListEntryProto, NodeDeviceConfigurationProto,
    OperatorSetIdProto, ShardedDimProto, ShardingSpecProto, SimpleShardedDimProto,
    TensorAnnotation, TensorShapeProto, TypeProto, ValueInfoProto,
};

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

// --- schema ---------------------------------------------------------------------------

#[test]
fn round_trip_keeps_every_field() {
    let model = full_model();
    let bytes = encode_model(&model);
    let decoded = decode_model(&bytes, Path::new("full.onnx")).unwrap();
    assert_eq!(decoded, model);
    assert_eq!(encode_model(&decoded), bytes);
    // The builder really reaches tensors everywhere (graph, sparse, attributes, subgraphs,
    // functions, training graphs).
    assert!(all_tensors(&model).len() > 30);
}

fn key(field: u32, wire: u32) -> Vec<u8> {
    let mut v = u64::from(field << 3 | wire);
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Field numbers of the official onnx.proto, checked on the wire (only that field set).
#[test]
fn field_numbers_match_onnx() {
    const LEN: u32 = 2;
    const VARINT: u32 = 0;
    let some = || Some(String::new());
    let cases: Vec<(&str, Vec<u8>, u32, u32)> = vec![
        (
            "ModelProto.training_info",
            ModelProto {
                training_info: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            20,
            LEN,
        ),
        (
            "ModelProto.functions",
            ModelProto {
                functions: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            25,
            LEN,
        ),
        (
            "ModelProto.configuration",
            ModelProto {
                configuration: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            26,
            LEN,
        ),
        (
            "ModelProto.metadata_props",
            ModelProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            14,
            LEN,
        ),
        (
            "NodeProto.overload",
            NodeProto {
                overload: some(),
                ..Default::default()
            }
            .encode_to_vec(),
            8,
            LEN,
        ),
        (
            "NodeProto.metadata_props",
            NodeProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            9,
            LEN,
        ),
        (
            "NodeProto.device_configurations",
            NodeProto {
                device_configurations: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            10,
            LEN,
        ),
        (
            "GraphProto.sparse_initializer",
            GraphProto {
                sparse_initializer: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            15,
            LEN,
        ),
        (
            "GraphProto.metadata_props",
            GraphProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            16,
            LEN,
        ),
        (
            "TensorProto.external_data",
            TensorProto {
                external_data: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            13,
            LEN,
        ),
        (
            "TensorProto.data_location",
            TensorProto {
                data_location: Some(1),
                ..Default::default()
            }
            .encode_to_vec(),
            14,
            VARINT,
        ),
        (
            "TensorProto.metadata_props",
            TensorProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            16,
            LEN,
        ),
        (
            "TensorProto.uint64_data",
            TensorProto {
                uint64_data: vec![1],
                ..Default::default()
            }
            .encode_to_vec(),
            11,
            LEN, // packed
        ),
        (
            "ValueInfoProto.metadata_props",
            ValueInfoProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            4,
            LEN,
        ),
        (
            "AttributeProto.type",
            AttributeProto {
                r#type: Some(1),
                ..Default::default()
            }
            .encode_to_vec(),
            20,
            VARINT,
        ),
        (
            "AttributeProto.ref_attr_name",
            AttributeProto {
                ref_attr_name: some(),
                ..Default::default()
            }
            .encode_to_vec(),
            21,
            LEN,
        ),
        (
            "AttributeProto.sparse_tensor",
            AttributeProto {
                sparse_tensor: Some(Default::default()),
                ..Default::default()
            }
            .encode_to_vec(),
            22,
            LEN,
        ),
        (
            "AttributeProto.sparse_tensors",
            AttributeProto {
                sparse_tensors: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            23,
            LEN,
        ),
        (
            "AttributeProto.tp",
            AttributeProto {
                tp: Some(Default::default()),
                ..Default::default()
            }
            .encode_to_vec(),
            14,
            LEN,
        ),
        (
            "AttributeProto.type_protos",
            AttributeProto {
                type_protos: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            15,
            LEN,
        ),
        (
            "AttributeProto.ints (not packed in proto2)",
            AttributeProto {
                ints: vec![1],
                ..Default::default()
            }
            .encode_to_vec(),
            8,
            VARINT,
        ),
        (
            "TypeProto.optional_type",
            TypeProto {
                value: Some(type_proto::Value::OptionalType(Default::default())),
                denotation: None,
            }
            .encode_to_vec(),
            9,
            LEN,
        ),
        (
            "TypeProto.sparse_tensor_type",
            TypeProto {
                value: Some(type_proto::Value::SparseTensorType(Default::default())),
                denotation: None,
            }
            .encode_to_vec(),
            8,
            LEN,
        ),
        (
            "TypeProto.opaque_type",
            TypeProto {
                value: Some(type_proto::Value::OpaqueType(Default::default())),
                denotation: None,
            }
            .encode_to_vec(),
            7,
            LEN,
        ),
        (
            "FunctionProto.attribute_proto",
            FunctionProto {
                attribute_proto: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            11,
            LEN,
        ),
        (
            "FunctionProto.value_info",
            FunctionProto {
                value_info: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            12,
            LEN,
        ),
        (
            "FunctionProto.overload",
            FunctionProto {
                overload: some(),
                ..Default::default()
            }
            .encode_to_vec(),
            13,
            LEN,
        ),
        (
            "FunctionProto.metadata_props",
            FunctionProto {
                metadata_props: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            14,
            LEN,
        ),
        (
            "NodeDeviceConfigurationProto.pipeline_stage",
            NodeDeviceConfigurationProto {
                pipeline_stage: Some(1),
                ..Default::default()
            }
            .encode_to_vec(),
            3,
            VARINT,
        ),
        (
            "ShardingSpecProto.sharded_dim",
            ShardingSpecProto {
                sharded_dim: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            4,
            LEN,
        ),
        (
            "SimpleShardedDimProto.num_shards",
            SimpleShardedDimProto {
                num_shards: Some(1),
                dim: None,
            }
            .encode_to_vec(),
            3,
            VARINT,
        ),
        (
            "DeviceConfigurationProto.device",
            DeviceConfigurationProto {
                device: vec![String::new()],
                ..Default::default()
            }
            .encode_to_vec(),
            3,
            LEN,
        ),
        (
            "TrainingInfoProto.update_binding",
            TrainingInfoProto {
                update_binding: vec![Default::default()],
                ..Default::default()
            }
            .encode_to_vec(),
            4,
            LEN,
        ),
    ];
    for (what, bytes, field, wire) in cases {
        assert!(
            bytes.starts_with(&key(field, wire)),
            "{what}: expected field {field} wire type {wire}, got bytes {bytes:?}"
        );
    }
}

#[test]
fn enum_values_match_onnx() {
    let data_types = [
        (DataType::Bfloat16, 16),
        (DataType::Float8e4m3fn, 17),
        (DataType::Float8e4m3fnuz, 18),
        (DataType::Float8e5m2, 19),
        (DataType::Float8e5m2fnuz, 20),
        (DataType::Uint4, 21),
        (DataType::Int4, 22),
        (DataType::Float4e2m1, 23),
        (DataType::Float8e8m0, 24),
        (DataType::Uint2, 25),
        (DataType::Int2, 26),
    ];
    for (dt, v) in data_types {
        assert_eq!(dt as i32, v, "{dt:?}");
    }
    let attr_types = [
        (AttributeType::SparseTensor, 11),
        (AttributeType::SparseTensors, 12),
        (AttributeType::TypeProto, 13),
        (AttributeType::TypeProtos, 14),
    ];
    for (at, v) in attr_types {
        assert_eq!(at as i32, v, "{at:?}");
    }
    assert_eq!(DataLocation::External as i32, 1);
    assert_eq!(crate::proto::onnx::Version::IrVersion20250512 as i32, 11);
    assert_eq!(crate::proto::onnx::Version::IrVersion20250826 as i32, 12);
    assert_eq!(crate::proto::onnx::OperatorStatus::Stable as i32, 1);
}

// --- decoding ---------------------------------------------------------------------------

#[test]
fn truncated_and_garbage_bytes_are_errors() {
    let bytes = encode_model(&full_model());
    let origin = Path::new("x.onnx");

    let err = decode_model(&bytes[..bytes.len() / 2], origin).unwrap_err();
    assert!(matches!(err, OnnxIoError::Decode { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("`x.onnx` is not a valid ONNX model"),
        "{msg}"
    );
    assert!(msg.contains("failed to decode"), "{msg}");

    // Every cut point: an error or (at a field boundary) a shorter model, never a panic.
    for cut in 0..bytes.len() {
        let _ = decode_model(&bytes[..cut], origin);
    }

    for seed in 0..64 {
        let garbage = pattern(4096, seed);
        assert!(decode_model(&garbage, origin).is_err(), "seed {seed}");
    }
    let err = decode_model(b"", origin).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = decode_model(b"<html>not a model</html>", origin).unwrap_err();
    assert!(err.to_string().contains("x.onnx"), "{err}");
}

#[test]
fn models_without_version_or_graph_are_refused() {
    let origin = Path::new("m.onnx");
    let mut m = minimal_model(vec![]);
    m.graph = None;
    let err = decode_model(&encode_model(&m), origin).unwrap_err();
    assert!(err.to_string().contains("no graph"), "{err}");

    let mut m = minimal_model(vec![]);
    m.ir_version = Some(0);
    let err = decode_model(&encode_model(&m), origin).unwrap_err();
    assert!(err.to_string().contains("ir_version"), "{err}");

    m.ir_version = None;
    assert!(matches!(
        decode_model(&encode_model(&m), origin),
        Err(OnnxIoError::Invalid { .. })
    ));
}

#[test]
fn missing_model_file_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.onnx");
    let err = read_model(&path).unwrap_err();
    assert!(matches!(err, OnnxIoError::Read { .. }), "{err}");
    assert!(err.to_string().contains("nope.onnx"), "{err}");
}

// --- writing and reading back -------------------------------------------------------------

#[test]
fn embedded_write_reads_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let model = full_model();
    write_model(&model, &path, &WriteOptions::default()).unwrap();
    assert_eq!(names_in(dir.path()), ["model.onnx"]);
    assert_eq!(read_model(&path).unwrap(), model);
    assert_eq!(fs::read(&path).unwrap(), encode_model(&model));
}

#[test]
fn external_write_reads_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let model = full_model();
    write_model(&model, &path, &WriteOptions::external(0)).unwrap();
    assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);

    // On disk every raw payload went external, at 64-byte aligned offsets.
    let on_disk = decode_model(&fs::read(&path).unwrap(), &path).unwrap();
    let before = all_tensors(&model);
    let after = all_tensors(&on_disk);
    assert_eq!(before.len(), after.len());
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if let Some(payload) = &b.raw_data {
            moved += 1;
            assert_eq!(a.data_location, Some(DataLocation::External as i32));
            assert!(a.raw_data.is_none());
            let ext = parse_external_entries(&a.external_data).unwrap();
            assert_eq!(ext.location, "model.data");
            assert_eq!(ext.offset % EXTERNAL_ALIGNMENT, 0);
            assert_eq!(ext.length, Some(payload.len() as u64));
        } else {
            assert_eq!(a, b);
        }
    }
    assert!(moved > 20, "{moved}");

    assert_eq!(read_model(&path).unwrap(), model);
}

#[test]
fn threshold_keeps_small_tensors_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.onnx");
    let model = full_model();
    let opts = WriteOptions {
        external_data_threshold: 256,
        external_file_name: Some("weights.bin".into()),
    };
    write_model(&model, &path, &opts).unwrap();
    assert_eq!(names_in(dir.path()), ["net.onnx", "weights.bin"]);
    let on_disk = decode_model(&fs::read(&path).unwrap(), &path).unwrap();
    for t in all_tensors(&on_disk) {
        let external = t.data_location == Some(DataLocation::External as i32);
        let name = t.name.as_deref().unwrap_or_default();
        assert_eq!(external, name == "w" || name == "big", "{name}");
    }
    assert_eq!(read_model(&path).unwrap(), model);
}

#[test]
fn many_tensors_share_one_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let tensors: Vec<_> = (0..600)
        .map(|i| floats(&format!("t{i}"), 61 + i % 7, i as u64))
        .collect();
    let model = minimal_model(tensors);
    write_model(&model, &path, &WriteOptions::external(0)).unwrap();
    assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
    assert_eq!(read_model(&path).unwrap(), model);
}

#[test]
fn bad_external_file_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let model = full_model();
    for name in [
        "",
        ".",
        "..",
        "../x.data",
        "sub/x.data",
        "a\\b",
        "model.onnx",
    ] {
        let opts = WriteOptions {
            external_data_threshold: 0,
            external_file_name: Some(name.into()),
        };
        let err = write_model(&model, &path, &opts).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::Unwritable { .. }),
            "{name}: {err}"
        );
    }
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/folder/model.onnx");
    let err = write_model(&full_model(), &missing, &WriteOptions::external(0)).unwrap_err();
    assert!(matches!(err, OnnxIoError::Write { .. }), "{err}");
    assert!(names_in(dir.path()).is_empty());

    // Overwriting replaces both files in place.
    let path = dir.path().join("model.onnx");
    write_model(
        &minimal_model(vec![floats("a", 512, 1)]),
        &path,
        &WriteOptions::external(0),
    )
    .unwrap();
    let second = minimal_model(vec![floats("b", 300, 2)]);
    write_model(&second, &path, &WriteOptions::external(0)).unwrap();
    assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
    assert_eq!(read_model(&path).unwrap(), second);

    // A model that cannot be written leaves the existing files untouched.
    let unloaded = minimal_model(vec![external(
        "u",
        &[1],
        DataType::Float,
        &[("location", "model.data")],
    )]);
    let before = fs::read(&path).unwrap();
    let err = write_model(&unloaded, &path, &WriteOptions::external(0)).unwrap_err();
    assert!(
        err.to_string().contains("still refers to external data"),
        "{err}"
    );
    let err = write_model(&unloaded, &path, &WriteOptions::default()).unwrap_err();
    assert!(matches!(err, OnnxIoError::Unwritable { .. }), "{err}");
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
}

#[test]
fn auto_embeds_small_models() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let model = full_model();
    assert_eq!(WriteOptions::auto(&model), WriteOptions::embedded());
    assert_eq!(
        write_model_auto(&model, &path).unwrap(),
        WriteOptions::embedded()
    );
    assert_eq!(names_in(dir.path()), ["model.onnx"]);
    assert_eq!(read_model(&path).unwrap(), model);
}

#[cfg(unix)]
#[test]
fn written_files_are_not_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    write_model(&full_model(), &path, &WriteOptions::external(0)).unwrap();
    for name in ["model.onnx", "model.data"] {
        let mode = fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        // Owner read/write always; the group/other bits follow the umask, not 0600.
        assert_eq!(mode & 0o600, 0o600, "{name}: {mode:o}");
    }
}

// --- external data: reading and refusals ----------------------------------------------------

#[test]
fn length_defaults_to_dims_times_element_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(16, 5);
    fs::write(dir.path().join("w.bin"), &data).unwrap();
    let model = read_model(&save(
        dir.path(),
        &minimal_model(vec![
            external("h", &[3], DataType::Float16, &[("location", "w.bin")]),
            external(
                "q",
                &[3],
                DataType::Int4,
                &[("location", "w.bin"), ("offset", "6")],
            ),
            external(
                "c",
                &[1],
                DataType::Complex64,
                &[("location", "./w.bin"), ("offset", "8")],
            ),
        ]),
    ))
    .unwrap();
    let g = model.graph.unwrap();
    assert_eq!(g.initializer[0].raw_data.as_deref(), Some(&data[..6]));
    assert_eq!(g.initializer[1].raw_data.as_deref(), Some(&data[6..8]));
    assert_eq!(g.initializer[2].raw_data.as_deref(), Some(&data[8..16]));
    for t in &g.initializer {
        assert!(t.external_data.is_empty());
        assert_eq!(t.data_location, None);
    }
}

#[test]
fn parent_dir_locations_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    fs::create_dir(&dir).unwrap();
    fs::write(root.path().join("x.bin"), [0u8; 16]).unwrap();
    for location in ["../x.bin", "sub/../../x.bin", "..\\x.bin", "./../x.bin"] {
        let t = external("w", &[4], DataType::Float, &[("location", location)]);
        let err = read_one(&dir, t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
            "{location}: {err}"
        );
        assert!(err.to_string().contains(".."), "{err}");
    }
}

#[test]
fn absolute_locations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let inside = dir.path().join("w.bin").to_string_lossy().into_owned();
    for location in [
        "/abs/x.bin",
        inside.as_str(),
        "C:\\x.bin",
        "\\\\server\\x.bin",
    ] {
        let t = external("w", &[4], DataType::Float, &[("location", location)]);
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
            "{location}: {err}"
        );
        assert!(err.to_string().contains("absolute"), "{err}");
    }
}

#[cfg(unix)]
#[test]
fn symlinks_leaving_the_folder_are_refused() {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.bin"), [7u8; 16]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    symlink(
        outside.path().join("secret.bin"),
        dir.path().join("link.bin"),
    )
    .unwrap();
    symlink(outside.path(), dir.path().join("linked_dir")).unwrap();
    for location in ["link.bin", "linked_dir/secret.bin"] {
        let t = external("w", &[4], DataType::Float, &[("location", location)]);
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
            "{location}: {err}"
        );
        assert!(
            err.to_string().contains("outside the model's folder"),
            "{err}"
        );
    }

    // A link that stays inside the folder is fine.
    fs::create_dir(dir.path().join("data")).unwrap();
    fs::write(dir.path().join("data/real.bin"), [1u8; 16]).unwrap();
    symlink("data/real.bin", dir.path().join("alias.bin")).unwrap();
    let t = external("w", &[4], DataType::Float, &[("location", "alias.bin")]);
    let model = read_one(dir.path(), t).unwrap();
    assert_eq!(
        model.graph.unwrap().initializer[0].raw_data,
        Some(vec![1u8; 16].into())
    );
}

#[test]
fn missing_external_file_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = external(
        "weight_q",
        &[4],
        DataType::Float,
        &[("location", "absent.bin")],
    );
    let err = read_one(dir.path(), t).unwrap_err();
    assert!(
        matches!(err, OnnxIoError::MissingExternalFile { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("weight_q") && msg.contains("absent.bin"),
        "{msg}"
    );
    assert!(msg.contains("model.onnx"), "{msg}");

    // Unnamed tensors are described by where they sit.
    let mut model = minimal_model(vec![]);
    model.graph.as_mut().unwrap().node.push(NodeProto {
        name: s("const_7"),
        op_type: s("Constant"),
        attribute: vec![AttributeProto {
            t: Some(external(
                "",
                &[1],
                DataType::Float,
                &[("location", "gone.bin")],
            )),
            ..attribute("value", AttributeType::Tensor)
        }],
        ..Default::default()
    });
    let err = read_model(&save(dir.path(), &model)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attribute 'value' of node 'const_7'"), "{msg}");
}

#[test]
fn ranges_past_the_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let t = external(
        "w",
        &[4],
        DataType::Float,
        &[("location", "w.bin"), ("offset", "8"), ("length", "16")],
    );
    match read_one(dir.path(), t).unwrap_err() {
        OnnxIoError::ExternalOutOfBounds {
            offset,
            length,
            file_size,
            tensor,
            ..
        } => assert_eq!(
            (offset, length, file_size, tensor.as_str()),
            (8, 16, 16, "w")
        ),
        other => panic!("{other}"),
    }
    // Inferred length past the end, and an offset beyond the file.
    let t = external("w", &[8], DataType::Float, &[("location", "w.bin")]);
    assert!(matches!(
        read_one(dir.path(), t),
        Err(OnnxIoError::ExternalOutOfBounds { .. })
    ));
    let t = external(
        "w",
        &[0],
        DataType::Float,
        &[("location", "w.bin"), ("offset", "17")],
    );
    assert!(matches!(
        read_one(dir.path(), t),
        Err(OnnxIoError::ExternalOutOfBounds { .. })
    ));
}

#[test]
fn huge_declared_sizes_fail_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let huge = (1u64 << 60).to_string();
    let cases = [
        external(
            "a",
            &[1 << 60],
            DataType::Uint8,
            &[("location", "w.bin"), ("length", &huge)],
        ),
        external(
            "b",
            &[],
            DataType::Undefined,
            &[("location", "w.bin"), ("length", &huge)],
        ),
        external(
            "c",
            &[1],
            DataType::Uint8,
            &[
                ("location", "w.bin"),
                ("offset", &u64::MAX.to_string()),
                ("length", "1"),
            ],
        ),
        external(
            "d",
            &[1 << 20, 1 << 20],
            DataType::Double,
            &[("location", "w.bin")],
        ),
    ];
    for t in cases {
        let name = t.name.clone().unwrap();
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::ExternalOutOfBounds { .. }),
            "{name}: {err}"
        );
    }
    // Element counts that overflow u64 are caught by the checked arithmetic.
    let t = external(
        "e",
        &[1 << 40, 1 << 40],
        DataType::Float,
        &[("location", "w.bin")],
    );
    let err = read_one(dir.path(), t).unwrap_err();
    assert!(matches!(err, OnnxIoError::ExternalData { .. }), "{err}");
}

#[test]
fn malformed_external_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("folder")).unwrap();
    fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let cases: Vec<(TensorProto, &str)> = vec![
        (
            external("a", &[1], DataType::Float, &[("offset", "0")]),
            "no `location`",
        ),
        (
            external("b", &[1], DataType::Float, &[("location", "")]),
            "no `location`",
        ),
        (
            external(
                "c",
                &[1],
                DataType::Float,
                &[("location", "w.bin"), ("offset", "abc")],
            ),
            "not a non-negative integer",
        ),
        (
            external(
                "d",
                &[1],
                DataType::Float,
                &[("location", "w.bin"), ("length", "-4")],
            ),
            "not a non-negative integer",
        ),
        (
            external(
                "e",
                &[1],
                DataType::Float,
                &[("location", "w.bin"), ("location", "w.bin")],
            ),
            "more than once",
        ),
        (
            external(
                "f",
                &[2],
                DataType::Float,
                &[("location", "w.bin"), ("length", "4")],
            ),
            "does not match",
        ),
        (
            external("g", &[1], DataType::String, &[("location", "w.bin")]),
            "STRING",
        ),
        (
            external("h", &[1], DataType::Undefined, &[("location", "w.bin")]),
            "no length",
        ),
        (
            external("i", &[-1], DataType::Float, &[("location", "w.bin")]),
            "negative",
        ),
    ];
    for (t, needle) in cases {
        let name = t.name.clone().unwrap();
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::ExternalData { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(needle) && msg.contains(&format!("`{name}`")),
            "{msg}"
        );
    }
    let t = external("j", &[1], DataType::Float, &[("location", "folder")]);
    let err = read_one(dir.path(), t).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
