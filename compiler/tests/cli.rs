//! `bidora-compile` on bad input: each case must fail with a message that names the problem,
//! exit non-zero, never panic, and leave no output folder behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use bidora_compiler::ir::{
    self, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo, ValueType,
};
use bidora_compiler::proto::onnx as pb;
use prost::Message;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bidora-compile"))
}

/// x[batch, 4] → MatMul(x, W[4, 6]) named like a legacy export's query projection → y.
fn linear_model(weight_dims: Vec<i64>, opset: i64) -> Model {
    let n: i64 = weight_dims.iter().product();
    let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut g = Graph {
        name: "g".into(),
        ..Default::default()
    };
    g.inputs.push(ValueInfo::new(
        "x",
        ValueType::tensor(
            DataType::Float,
            vec![Dim::Sym("batch".into()), Dim::Known(4)],
        ),
    ));
    g.outputs.push(ValueInfo::new(
        "y",
        ValueType::tensor(
            DataType::Float,
            vec![Dim::Sym("batch".into()), Dim::Known(6)],
        ),
    ));
    g.initializers.insert(
        "onnx::MatMul_1".into(),
        Tensor::from_f32("onnx::MatMul_1", weight_dims, &w),
    );
    g.nodes.push(Node::new(
        "MatMul",
        "/encoder/layer.0/attention/query/MatMul",
        vec!["x".into(), "onnx::MatMul_1".into()],
        vec!["y".into()],
    ));
    Model {
        ir_version: 8,
        opset_imports: vec![ir::OpsetImport::new("", opset)],
        producer_name: "test".into(),
        producer_version: String::new(),
        domain: String::new(),
        model_version: 0,
        doc_string: String::new(),
        metadata_props: vec![],
        graph: g,
        passthrough: Default::default(),
    }
}

fn proto_of(m: &Model) -> pb::ModelProto {
    ir::convert::model_to_proto(m)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs the compiler expecting failure; returns stderr and checks the output folder is absent.
fn fails(dir: &Path, model: &Path, extra: &[&str]) -> String {
    let out = dir.join("artifact");
    let res = bin()
        .arg(model)
        .args(["--target", "query", "-o"])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).to_string();
    assert!(
        !res.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        res.status.code(),
        Some(1),
        "not a clean error exit (panic?): {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!out.exists(), "a partial output folder was left behind");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".bidora"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    stderr
}

#[test]
fn truncated_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec();
    let p = write(dir.path(), "trunc.onnx", &bytes[..bytes.len() / 2]);
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("trunc.onnx"), "{err}");
}

#[test]
fn garbage_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let p = write(dir.path(), "garbage.onnx", &garbage);
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("garbage.onnx"), "{err}");
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(dir.path(), &dir.path().join("nope.onnx"), &[]);
    assert!(err.contains("nope.onnx"), "{err}");
}

fn with_external(location: &str) -> pb::ModelProto {
    let mut p = proto_of(&linear_model(vec![4, 6], 18));
    let t = &mut p.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    t.external_data = vec![pb::StringStringEntryProto {
        key: Some("location".into()),
        value: Some(location.into()),
    }];
    p
}

#[test]
fn missing_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "ext.onnx",
        &with_external("weights.bin").encode_to_vec(),
    );
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("weights.bin"), "{err}");
    assert!(
        err.contains("onnx::MatMul_1"),
        "error should name the tensor: {err}"
    );
}

#[test]
fn external_data_path_escaping_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("model");
    std::fs::create_dir(&sub).unwrap();
    // The file exists, so only the path check can refuse it.
    std::fs::write(dir.path().join("secret.bin"), vec![0u8; 96]).unwrap();
    let p = write(
        &sub,
        "dots.onnx",
        &with_external("../secret.bin").encode_to_vec(),
    );
    let err = fails(&sub, &p, &[]);
    assert!(err.contains("../secret.bin"), "{err}");
}

#[test]
fn external_data_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().join("abs.bin");
    std::fs::write(&abs, vec![0u8; 96]).unwrap();
    let p = write(
        dir.path(),
        "abs.onnx",
        &with_external(abs.to_str().unwrap()).encode_to_vec(),
    );
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("abs.bin"), "{err}");
}

