//! BiDoRA's programs on the real fixture exports (f32): every hypergradient mode compiles,
//! type-checks and runs in tract; the estimators agree with each other (`fd` and
//! `fd-forward` against `exact`) to f32 tolerances; `lower.onnx` and `upper.onnx` give the
//! same numbers in ONNX Runtime. The f64 proofs against the unrolled objective are in
//! `bilevel.rs`.

use std::collections::HashMap;

use bidora_compiler::bilevel::{self, Hypergrad};
use bidora_compiler::heads::Task;
use bidora_compiler::load_model;
use bidora_compiler::pipeline::{self, BilevelOptions, Compiled};
use bidora_compiler::regularizer::RegVariant;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn task_for(family: &str) -> Task {
    match family {
        "gpt2" => Task::CausalLm,
        _ => Task::SeqCls,
    }
}

fn f32s(v: f32) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
}

/// Train and validation batches: the same shapes, different tokens and labels.
fn batches(model: &bidora_compiler::ir::Model, task: Task) -> [Vec<(String, HostTensor)>; 2] {
    let base = example_inputs(model);
    let shifted: Vec<(String, HostTensor)> = base
        .iter()
        .map(|(n, t)| match t {
            HostTensor::I64(a) if n.contains("ids") => {
                (n.clone(), HostTensor::I64(a.mapv(|x| 5 + (x * 3) % 13)))
            }
            _ => (n.clone(), t.clone()),
        })
        .collect();
    let lab = |v: Vec<i64>| {
        if task == Task::SeqCls {
            vec![(
                "labels".to_string(),
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), v).unwrap()),
            )]
        } else {
            vec![]
        }
    };
    let mut tr = base;
    tr.extend(lab(vec![1, 0]));
    let mut va = shifted;
    va.extend(lab(vec![0, 0]));
    [tr, va]
}

struct Run {
    hypergrads: HashMap<String, ArrayD<f32>>,
    upper_inputs: Vec<(String, HostTensor)>,
    lower_inputs: Vec<(String, HostTensor)>,
}

fn run_mode(c: &Compiled, model: &bidora_compiler::ir::Model, task: Task, xi: f32) -> Run {
    let b = c.bilevel.as_ref().unwrap();
    let [tr, va] = batches(model, task);
    let params = perturbed_init(c, 11);
    let dir = tempfile::tempdir().unwrap();
    let lower_path = save(&b.lower.model, dir.path(), "lower.onnx");
    let upper_path = save(&b.upper.model, dir.path(), "upper.onnx");
    let mut lower_inputs = tr.clone();
    lower_inputs.extend(params.clone());
    lower_inputs.push((bilevel::GAMMA.into(), f32s(1e-3)));
    let lo = run_once(&lower_path, &lower_inputs).unwrap();
    let lo: HashMap<&str, &HostTensor> = b
        .lower
        .model
        .graph
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .zip(lo.iter())
        .collect();
    let mut inputs = vec![];
    for (n, t) in &tr {
        inputs.push((format!("{}{n}", bilevel::TRAIN_PREFIX), t.clone()));
    }
    for (n, t) in &va {
        inputs.push((format!("{}{n}", bilevel::VAL_PREFIX), t.clone()));
    }
    inputs.extend(params);
    for (_, g) in b.upper.g_inputs.iter().chain(&b.upper.gm_inputs) {
        inputs.push((g.clone(), lo[g.as_str()].clone()));
    }
    if b.upper.mode != Hypergrad::FirstOrder {
        inputs.push((bilevel::XI.into(), f32s(xi)));
        inputs.push((bilevel::ALPHA_FD.into(), f32s(0.01)));
    }
    let up = run_once(&upper_path, &inputs).unwrap();
    let names: Vec<&str> = b
        .upper
        .model
        .graph
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    let hypergrads = b
        .upper
        .hypergrads
        .iter()
        .map(|(m, o)| {
            let k = names.iter().position(|n| n == o).unwrap();
            (m.clone(), up[k].as_f32().unwrap().clone())
        })
        .collect();
    Run {
        hypergrads,
        upper_inputs: inputs,
        lower_inputs,
    }
}

fn compile_mode(model: &bidora_compiler::ir::Model, fam: &str, mode: Hypergrad) -> Compiled {
    let mut opts = options(qv_targets(fam), Method::Dora);
    opts.task = Some(task_for(fam));
    opts.bilevel = Some(BilevelOptions {
        hypergrad: mode,
        regularizer: RegVariant::Paper,
    });
    pipeline::compile(model, &opts).unwrap_or_else(|e| panic!("{fam} {}: {e}", mode.name()))
}

