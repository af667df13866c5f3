//! The protobuf schema: every field and enum value as onnx.proto numbers it.

use super::*;

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
