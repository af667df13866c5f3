//! `bidora export`: the merged model computes what the adapted forward program computes with
//! the same trained tensors (tract and ONNX Runtime, ≤ 1e-5), its graph is the input graph; the
//! peft folder has peft's names, shapes and config, and peft itself (where installed) loads it
//! into the Hugging Face model and reproduces our outputs; bad inputs are clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use bidora_compiler::export::{self, peft, ExportError, ExportJob, PeftOptions};
use bidora_compiler::heads::Task;
use bidora_compiler::ir::{Model, Tensor};
use bidora_compiler::rewrite::Method;
use bidora_compiler::{artifact, pipeline};
use bidora_runtime::backend::{select, Backend, BackendKind, BackendOptions, HostTensor};
use bidora_tests::*;
use indexmap::IndexMap;
use ndarray::ArrayD;

const TOL: f32 = 1e-5;

#[derive(Clone, Copy, Debug)]
struct Case {
    fixture: &'static str,
    method: Method,
    head: bool,
}

const fn case(fixture: &'static str, method: Method, head: bool) -> Case {
    Case {
        fixture,
        method,
        head,
    }
}

/// Every family and exporter, DoRA and LoRA, with and without a trained head (GPT-2 has
/// none), fused c_attn blocks on both GPT-2 exports, and Phi-3's fused qkv_proj of unequal
/// blocks (q 64 | k 32 | v 32: v starts at column 96, not 2·32).
const CASES: [Case; 11] = [
    case("bert_legacy17", Method::Dora, true),
    case("bert_dynamo18", Method::Lora, false),
    case("roberta_dynamo18", Method::Dora, false),
    case("roberta_legacy17", Method::Lora, true),
    case("gpt2_dynamo18", Method::Dora, false),
    case("gpt2_legacy17", Method::Lora, false),
    case("gpt2_legacy17", Method::Dora, false),
    case("esm_legacy17", Method::Dora, true),
    case("esm_dynamo18", Method::Lora, true),
    case("esm_dynamo18", Method::Dora, false),
    case("ops/phi3_gqa_dynamo18", Method::Dora, false),
];

struct Setup {
    model_path: PathBuf,
    model: Model,
    art: PathBuf,
    tensors: PathBuf,
    /// The trained tensors as program inputs.
    trained: Vec<(String, HostTensor)>,
}

fn fixture_path(name: &str) -> PathBuf {
    repo_root().join(format!("models/{name}.onnx"))
}

/// Compiles the case into `dir/artifact` (recording the model's path, as bidora-compile
/// does) and writes random trained tensors (B ≠ 0, m and the head moved) to
/// `dir/trained.safetensors`.
fn setup(c: Case, dir: &Path, seed: u64) -> Setup {
    let model_path = fixture_path(c.fixture);
    let model = bidora_compiler::load_model(&model_path).unwrap();
    let fam = family(&model_path);
    let mut opts = options(qv_targets(&fam), c.method);
    opts.task = Some(if fam == "gpt2" || fam == "phi3" {
        Task::CausalLm
    } else {
        Task::SeqCls
    });
    opts.train_head = c.head;
    let compiled = compile(&model, &opts);
    let mut art = pipeline::artifact(&compiled, &format!("{}.onnx", c.fixture), &opts);
    art.manifest.source_model_path = Some(model_path.to_string_lossy().to_string());
    let art_dir = dir.join("artifact");
    artifact::write(&art, &art_dir, false).unwrap();
    let trained = perturbed_init(&compiled, seed);
    let tensors = dir.join("trained.safetensors");
    write_tensors(&tensors, &trained);
    Setup {
        model_path,
        model,
        art: art_dir,
        tensors,
        trained,
    }
}

fn write_tensors(path: &Path, tensors: &[(String, HostTensor)]) {
    let map: IndexMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| {
            let a = t.as_f32().unwrap();
            let dims = a.shape().iter().map(|&d| d as i64).collect();
            let v: Vec<f32> = a.iter().copied().collect();
            (n.clone(), Tensor::from_f32(n.clone(), dims, &v))
        })
        .collect();
    std::fs::write(path, artifact::safetensors_bytes(&map).unwrap()).unwrap();
}

