//! `bidora export` through the binary: both outputs from an artifact's tensors, `--model`
//! when the manifest records no path, and a tensors file missing a key (message, exit code,
//! nothing written).

use std::path::Path;

mod common;
use common::{bidora, root};

/// A DoRA artifact for the BERT fixture, written by the library as the tests' artifacts are:
/// its manifest records no model path, so `--model` is needed.
fn compile(dir: &Path) {
    common::write_bert_dora(dir, true);
}

#[test]
fn export_writes_the_merged_model_and_the_peft_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let (merged, peft) = (tmp.path().join("out/m.onnx"), tmp.path().join("out/peft"));
    let run = |extra: &[&str]| {
        bidora()
            .arg("export")
            .arg(&art)
            .arg("--tensors")
            .arg(art.join("init.safetensors"))
            .arg("--merged")
            .arg(&merged)
            .arg("--peft")
            .arg(&peft)
            .args(extra)
            .output()
            .unwrap()
    };

    // No recorded model path and no --model: a clear error.
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pass --model"), "{err}");

    let model = root().join("models/bert_legacy17.onnx");
    let out = run(&["--model", model.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("exported 4 adapters and 2 head tensors"),
        "{stdout}"
    );
    assert!(merged.is_file());
    assert!(peft.join("adapter_config.json").is_file());
    assert!(peft.join("adapter_model.safetensors").is_file());

    // Again without --force: refused, outputs kept.
    let out = run(&["--model", model.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = run(&["--model", model.to_str().unwrap(), "--force"]);
    assert!(out.status.success());
}

#[test]
fn export_with_a_tensor_missing_fails_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    // init.safetensors without its first tensor.
    let bytes = std::fs::read(art.join("init.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let dropped = names.remove(0);
    let views: Vec<(String, safetensors::tensor::TensorView)> = names
        .iter()
        .map(|n| (n.clone(), st.tensor(n).unwrap()))
        .collect();
    let bad = tmp.path().join("partial.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, None).unwrap()).unwrap();

    let merged = tmp.path().join("m.onnx");
    let out = bidora()
        .arg("export")
        .arg(&art)
        .arg("--tensors")
        .arg(&bad)
        .arg("--merged")
        .arg(&merged)
        .arg("--model")
        .arg(root().join("models/bert_legacy17.onnx"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("partial.safetensors"), "{err}");
    assert!(err.contains(&format!("no tensor '{dropped}'")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!merged.exists(), "nothing written");

    // Neither output asked for.
    let out = bidora()
        .arg("export")
        .arg(&art)
        .arg("--tensors")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to export"));
}

/// `--merged` onto the source model is refused and the model kept; a model whose weights are
/// not those the artifact was compiled from (here: a merged one) is refused naming both
/// fingerprints, so adapters are never folded in twice.
#[test]
fn export_never_overwrites_its_inputs_nor_merges_into_other_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let base = tmp.path().join("base.onnx");
    std::fs::copy(root().join("models/bert_legacy17.onnx"), &base).unwrap();
    let before = std::fs::read(&base).unwrap();
    // Non-zero trained values, so that merging changes the weights.
    let bytes = std::fs::read(art.join("init.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .iter()
        .map(|(n, v)| {
            let b = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) + 0.01).to_le_bytes())
                .collect();
            (n.to_string(), b, v.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    let tensors = tmp.path().join("trained.safetensors");
    std::fs::write(&tensors, safetensors::serialize(views, None).unwrap()).unwrap();
    let export = |model: &Path, merged: &Path| {
        bidora()
            .arg("export")
            .arg(&art)
            .arg("--tensors")
            .arg(&tensors)
            .arg("--model")
            .arg(model)
            .arg("--merged")
            .arg(merged)
            .arg("--force")
            .output()
            .unwrap()
    };
    let m1 = tmp.path().join("m1.onnx");
    let out = export(&base, &m1);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = export(&base, &tmp.path().join("./base.onnx"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is the source model itself"), "{err}");
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the model was changed"
    );
    let out = export(&base, &tensors);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the tensors file itself"));

    let m2 = tmp.path().join("m2.onnx");
    let out = export(&m1, &m2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("m1.onnx") && err.contains("not those the artifact was compiled from"),
        "{err}"
    );
    assert!(!m2.exists());
}
