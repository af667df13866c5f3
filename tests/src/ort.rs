//! Running a program in stock ONNX Runtime through `tests/ort_run.py` (PyPI `onnxruntime`),
//! for cross-runtime checks. `None` when the package is absent, unless `BIDORA_REQUIRE_ORT=1`
//! (set by `.ci/run`, which installs it), where that is a failure.

use std::path::Path;
use std::process::Command;

use bidora_runtime::tract_exec::HostTensor;
use serde_json::{json, Value};

pub struct OrtResult {
    /// Output name → (shape, values as f64).
    pub outputs: Vec<(String, Vec<usize>, Vec<f64>)>,
    /// "ok", or onnx.checker's complaint ("onnx not installed" without the package).
    pub checker: String,
}

fn tensor_json(t: &HostTensor) -> Value {
    match t {
        HostTensor::F32(a) => {
            json!({"dtype": "f32", "shape": a.shape(), "data": a.iter().collect::<Vec<_>>()})
        }
        HostTensor::F64(a) => {
            json!({"dtype": "f64", "shape": a.shape(), "data": a.iter().collect::<Vec<_>>()})
        }
        HostTensor::I64(a) => {
            json!({"dtype": "i64", "shape": a.shape(), "data": a.iter().collect::<Vec<_>>()})
        }
    }
}

pub fn run(model: &Path, inputs: &[(String, HostTensor)]) -> Option<OrtResult> {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("request.json");
    let resp = dir.path().join("response.json");
    let body = json!({
        "model": model.to_str().unwrap(),
        "inputs": inputs.iter().map(|(n, t)| (n.clone(), tensor_json(t))).collect::<serde_json::Map<_, _>>(),
    });
    std::fs::write(&req, body.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(crate::repo_root().join("tests/ort_run.py"))
        .arg(&req)
        .arg(&resp)
        .output()
        .expect("python3 runs");
    if out.status.code() == Some(3) {
        assert!(
            std::env::var("BIDORA_REQUIRE_ORT").as_deref() != Ok("1"),
            "BIDORA_REQUIRE_ORT=1 but onnxruntime is not installed"
        );
        eprintln!("SKIPPED: onnxruntime is not installed (pip install onnxruntime onnx)");
        return None;
    }
    assert!(
        out.status.success(),
        "ort_run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&resp).unwrap()).unwrap();
    let outputs = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let n = t["name"].as_str().unwrap().to_string();
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let data = t["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_f64().unwrap())
                .collect();
            (n, shape, data)
        })
        .collect();
    Some(OrtResult {
        outputs,
        checker: v["checker"].as_str().unwrap().to_string(),
    })
}