fn job<'a>(s: &'a Setup, merged: Option<&'a Path>, peft: Option<&'a Path>) -> ExportJob<'a> {
    ExportJob {
        artifact: &s.art,
        tensors: &s.tensors,
        model: None,
        merged,
        peft,
        peft_options: PeftOptions::default(),
        force: false,
    }
}

fn opts() -> BackendOptions {
    BackendOptions {
        threads: 1,
        ..BackendOptions::default()
    }
}

/// tract, plus ONNX Runtime where a library is installed (required under
/// `BIDORA_REQUIRE_ORT=1`, as in CI).
fn backends() -> Vec<(&'static str, Box<dyn Backend>)> {
    let mut v: Vec<(&'static str, Box<dyn Backend>)> = vec![("tract", tract1())];
    v.extend(ort1().map(|b| ("ort", b)));
    v
}

fn logits(engine: &dyn Backend, path: &Path, inputs: &[(String, HostTensor)]) -> ArrayD<f32> {
    let mut p = engine
        .load(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ins: Vec<(String, HostTensor)> = inputs
        .iter()
        .filter(|(n, _)| p.input_names().contains(n))
        .cloned()
        .collect();
    let out = p
        .run(&ins)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out[0].as_f32().unwrap().clone()
}

/// The model as the file holds it (node order kept, as the export reads it).
fn read_as_is(path: &Path) -> Model {
    export::load_source(path).unwrap()
}

#[test]
fn merged_model_matches_the_adapted_forward_and_keeps_the_graph() {
    let engines = backends();
    let mut worst = vec![0f32; engines.len()];
    for (k, c) in CASES.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let s = setup(*c, dir.path(), 100 + k as u64);
        let merged = dir.path().join("out/merged.onnx");
        let report = export::run(&job(&s, Some(&merged), None)).unwrap();
        assert_eq!(report.model, s.model_path);

        // The same graph: nodes, inputs, outputs, opsets; only adapted weights and trained
        // head parameters differ, with their names, types and shapes kept.
        let (src, out) = (read_as_is(&s.model_path), read_as_is(&merged));
        assert_eq!(src.graph.nodes, out.graph.nodes, "{c:?}: nodes");
        assert_eq!(src.graph.inputs, out.graph.inputs, "{c:?}: inputs");
        assert_eq!(src.graph.outputs, out.graph.outputs, "{c:?}: outputs");
        assert_eq!(src.opset_imports, out.opset_imports, "{c:?}: opsets");
        assert!(
            out.graph.nodes.iter().all(|n| n.domain != "ai.bidora"),
            "{c:?}: adapter nodes"
        );
        let keys = |m: &Model| m.graph.initializers.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&src), keys(&out), "{c:?}: initializer names");
        let man = export::manifest::read(&s.art).unwrap();
        let mut changed: Vec<String> = man
            .adapters
            .iter()
            .map(|a| a.fused_weight.clone().unwrap_or(a.weight.clone()))
            .collect();
        changed.extend(man.head_params.iter().cloned());
        for (name, t) in &src.graph.initializers {
            let u = &out.graph.initializers[name];
            assert_eq!((t.dtype, &t.dims), (u.dtype, &u.dims), "{c:?}: {name}");
            if changed.contains(name) {
                assert_ne!(t.data, u.data, "{c:?}: {name} should have new values");
            } else {
                assert_eq!(t, u, "{c:?}: {name} should be untouched");
            }
        }

        let data = example_inputs(&s.model);
        let mut adapted_inputs = data.clone();
        adapted_inputs.extend(s.trained.iter().cloned());
        for (e, (name, engine)) in engines.iter().enumerate() {
            let want = logits(
                engine.as_ref(),
                &s.art.join(artifact::ProgramKey::Forward.file()),
                &adapted_inputs,
            );
            let got = logits(engine.as_ref(), &merged, &data);
            let base = logits(engine.as_ref(), &s.model_path, &data);
            let d = max_abs_diff(&want, &got);
            eprintln!(
                "{:<16} {:?} head={:<5} {name}: merged vs adapted {d:.2e} (adapters moved the \
                 logits by {:.2e})",
                c.fixture,
                c.method,
                c.head,
                max_abs_diff(&want, &base)
            );
            assert!(d <= TOL, "{c:?} {name}: merged differs by {d:.2e}");
            // The check can fail: the adapters must have changed the model.
            assert!(max_abs_diff(&want, &base) > 10.0 * TOL, "{c:?}: no effect");
            worst[e] = worst[e].max(d);
        }
    }
    for ((name, _), w) in engines.iter().zip(worst) {
        eprintln!(
            "worst merged vs adapted forward over {} cases, {name}: {w:.2e}",
            CASES.len()
        );
    }
}

