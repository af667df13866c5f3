//! Half-precision models (`models/half/`: a BERT and a Llama, f16 and bf16, both exporters;
//! the Llamas with external data). Frozen weights stay half; adapters, magnitudes, the norm,
//! the loss and every gradient are f32. Checked here:
//! - every program compiles and passes shape inference; the adapters are f32;
//! - DoRA at initialisation reproduces the original model: on tract (which upcasts at load)
//!   against torch's f32 evaluation of the half weights, ≤ 1e-4; on the engine's ONNX Runtime
//!   path (CPU: upcast at load too) against the original there, ≤ 1e-5; and for f16, in stock
//!   ONNX Runtime running the f16 program as written (the CUDA path's graph), against the f16
//!   original, ≤ 1e-3, and torch's f16 evaluation, ≤ 1e-2;
//! - the train_step gradients of the f32 adapters (and head) match finite differences
//!   (tract, f32 arithmetic, ≤ 1e-3; the Llama's tiny causal-lm gradients ≤ 1e-2) and the
//!   same model upcast to f32 and compiled without casts (≤ 1e-4); the engine's ONNX Runtime
//!   agrees with tract (≤ 1e-4), and stock ONNX Runtime's f16 backward does within 3e-2,
//!   except gradients below f16's range, which an f16 backward without loss scaling flushes
//!   to zero;
//! - `bidora export --merged` writes the source's dtype and computes the adapted forward
//!   within the rounding of the folded weights to the half type.

use std::path::{Path, PathBuf};

use bidora_compiler::bilevel::Hypergrad;
use bidora_compiler::export::{self, ExportJob, PeftOptions};
use bidora_compiler::heads::Task;
use bidora_compiler::ir::{DataType, Model, Tensor};
use bidora_compiler::pipeline::{self, CompileOptions};
use bidora_compiler::rewrite::Method;
use bidora_compiler::{artifact, load_model};
use bidora_runtime::backend::{Backend, HostTensor};
use bidora_tests::gradcheck::{check_emitted, CheckOpts, Direction};
use bidora_tests::*;
use indexmap::IndexMap;
use ndarray::{ArrayD, IxDyn};

fn half_fixtures() -> Vec<PathBuf> {
    let dir = repo_root().join("models/half");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 8, "{}: expected 8 half fixtures", dir.display());
    v
}

fn dtype_of(path: &Path) -> DataType {
    let stem = path.file_stem().unwrap().to_string_lossy().to_string();
    if stem.ends_with("_bf16") {
        DataType::Bfloat16
    } else {
        DataType::Float16
    }
}

/// BERT: seq-cls with a trained head; Llama: causal-lm. Both DoRA on q and v with BiDoRA's
/// programs (fd), so the regulariser and the hypergradient are compiled for half weights too.
fn opts_for(path: &Path) -> CompileOptions {
    if family(path) == "llama" {
        let mut o = seq_cls_options(
            vec!["q_proj,v_proj".into()],
            Method::Dora,
            Some(Hypergrad::Fd),
        );
        o.task = Some(Task::CausalLm);
        o.train_head = false;
        o
    } else {
        seq_cls_options(
            vec!["query,value".into()],
            Method::Dora,
            Some(Hypergrad::Fd),
        )
    }
}