fn flat(h: &HashMap<String, ArrayD<f32>>, keys: &[String]) -> Vec<f64> {
    keys.iter()
        .flat_map(|k| h[k].iter().map(|&x| x as f64))
        .collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n
}

/// ξ = 1 makes the mixed term a visible share of the hypergradient (the lower learning rate
/// would hide estimator errors below f32 noise).
#[test]
fn every_mode_runs_and_the_estimators_agree_on_every_fixture() {
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let fam = family(&path);
        let model = load_model(&path).unwrap();
        let mut runs = HashMap::new();
        for mode in Hypergrad::ALL {
            let t = std::time::Instant::now();
            let c = compile_mode(&model, &fam, mode);
            let compile_s = t.elapsed().as_secs_f64();
            let r = run_mode(&c, &model, task_for(&fam), 1.0);
            for (m, h) in &r.hypergrads {
                assert!(h.iter().all(|x| x.is_finite()), "{name} {mode:?} {m}");
            }
            eprintln!(
                "{name} {:<11} compiled in {compile_s:.2} s, upper has {} nodes",
                mode.name(),
                c.bilevel.as_ref().unwrap().upper.model.graph.nodes.len()
            );
            runs.insert(mode, (c, r));
        }
        let keys = runs[&Hypergrad::Exact]
            .0
            .bilevel
            .as_ref()
            .unwrap()
            .groups
            .upper
            .clone();
        let v = |m: Hypergrad| flat(&runs[&m].1.hypergrads, &keys);
        let exact = v(Hypergrad::Exact);
        let fo = v(Hypergrad::FirstOrder);
        let share = rel(&fo, &exact);
        let fd = rel(&v(Hypergrad::Fd), &exact);
        let fwd = rel(&v(Hypergrad::FdForward), &exact);
        eprintln!(
            "{name}: mixed-term share {share:.2e}; fd vs exact {fd:.2e}; fd-forward vs exact {fwd:.2e}"
        );
        assert!(
            share > 1e-1,
            "{name}: the mixed term is too small ({share:e})"
        );
        assert!(fd <= 1e-4, "{name}: fd vs exact {fd:e}");
        assert!(fwd <= 1e-2, "{name}: fd-forward vs exact {fwd:e}");

        // The same numbers in ONNX Runtime (lower, and upper in the two-pass modes).
        for mode in [Hypergrad::Fd, Hypergrad::Exact] {
            let (c, r) = &runs[&mode];
            let b = c.bilevel.as_ref().unwrap();
            let l = ort_vs_tract(&b.lower.model, &r.lower_inputs);
            let u = ort_vs_tract(&b.upper.model, &r.upper_inputs);
            if let (Some(l), Some(u)) = (l, u) {
                eprintln!(
                    "{name} {}: tract vs onnxruntime lower {l:.2e}, upper {u:.2e}",
                    mode.name()
                );
                assert!(l <= 1e-5, "{name}: lower differs by {l:e}");
                assert!(u <= 1e-4, "{name} {}: upper differs by {u:e}", mode.name());
            }
        }
    }
}

/// The largest difference between tract's and ONNX Runtime's outputs, relative to each
/// output's largest magnitude; `None` when onnxruntime is absent (and not required).
fn ort_vs_tract(
    model: &bidora_compiler::ir::Model,
    inputs: &[(String, HostTensor)],
) -> Option<f64> {
    let dir = tempfile::tempdir().unwrap();
    let p = save(model, dir.path(), "p.onnx");
    let ort = bidora_tests::ort::run(&p, inputs)?;
    if std::env::var("BIDORA_REQUIRE_ORT").as_deref() == Ok("1") {
        assert_eq!(ort.checker, "ok", "onnx.checker");
    }
    let tract = run_once(&p, inputs).unwrap();
    let mut worst: f64 = 0.0;
    for (tr, (oname, _, ov)) in tract.iter().zip(&ort.outputs) {
        let tr = tr.as_f32().unwrap_or_else(|| panic!("{oname} is not f32"));
        let scale = ov.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        let diff = tr
            .iter()
            .zip(ov)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        worst = worst.max(diff / scale);
    }
    Some(worst)
}