fn peft_tensors(dir: &Path) -> IndexMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join(peft::WEIGHTS)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = st.tensor(&n).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// A trained tensor's values, row-major.
fn trained_of(s: &Setup, name: &str) -> Vec<f32> {
    let (_, t) = s.trained.iter().find(|(n, _)| n == name).unwrap();
    t.as_f32().unwrap().iter().copied().collect()
}

#[test]
fn peft_folder_has_peft_names_shapes_and_config() {
    // BERT, DoRA, trained head: one adapter per module, the classifier saved whole.
    let dir = tempfile::tempdir().unwrap();
    let s = setup(case("bert_legacy17", Method::Dora, true), dir.path(), 1);
    let out = dir.path().join("peft");
    export::run(&job(&s, None, Some(&out))).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["use_dora"], true);
    assert_eq!(cfg["r"], 4);
    // Our s = α/r = 8/4: peft's lora_alpha / r must give the same.
    assert_eq!(cfg["lora_alpha"].as_f64().unwrap() / 4.0, 2.0);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["lora_dropout"], 0.0);
    assert_eq!(cfg["rank_pattern"], serde_json::json!({}));
    let t = peft_tensors(&out);
    let mut want = vec![];
    for l in 0..2 {
        for m in ["query", "value"] {
            let p = format!("base_model.model.bert.encoder.layer.{l}.attention.self.{m}");
            want.push((format!("{p}.lora_A.weight"), vec![4, 64]));
            want.push((format!("{p}.lora_B.weight"), vec![64, 4]));
            want.push((format!("{p}.lora_magnitude_vector"), vec![64]));
        }
    }
    want.push(("base_model.model.classifier.weight".into(), vec![2, 64]));
    want.push(("base_model.model.classifier.bias".into(), vec![2]));
    want.sort();
    let got: Vec<(String, Vec<usize>)> = t.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    assert_eq!(got, want);
    // Values: lora_A = Aᵀ, lora_B = Bᵀ, the magnitude and the head as trained.
    let man = export::manifest::read(&s.art).unwrap();
    let a0 = &man.adapters[0];
    let key = format!("base_model.model.{}", a0.module);
    let (a, b) = (trained_of(&s, &a0.lora_a), trained_of(&s, &a0.lora_b));
    let la = &t[&format!("{key}.lora_A.weight")].1;
    let lb = &t[&format!("{key}.lora_B.weight")].1;
    for i in 0..64 {
        for k in 0..4 {
            assert_eq!(la[k * 64 + i], a[i * 4 + k]);
            assert_eq!(lb[i * 4 + k], b[k * 64 + i]);
        }
    }
    let m = trained_of(&s, a0.magnitude.as_ref().unwrap());
    assert_eq!(t[&format!("{key}.lora_magnitude_vector")].1, m);
    // classifier.weight is a Gemm(transB=1) weight: already [out, in].
    let w = trained_of(&s, "classifier.weight");
    assert_eq!(t["base_model.model.classifier.weight"].1, w);

    // An untrained head under SEQ_CLS: peft adds `classifier` to modules_to_save by itself
    // and requires its tensors, so the model's own values are written.
    let dir = tempfile::tempdir().unwrap();
    let s = setup(case("bert_dynamo18", Method::Lora, false), dir.path(), 3);
    let out = dir.path().join("peft");
    export::run(&job(&s, None, Some(&out))).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], false);
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let t = peft_tensors(&out);
    assert!(!t.keys().any(|k| k.contains("magnitude")));
    let w = s.model.graph.initializers["classifier.weight"]
        .to_f32_vec()
        .unwrap();
    assert_eq!(t["base_model.model.classifier.weight"].1, w);

    // GPT-2, DoRA on c_attn:q,v: one peft adapter of rank 2r over the fused c_attn.
    let dir = tempfile::tempdir().unwrap();
    let s = setup(case("gpt2_dynamo18", Method::Dora, false), dir.path(), 2);
    let out = dir.path().join("peft");
    export::run(&job(&s, None, Some(&out))).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["fan_in_fan_out"], true);
    assert_eq!(cfg["target_modules"], serde_json::json!(["c_attn"]));
    assert_eq!(cfg["modules_to_save"], serde_json::Value::Null);
    let key = "transformer\\.h\\.0\\.attn\\.c_attn";
    assert_eq!(cfg["rank_pattern"][key], 8);
    // s = 2 at rank 8: alpha 16.
    assert_eq!(cfg["alpha_pattern"][key].as_f64().unwrap(), 16.0);
    let t = peft_tensors(&out);
    let p = "base_model.model.transformer.h.0.attn.c_attn";
    assert_eq!(t[&format!("{p}.lora_A.weight")].0, vec![8, 64]);
    assert_eq!(t[&format!("{p}.lora_B.weight")].0, vec![192, 8]);
    assert_eq!(t[&format!("{p}.lora_magnitude_vector")].0, vec![192]);
    let man = export::manifest::read(&s.art).unwrap();
    let (q, v) = (&man.adapters[0], &man.adapters[1]);
    assert_eq!(q.block.unwrap().name(), "q");
    assert_eq!(v.block.unwrap().name(), "v");
    let lb = &t[&format!("{p}.lora_B.weight")].1;
    let bq = trained_of(&s, &q.lora_b);
    let bv = trained_of(&s, &v.lora_b);
    for row in 0..192 {
        for col in 0..8 {
            let want = match (row / 64, col / 4) {
                (0, 0) => bq[col * 64 + row],
                (2, 1) => bv[(col - 4) * 64 + row - 128],
                _ => 0.0,
            };
            assert_eq!(lb[row * 8 + col], want, "lora_B[{row}, {col}]");
        }
    }
    // The k block's magnitude is its own column norm: DoRA is the identity there.
    let w = s.model.graph.initializers["transformer.h.0.attn.c_attn.weight"]
        .to_f64_vec()
        .unwrap();
    let mag = &t[&format!("{p}.lora_magnitude_vector")].1;
    for j in 64..128 {
        let n = (0..64).map(|i| w[i * 192 + j].powi(2)).sum::<f64>().sqrt();
        assert!((mag[j] as f64 - n).abs() <= 1e-6 * n, "k column {j}");
    }
    assert_eq!(mag[..64], trained_of(&s, q.magnitude.as_ref().unwrap())[..]);
}

