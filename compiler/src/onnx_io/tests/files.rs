//! Decoding, writing and reading back, and external data's refusals.

use super::*;

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