#[test]
fn target_matching_nothing_lists_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let out = dir.path().join("artifact");
    let res = bin()
        .arg(&p)
        .args(["--target", "value", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(err.contains("'value' matches no linear op"), "{err}");
    assert!(
        err.contains("encoder.layer.0.attention.query"),
        "candidates listed: {err}"
    );
    assert!(!out.exists());
}

#[test]
fn non_2d_weight() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = linear_model(vec![1, 4, 6], 18);
    m.graph.outputs[0].ty = None;
    let p = write(dir.path(), "w3.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("3-D, not 2-D"), "{err}");
}

#[test]
fn an_op_without_a_shape_rule_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = linear_model(vec![4, 6], 18);
    // An op the compiler has no rule for, after the adapted projection.
    m.graph.nodes[0].outputs[0] = "h".into();
    m.graph.nodes.push(Node::new(
        "Celu",
        "/encoder/act/Celu",
        vec!["h".into()],
        vec!["y".into()],
    ));
    let p = write(dir.path(), "celu.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(
        err.contains("Celu") && err.contains("/encoder/act/Celu") && err.contains("no shape rule"),
        "{err}"
    );
    assert!(
        err.contains("what you can do: export with the other torch.onnx exporter"),
        "{err}"
    );
}

#[test]
fn unsupported_opset() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "old.onnx",
        &proto_of(&linear_model(vec![4, 6], 9)).encode_to_vec(),
    );
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("opset 9"), "{err}");
}

#[test]
fn existing_output_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let out = dir.path().join("artifact");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let res = bin()
        .arg(&p)
        .args(["--target", "query", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--force"));
    assert!(out.join("keep.txt").exists());
    let res = bin()
        .arg(&p)
        .args(["--target", "query", "--force", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(!out.join("keep.txt").exists());
    for f in ["forward.onnx", "init.safetensors", "manifest.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
}

#[test]
fn list_targets_prints_module_layout_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let res = bin().arg(&p).arg("--list-targets").output().unwrap();
    assert!(res.status.success());
    let s = String::from_utf8_lossy(&res.stdout);
    assert!(s.contains("encoder.layer.0.attention.query"), "{s}");
    assert!(
        s.contains("in=4") && s.contains("out=6") && s.contains("[in,out]"),
        "{s}"
    );
}

#[test]
fn help_documents_every_option_with_an_example() {
    let res = bin().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&res.stdout);
    for opt in [
        "--target",
        "--target-regex",
        "--list-targets",
        "--method",
        "--rank",
        "--alpha",
        "--rslora",
        "--detach-norm",
        "--seed",
        "--output",
        "--force",
        "--dump",
    ] {
        assert!(s.contains(opt), "--help lacks {opt}");
    }
    assert!(s.contains("EXAMPLES"));
    // Every option's description carries an `Example:`.
    let described = s.matches("Example:").count();
    assert!(
        described >= 12,
        "only {described} options show an example:\n{s}"
    );
    let _ = AttrValue::Int(0);
}

/// Runs `cmd` with its standard output a pipe whose read end is already closed, so every
/// write to it fails with EPIPE, as under `| head -1` once `head` has exited (but without the
/// race of closing it while the tool runs).
fn output_with_closed_stdout(cmd: &mut Command) -> std::process::Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills the two descriptors; each is then owned exactly once.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    };
    cmd.stdout(std::process::Stdio::from(write_end))
        .output()
        .unwrap()
}

#[test]
fn closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    for args in [
        &["--list-targets"][..],
        &["--dump"],
        &["--target", "query", "--dump", "forward"],
    ] {
        let res = output_with_closed_stdout(bin().arg(&p).args(args));
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} printed to stderr: {err}");
    }
}