/// peft itself loads the folders into the Hugging Face models the fixtures were exported from
/// and reproduces our adapted forward (`tests/peft_check.py`). Needs torch, transformers and
/// peft; skipped with a message where `import peft` fails (CI does not install peft).
#[test]
fn peft_loads_the_adapter_and_reproduces_the_adapted_forward() {
    let probe = Command::new("python3")
        .args(["-c", "import peft, torch, transformers"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: python3 cannot import peft, torch and transformers ({})",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: no python3 ({e})");
            return;
        }
    }
    let tract = select(BackendKind::Tract, &opts()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cases = vec![];
    for (k, c) in [
        case("bert_legacy17", Method::Dora, true),
        case("roberta_dynamo18", Method::Lora, true),
        case("gpt2_dynamo18", Method::Dora, false),
        case("gpt2_legacy17", Method::Lora, false),
        case("esm_legacy17", Method::Dora, false),
    ]
    .into_iter()
    .enumerate()
    {
        let d = dir.path().join(format!("case{k}"));
        let s = setup(c, &d, 40 + k as u64);
        let out = d.join("peft");
        export::run(&job(&s, None, Some(&out))).unwrap();
        let data = example_inputs(&s.model);
        let mut all = data.clone();
        all.extend(s.trained.iter().cloned());
        let want = logits(
            tract.as_ref(),
            &s.art.join(artifact::ProgramKey::Forward.file()),
            &all,
        );
        let base = logits(tract.as_ref(), &s.model_path, &data);
        let input = |name: &str| {
            let (_, t) = data.iter().find(|(n, _)| n == name).unwrap();
            let HostTensor::I64(a) = t else { panic!() };
            a.outer_iter()
                .map(|r| r.iter().copied().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        cases.push(serde_json::json!({
            "name": format!("{} {:?} head={}", c.fixture, c.method, c.head),
            "family": family(&s.model_path),
            "reference": s.model_path.with_extension("ref.json"),
            "adapter": out,
            "input_ids": input("input_ids"),
            "attention_mask": input("attention_mask"),
            "expected": want.iter().collect::<Vec<_>>(),
            "base": base.iter().collect::<Vec<_>>(),
            "shape": want.shape(),
        }));
    }
    let req = dir.path().join("request.json");
    std::fs::write(&req, serde_json::json!({ "cases": cases }).to_string()).unwrap();
    let out = Command::new("python3")
        .arg(repo_root().join("tests/peft_check.py"))
        .arg(&req)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "peft_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_inputs_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(case("roberta_legacy17", Method::Dora, true), dir.path(), 9);
    let merged = dir.path().join("m.onnx");
    let peft_dir = dir.path().join("p");
    let man = export::manifest::read(&s.art).unwrap();
    let a0 = man.adapters[0].clone();
    let try_with = |tensors: &[(String, HostTensor)]| {
        let path = dir.path().join("bad.safetensors");
        write_tensors(&path, tensors);
        let r = export::run(&ExportJob {
            tensors: &path,
            ..job(&s, Some(&merged), Some(&peft_dir))
        });
        assert!(!merged.exists() && !peft_dir.exists(), "nothing written");
        r.unwrap_err()
    };

    // A tensor missing.
    let missing: Vec<_> = s
        .trained
        .iter()
        .filter(|(n, _)| *n != a0.lora_b)
        .cloned()
        .collect();
    let e = try_with(&missing);
    assert!(matches!(&e, ExportError::MissingTensor { name, .. } if *name == a0.lora_b));
    let msg = e.to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains(&a0.lora_b),
        "{msg}"
    );

    // A wrong shape.
    let mut wrong = s.trained.clone();
    for (n, t) in wrong.iter_mut() {
        if *n == a0.lora_a {
            *t = HostTensor::F32(ArrayD::zeros(vec![64, 3]));
        }
    }
    let e = try_with(&wrong);
    assert!(
        matches!(&e, ExportError::TensorShape { name, expected, found, .. }
            if *name == a0.lora_a && expected == &vec![64, 4] && found == &vec![64, 3]),
        "{e}"
    );

    // A tensor the artifact does not have.
    let mut extra = s.trained.clone();
    extra.push(("stray".into(), HostTensor::F32(ArrayD::zeros(vec![2]))));
    let e = try_with(&extra);
    assert!(
        matches!(&e, ExportError::UnknownTensor { name, .. } if name == "stray"),
        "{e}"
    );

    // A NaN.
    let mut nan = s.trained.clone();
    if let HostTensor::F32(a) = &mut nan[1].1 {
        a.as_slice_mut().unwrap()[0] = f32::NAN;
    }
    let e = try_with(&nan);
    assert!(matches!(e, ExportError::NonFinite { .. }), "{e}");

    // Not the model the artifact was compiled from.
    let other = fixture_path("bert_legacy17");
    let e = export::run(&ExportJob {
        model: Some(&other),
        ..job(&s, Some(&merged), Some(&peft_dir))
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ExportError::ModelMismatch { .. }) && msg.contains("bert_legacy17.onnx"),
        "{msg}"
    );
    assert!(!merged.exists() && !peft_dir.exists());

    // Existing outputs are kept unless forced.
    std::fs::write(&merged, b"keep").unwrap();
    let e = export::run(&job(&s, Some(&merged), None)).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read(&merged).unwrap(), b"keep");
    export::run(&ExportJob {
        force: true,
        ..job(&s, Some(&merged), None)
    })
    .unwrap();
    assert!(read_as_is(&merged).graph.nodes.len() > 100);
}