fn ref_values(path: &Path, key: &str) -> Vec<f32> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.with_extension("ref.json")).unwrap())
            .unwrap();
    r[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn run(engine: &dyn Backend, path: &Path, inputs: &[(String, HostTensor)]) -> Vec<HostTensor> {
    let mut p = engine
        .load(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ins: Vec<(String, HostTensor)> = inputs
        .iter()
        .filter(|(n, _)| p.input_names().contains(n))
        .cloned()
        .collect();
    p.run(&ins)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn first(engine: &dyn Backend, path: &Path, inputs: &[(String, HostTensor)]) -> Vec<f32> {
    run(engine, path, inputs)[0]
        .as_f32()
        .expect("f32 host output")
        .iter()
        .copied()
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Labels for a seq-cls batch of 2 (classes 1 and 0); causal-lm reads its targets from the ids.
fn batch(path: &Path, c: &pipeline::Compiled) -> Vec<(String, HostTensor)> {
    let (mut inputs, _, _) = reference(path);
    for l in &c.training.as_ref().unwrap().head.labels {
        inputs.push((
            l.clone(),
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, 0]).unwrap()),
        ));
    }
    inputs
}

#[test]
fn half_models_compile_with_f32_adapters_and_reproduce_at_init() {
    let tract = tract1();
    let ort = ort1();
    for path in half_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let dtype = dtype_of(&path);
        let model = load_model(&path).unwrap();
        let opts = opts_for(&path);
        let c = pipeline::compile(&model, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.adapters.len(), 4, "{name}");
        for (n, t) in &c.init {
            assert_eq!(
                t.dtype,
                DataType::Float,
                "{name}: trainable '{n}' is not f32"
            );
        }
        // The frozen weights the adapters read are still half in the program.
        for a in &c.adapters {
            let w = &c.forward.graph.initializers[&a.weight];
            assert_eq!(w.dtype, dtype, "{name}: weight '{}'", a.weight);
        }
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("art");
        artifact::write(&pipeline::artifact(&c, &name, &opts), &art, false).unwrap();

        let (inputs, _, _) = reference(&path);
        let mut with_init = inputs.clone();
        with_init.extend(init_inputs(&c));
        let want = ref_values(&path, "logits");
        // tract upcasts the half program once at load: f32 arithmetic on the half weights,
        // which is what torch's f32 evaluation of the same weights computes.
        let original = first(&*tract, &path, &inputs);
        let d0 = max_diff(&original, &want);
        assert!(
            d0 <= 1e-4,
            "{name}: tract vs torch (f32 of the half weights) {d0}"
        );
        let fwd = first(&*tract, &art.join("forward.onnx"), &with_init);
        let d = max_diff(&fwd, &original);
        assert!(
            d <= 1e-5,
            "{name}: DoRA at init vs the original on tract: {d}"
        );
        eprintln!("{name}: tract original-vs-torch {d0:.1e}, init-vs-original {d:.1e}");

        if let Some(ort) = &ort {
            // The engine's ONNX Runtime path on the CPU: half programs upcast once at load,
            // their weights shared by every session.
            let orig = first(&**ort, &path, &inputs);
            let got = first(&**ort, &art.join("forward.onnx"), &with_init);
            let d = max_diff(&got, &orig);
            assert!(
                d <= 1e-5,
                "{name}: DoRA at init vs the original on ORT: {d}"
            );
            let dt = max_diff(&got, &fwd);
            assert!(dt <= 1e-4, "{name}: ORT vs tract at init: {dt}");
            eprintln!("{name}: ort init-vs-original {d:.1e}, ort-vs-tract {dt:.1e}");
        }
        // Stock ONNX Runtime running the f16 program as written, f16 arithmetic and all (the
        // graph the CUDA provider runs; its CPU provider casts around the kernels it lacks).
        if dtype == DataType::Float16 {
            let fwd_path = art.join("forward.onnx");
            if let (Some(o), Some(c)) = (
                ort_native(&path, &inputs),
                ort_native(&fwd_path, &with_init),
            ) {
                let d = max_diff(&c[0], &o[0]);
                assert!(
                    d <= 1e-3,
                    "{name}: f16 DoRA at init vs the f16 original, stock ORT: {d}"
                );
                let dh = max_diff(&c[0], &ref_values(&path, "logits_half"));
                assert!(dh <= 1e-2, "{name}: stock ORT f16 vs torch f16: {dh}");
                eprintln!("{name}: stock-ORT f16 init-vs-original {d:.1e}, vs torch f16 {dh:.1e}");
            }
        }
    }
}

/// Every output of `model` run by stock ONNX Runtime (`tests/ort_run.py`), as f32 in output
/// order; `None` where onnxruntime is not installed.
fn ort_native(model: &Path, inputs: &[(String, HostTensor)]) -> Option<Vec<Vec<f32>>> {
    let r = bidora_tests::ort::run(model, inputs)?;
    Some(
        r.outputs
            .into_iter()
            .map(|(_, _, v)| v.into_iter().map(|x| x as f32).collect())
            .collect(),
    )
}