/// A compile into a folder another process is writing stops naming that process.
#[test]
fn a_second_writer_of_an_output_folder_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let out = dir.path().join("artifact");
    let held = bidora_compiler::lock::FolderLock::output_folder(&out, "test holder").unwrap();
    let res = bin()
        .arg(&p)
        .args(["--target", "query", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {} (test holder)", std::process::id())),
        "{err}"
    );
    assert!(!out.exists());
    drop(held);
    let res = bin()
        .arg(&p)
        .args(["--target", "query", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(!dir.path().join(".artifact.bidora-lock").exists());
}

/// An output folder that holds the input model is refused before anything is deleted, even
/// with `--force`; so is a scaling α that is not a finite positive number.
#[test]
fn an_output_over_the_input_and_a_bad_alpha_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let p = write(
        &m,
        "model.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    for out in [m.clone(), m.join("."), dir.path().to_path_buf()] {
        let res = bin()
            .arg(&p)
            .args(["--target", "query", "--force", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{err}");
        assert!(err.contains("holds the input model"), "{err}");
        assert!(p.exists(), "the input model was deleted");
    }
    for alpha in ["nan", "inf", "1e39", "0", "-1"] {
        let res = bin()
            .arg(&p)
            .args(["--target", "query", &format!("--alpha={alpha}"), "-o"])
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{alpha}: {err}");
        assert!(
            err.contains("--alpha") && err.contains("finite number > 0"),
            "{err}"
        );
    }
}

/// Each cause of an error is printed once.
#[test]
fn an_error_prints_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let res = bin()
        .arg(dir.path())
        .arg("--list-targets")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
}

/// Names read from the model are printed with terminal escape codes escaped, in listings and
/// in errors.
#[test]
fn names_with_escape_codes_are_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = linear_model(vec![4, 6], 18);
    m.graph.nodes[0].name = "/encoder/layer.0/attention/qu\u{1b}[2Jery/MatMul".into();
    let p = write(dir.path(), "m.onnx", &proto_of(&m).encode_to_vec());
    let res = bin().arg(&p).arg("--list-targets").output().unwrap();
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success());
    assert!(!out.contains('\u{1b}') && out.contains("\\u{1b}"), "{out}");
    let res = bin()
        .arg(&p)
        .args(["--target", "nothing", "-o"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");
}

/// NaN weights in the source model are refused naming the weight, unless asked for.
#[test]
fn non_finite_weights_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = linear_model(vec![4, 6], 18);
    let mut w: Vec<f32> = (0..24).map(|i| i as f32).collect();
    w[5] = f32::NAN;
    m.graph.initializers.insert(
        "onnx::MatMul_1".into(),
        Tensor::from_f32("onnx::MatMul_1", vec![4, 6], &w),
    );
    let p = write(dir.path(), "m.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(
        err.contains("onnx::MatMul_1") && err.contains("NaN at index 5"),
        "{err}"
    );
    let res = bin()
        .arg(&p)
        .args(["--target", "query", "--allow-non-finite-weights", "-o"])
        .arg(dir.path().join("artifact"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// A rank whose adapters cannot be held is refused with the estimate, not an abort.
#[test]
fn a_rank_that_cannot_fit_is_refused_with_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let err = fails(dir.path(), &p, &["--rank", "1000000000000"]);
    assert!(
        err.contains("--rank 1000000000000") && err.contains("this machine has available"),
        "{err}"
    );
}

/// `-o .` (the folder one is in) is refused up front, leaving no staging folder behind.
#[test]
fn an_output_that_is_the_current_folder_is_refused_without_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.onnx",
        &proto_of(&linear_model(vec![4, 6], 18)).encode_to_vec(),
    );
    let here = dir.path().join("here");
    std::fs::create_dir(&here).unwrap();
    let res = bin()
        .current_dir(&here)
        .arg(&p)
        .args(["--target", "query", "--force", "-o", "."])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("is the current folder"), "{err}");
    for d in [dir.path(), here.as_path()] {
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".bidora-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn a_model_breaking_an_onnx_checker_rule_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let query = "MatMul node '/encoder/layer.0/attention/query/MatMul'";

    // An f64 weight beside f32 activations: ONNX Runtime refuses the MatMul.
    let mut m = linear_model(vec![4, 6], 17);
    let w: Vec<f64> = (0..24).map(|i| i as f64).collect();
    m.graph.initializers.insert(
        "onnx::MatMul_1".into(),
        Tensor::from_f64("onnx::MatMul_1", vec![4, 6], &w),
    );
    let p = write(dir.path(), "f64.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(
        err.contains(&format!(
            "{query} takes 'x' as f32 and 'onnx::MatMul_1' as f64"
        )),
        "{err}"
    );
    assert!(err.contains("re-export the model in one dtype"), "{err}");

    // An attribute MatMul does not have.
    let mut m = linear_model(vec![4, 6], 17);
    m.graph.nodes[0] = m.graph.nodes[0]
        .clone()
        .with_attr("transB", AttrValue::Int(1));
    let p = write(dir.path(), "attr.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(
        err.contains(&format!("{query} has attribute 'transB'")),
        "{err}"
    );

    // A value assigned twice, and an IR version no ONNX release has.
    let mut m = linear_model(vec![4, 6], 17);
    let mut again = m.graph.nodes[0].clone();
    again.name = "again".into();
    m.graph.nodes.push(again);
    let p = write(dir.path(), "twice.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(
        err.contains(&format!("MatMul node 'again' assigns 'y', which {query}")),
        "{err}"
    );
    let mut m = linear_model(vec![4, 6], 17);
    m.ir_version = 99;
    let p = write(dir.path(), "ir99.onnx", &proto_of(&m).encode_to_vec());
    let err = fails(dir.path(), &p, &[]);
    assert!(err.contains("ir_version 99"), "{err}");
}