fn ort_native_named(
    model: &Path,
    inputs: &[(String, HostTensor)],
) -> Option<Vec<(String, Vec<f32>)>> {
    let r = bidora_tests::ort::run(model, inputs)?;
    Some(
        r.outputs
            .into_iter()
            .map(|(n, _, v)| (n, v.into_iter().map(|x| x as f32).collect()))
            .collect(),
    )
}

#[test]
fn half_models_adapter_gradients_match_finite_differences_and_backends_agree() {
    let tract = tract1();
    let ort = ort1();
    for path in half_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let dtype = dtype_of(&path);
        let model = load_model(&path).unwrap();
        let opts = opts_for(&path);
        let c = pipeline::compile(&model, &opts).unwrap();
        let tp = c.training.as_ref().unwrap();
        let mut inputs = batch(&path, &c);
        inputs.extend(perturbed_init(&c, 31));
        // The random weights are tiny: along the gradient, as the f32 fixture checks do. The
        // Llama's causal-lm loss (≈ ln 1000) changes by only ~2e-5 over the step, which f32's
        // rounding of the loss (ulp 5e-7) limits to about 1e-2 relative; the comparison with
        // the f32 model below holds its gradients to 1e-4.
        let check = CheckOpts {
            reference: None,
            h: 1e-2,
            seed: 5,
            direction: Direction::Gradient,
            numeric_in_ort: false,
        };
        let r = check_emitted(&tp.train_step, &tp.head.loss, &tp.grads, &inputs, &check).unwrap();
        eprintln!(
            "{name}: analytic {:.6e} numeric {:.6e} rel {:.2e}",
            r.analytic, r.numeric, r.rel_err
        );
        let tol = if family(&path) == "llama" { 1e-2 } else { 1e-3 };
        assert!(r.rel_err <= tol, "{name}: gradient check {:.3e}", r.rel_err);

        // The same model with its weights upcast to f32 compiles without casts; its gradients
        // (every f32 rule is checked elsewhere) equal the half program's run in f32 (≤ 1e-4: the casts reorder a few f32 sums).
        let (model32, _) = bidora_compiler::legalize::upcast_half(&model);
        let c32 = pipeline::compile(&model32, &opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("art");
        artifact::write(&pipeline::artifact(&c, &name, &opts), &art, false).unwrap();
        let art32 = dir.path().join("art32");
        artifact::write(&pipeline::artifact(&c32, &name, &opts), &art32, false).unwrap();
        let step = art.join("train_step.onnx");
        let a = run(&*tract, &step, &inputs);
        let a32 = run(&*tract, &art32.join("train_step.onnx"), &inputs);
        let names = tract.load(&step).unwrap().output_names().to_vec();
        let grad_of = |outs: &[HostTensor], g: &str| {
            let i = names.iter().position(|n| n == g).unwrap();
            outs[i].as_f32().unwrap().clone()
        };
        let rel = |x: &ArrayD<f32>, y: &ArrayD<f32>| {
            let num: f32 = (x - y).iter().map(|v| v * v).sum::<f32>().sqrt();
            num / x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-30)
        };
        for (_, g) in &tp.grads {
            let e = rel(&grad_of(&a, g), &grad_of(&a32, g));
            assert!(e <= 1e-4, "{name}: '{g}' half program vs f32 model {e:.3e}");
        }

        if let Some(ort) = &ort {
            let b = run(&**ort, &step, &inputs);
            let mut worst = 0f32;
            for (_, g) in &tp.grads {
                let e = rel(&grad_of(&a, g), &grad_of(&b, g));
                worst = worst.max(e);
                assert!(e <= 1e-4, "{name}: '{g}' ORT vs tract {e:.3e}");
            }
            eprintln!("{name}: ORT (upcast) vs tract gradients, worst {worst:.2e}");
        }
        // The f16 backward as written, in stock ONNX Runtime: activation gradients in f16.
        if dtype != DataType::Float16 {
            continue;
        }
        let Some(native) = ort_native_named(&step, &inputs) else {
            continue;
        };
        let mut worst = 0f32;
        let mut underflow = vec![];
        for (_, g) in &tp.grads {
            let x = grad_of(&a, g);
            let y = &native.iter().find(|(n, _)| n == g).unwrap().1;
            let y = ArrayD::from_shape_vec(x.raw_dim(), y.clone()).unwrap();
            let rms =
                |v: &ArrayD<f32>| (v.iter().map(|v| v * v).sum::<f32>() / v.len() as f32).sqrt();
            // f16 gradients below its normal range (6.1e-5; subnormals to 6e-8) flush to zero
            // in an f16 backward: without loss scaling (not built yet) the tiny Llama's q_proj
            // gradients (rms ~1e-11 at its random weights) come out 0. Such gradients must
            // come out no larger than tract's, and are listed.
            if rms(&x) < 1e-7 {
                assert!(
                    rms(&y) <= 2.0 * rms(&x),
                    "{name}: '{g}' underflow case grew"
                );
                underflow.push(g.clone());
                continue;
            }
            let e = rel(&x, &y);
            worst = worst.max(e);
            assert!(e <= 3e-2, "{name}: '{g}' stock ORT f16 vs tract {e:.3e}");
        }
        assert!(underflow.len() < tp.grads.len(), "{name}: nothing compared");
        eprintln!(
            "{name}: stock ORT f16 backward vs tract, worst {worst:.2e}; below f16's range \
             (not compared): {underflow:?}"
        );
    }
}

#[test]
fn half_models_export_merged_in_their_own_dtype() {
    let tract = tract1();
    for path in half_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let dtype = dtype_of(&path);
        let model = load_model(&path).unwrap();
        let opts = opts_for(&path);
        let c = pipeline::compile(&model, &opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let art_dir = dir.path().join("art");
        let mut art = pipeline::artifact(&c, &name, &opts);
        art.manifest.source_model_path = Some(path.to_string_lossy().to_string());
        artifact::write(&art, &art_dir, false).unwrap();
        // Moved far enough (±0.2) that the fold changes every adapted weight's half values.
        let trained = perturbed_init(&c, 41);
        let map: IndexMap<String, Tensor> = trained
            .iter()
            .map(|(n, t)| {
                let a = t.as_f32().unwrap();
                let dims = a.shape().iter().map(|&d| d as i64).collect();
                let v: Vec<f32> = a.iter().copied().collect();
                (n.clone(), Tensor::from_f32(n.clone(), dims, &v))
            })
            .collect();
        let tensors = dir.path().join("trained.safetensors");
        std::fs::write(&tensors, artifact::safetensors_bytes(&map).unwrap()).unwrap();
        let merged = dir.path().join("out/merged.onnx");
        export::run(&ExportJob {
            artifact: &art_dir,
            tensors: &tensors,
            model: None,
            merged: Some(&merged),
            peft: None,
            peft_options: PeftOptions::default(),
            force: false,
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let src: Model = export::load_source(&path).unwrap();
        let out: Model = export::load_source(&merged).unwrap();
        for a in &c.adapters {
            let (t, u) = (
                &src.graph.initializers[&a.weight],
                &out.graph.initializers[&a.weight],
            );
            assert_eq!(u.dtype, dtype, "{name}: merged '{}'", a.weight);
            assert_ne!(t.data, u.data, "{name}: '{}' not folded", a.weight);
        }
        for h in &c.head_params {
            assert_eq!(out.graph.initializers[h].dtype, dtype, "{name}: head '{h}'");
        }
        let (inputs, _, _) = reference(&path);
        let mut adapted = inputs.clone();
        adapted.extend(trained.iter().cloned());
        let want = first(&*tract, &art_dir.join("forward.onnx"), &adapted);
        let got = first(&*tract, &merged, &inputs);
        // The merged weights are rounded once to the half type (f16: 2^-11 relative, bf16:
        // 2^-8); the logits of these tiny models stay well inside these bounds.
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let tol = if dtype == DataType::Float16 {
            1e-2
        } else {
            5e-2
        } * scale;
        let d = max_diff(&got, &want);
        eprintln!("{name}: merged vs adapted {d:.2e} (scale {scale:.2e})");
        assert!(d <= tol, "{name}: merged vs adapted forward {d} > {tol}");
    }
}
