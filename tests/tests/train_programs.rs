//! The emitted training programs on every fixture family, for LoRA and DoRA and each task head
//! that fits the fixture: train_step's gradients of all trainable tensors agree with finite
//! differences of the emitted eval loss, and the manifest lists
//! each program's inputs and outputs with their roles.

use bidora_compiler::heads::Task;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::HostTensor;
use bidora_tests::gradcheck::{check_emitted, CheckOpts, Direction};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn tasks_for(family: &str) -> Vec<Task> {
    match family {
        "gpt2" => vec![Task::CausalLm, Task::TokenCls],
        _ => vec![Task::SeqCls, Task::MultiLabel],
    }
}

fn labels(task: Task) -> Vec<(String, HostTensor)> {
    let a = |shape: &[usize], v: Vec<i64>| {
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    };
    let f = |shape: &[usize], v: Vec<f32>| {
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    };
    match task {
        Task::SeqCls => vec![("labels".into(), a(&[2], vec![1, 0]))],
        Task::MultiLabel => vec![("labels".into(), f(&[2, 2], vec![1.0, 0.0, 1.0, 1.0]))],
        Task::TokenCls => {
            let v: Vec<i64> = (0..16)
                .map(|k| {
                    if k % 5 == 0 {
                        -100
                    } else {
                        (k * 37 % 1000) as i64
                    }
                })
                .collect();
            vec![("labels".into(), a(&[2, 8], v))]
        }
        Task::CausalLm | Task::Regression => vec![],
    }
}

/// The fixtures are f32 programs: central differences along the gradient (largest element
/// moved by h = 2e-3) with a relative tolerance of 5e-3 for f32 rounding over a whole
/// transformer. The per-rule checks (grad_rules.rs) hold every rule to 1e-6 in f64.
#[test]
fn train_step_gradients_match_finite_differences_of_eval() {
    let mut worst: f64 = 0.0;
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let fam = family(&path);
        let model = load_model(&path).unwrap();
        for method in [Method::Lora, Method::Dora] {
            for task in tasks_for(&fam) {
                let mut opts = options(qv_targets(&fam), method);
                opts.task = Some(task);
                let c = pipeline::compile(&model, &opts)
                    .unwrap_or_else(|e| panic!("{name} {task:?}: {e}"));
                let t = c.training.as_ref().unwrap();
                let mut inputs = example_inputs(&model);
                inputs.extend(labels(task));
                inputs.extend(perturbed_init(&c, 5));
                let opts = CheckOpts {
                    reference: Some(&t.eval),
                    h: 2e-3,
                    seed: 9,
                    direction: Direction::Gradient,
                    numeric_in_ort: false,
                };
                let r =
                    check_emitted(&t.train_step, &t.head.loss, &t.grads, &inputs, &opts).unwrap();
                eprintln!(
                    "{name} {method:?} {task:?}: analytic {:.6e} numeric {:.6e} rel {:.2e}",
                    r.analytic, r.numeric, r.rel_err
                );
                assert!(
                    r.rel_err <= 5e-3,
                    "{name} {method:?} {task:?}: relative error {:.3e}",
                    r.rel_err
                );
                worst = worst.max(r.rel_err);
            }
        }
    }
    eprintln!("worst relative error {worst:.2e}");
}

#[test]
fn head_gradients_with_train_head() {
    let model = load_model(&repo_root().join("models/roberta_dynamo18.onnx")).unwrap();
    let mut opts = options(qv_targets("roberta"), Method::Dora);
    opts.task = Some(Task::SeqCls);
    opts.train_head = true;
    let c = pipeline::compile(&model, &opts).unwrap();
    assert_eq!(c.head_params.len(), 4, "{:?}", c.head_params);
    let t = c.training.as_ref().unwrap();
    assert_eq!(
        t.grads.len(),
        c.init.len(),
        "one gradient per trainable tensor"
    );
    let mut inputs = example_inputs(&model);
    inputs.extend(labels(Task::SeqCls));
    inputs.extend(init_inputs(&c));
    let opts = CheckOpts {
        reference: Some(&t.eval),
        h: 2e-3,
        seed: 4,
        direction: Direction::Gradient,
        numeric_in_ort: false,
    };
    let r = check_emitted(&t.train_step, &t.head.loss, &t.grads, &inputs, &opts).unwrap();
    assert!(r.rel_err <= 5e-3, "relative error {:.3e}", r.rel_err);
}

#[test]
fn manifest_lists_program_roles() {
    let path = repo_root().join("models/roberta_legacy17.onnx");
    let model = load_model(&path).unwrap();
    let mut opts = options(qv_targets("roberta"), Method::Dora);
    opts.task = Some(Task::SeqCls);
    let c = pipeline::compile(&model, &opts).unwrap();
    let art = pipeline::artifact(&c, "roberta_legacy17.onnx", &opts);
    let json = serde_json::to_value(&art.manifest).unwrap();
    let ts = &json["programs"]["train_step"];
    assert_eq!(ts["file"], "train_step.onnx");
    let roles = |key: &str| -> Vec<String> {
        ts[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["role"].as_str().unwrap().to_string())
            .collect()
    };
    let ins = roles("inputs");
    assert_eq!(ins.iter().filter(|r| *r == "adapter").count(), 8, "{ins:?}");
    assert_eq!(ins.iter().filter(|r| *r == "magnitude").count(), 4);
    assert!(ins.contains(&"label".to_string()) && ins.contains(&"data".to_string()));
    let outs = roles("outputs");
    assert_eq!(outs[0], "loss");
    assert_eq!(outs.iter().filter(|r| *r == "gradient").count(), 12);
    assert_eq!(outs.last().unwrap(), "output");
    // Every gradient names its tensor.
    for o in ts["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["role"] == "gradient")
    {
        assert!(c.init.contains_key(o["of"].as_str().unwrap()));
    }
    assert_eq!(json["task"]["task"], "seq-cls");
    assert!(
        json["programs"]["eval"]["outputs"]
            .as_array()
            .unwrap()
            .len()
            == 2
    );
}

/// Only trainable tensors get gradients: the backward computes no weight gradient (`db`
/// of a MatMul/Gemm) for any frozen weight, and nothing differentiates integer values.
#[test]
fn no_weight_gradient_for_frozen_weights() {
    let model = load_model(&repo_root().join("models/bert_legacy17.onnx")).unwrap();
    let mut opts = options(qv_targets("bert"), Method::Dora);
    opts.task = Some(Task::SeqCls);
    let c = pipeline::compile(&model, &opts).unwrap();
    let g = &c.training.as_ref().unwrap().train_step.graph;
    let weight_grads: Vec<&bidora_compiler::ir::Node> = g
        .nodes
        .iter()
        .filter(|n| n.name.contains(".grad.db"))
        .collect();
    assert!(!weight_grads.is_empty());
    for n in &weight_grads {
        let fwd_name = &n.name[..n.name.find(".grad.").unwrap()];
        let fwd = g.nodes.iter().find(|f| f.name == fwd_name).unwrap();
        let w = &fwd.inputs[1];
        assert!(
            !g.initializers.contains_key(w),
            "{} computes the gradient of the frozen weight '{w}'",
            n.name
        );
    }
    // Frozen linear layers outnumber the weight gradients: 14 linear ops, 4 adapted.
    let frozen_matmuls = g
        .nodes
        .iter()
        .filter(|n| !n.name.contains(".grad.") && (n.op_type == "MatMul" || n.op_type == "Gemm"))
        .filter(|n| n.input(1).is_some_and(|w| g.initializers.contains_key(w)))
        .count();
    assert!(frozen_matmuls >= 10, "{frozen_matmuls}");
    let facts = bidora_compiler::shape::infer(&c.training.as_ref().unwrap().train_step).unwrap();
    for n in g.nodes.iter().filter(|n| n.name.contains(".grad.")) {
        for o in &n.outputs {
            let f = facts.get(o).unwrap();
            // Gradients are float; integer values in the backward are only shapes and indices.
            if n.name.ends_with(".dx") || n.name.ends_with(".da") || n.name.ends_with(".db") {
                assert!(f.dtype.is_float(), "{} gives {}", n.name, f.display());
            }
        }
    }
}

/// The regression head (no fixture has a single output): MSE through a small synthetic model.
#[test]
fn regression_head_gradients() {
    use bidora_compiler::ir::{Dim, Graph, Node, Tensor};
    let mut g = Graph {
        name: "reg".into(),
        ..Default::default()
    };
    g.inputs
        .push(f32_input("x", &[Dim::Sym("batch".into()), Dim::Known(4)]));
    g.outputs
        .push(f32_input("y", &[Dim::Sym("batch".into()), Dim::Known(1)]));
    let wq: Vec<f32> = (0..16)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    g.initializers.insert(
        "enc.query.weight".into(),
        Tensor::from_f32("enc.query.weight", vec![4, 4], &wq),
    );
    g.initializers.insert(
        "head.weight".into(),
        Tensor::from_f32("head.weight", vec![4, 1], &[0.5, -0.3, 0.2, 0.7]),
    );
    g.nodes.push(Node::new(
        "MatMul",
        "/enc/query/MatMul",
        vec!["x".into(), "enc.query.weight".into()],
        vec!["h".into()],
    ));
    g.nodes.push(Node::new(
        "Tanh",
        "/enc/act",
        vec!["h".into()],
        vec!["a".into()],
    ));
    g.nodes.push(Node::new(
        "MatMul",
        "/head/MatMul",
        vec!["a".into(), "head.weight".into()],
        vec!["y".into()],
    ));
    let model = model_of(g);
    let mut opts = options(vec!["query".into()], Method::Dora);
    opts.task = Some(Task::Regression);
    let c = pipeline::compile(&model, &opts).unwrap();
    let t = c.training.as_ref().unwrap();
    assert_eq!(t.head.labels, vec!["labels".to_string()]);
    let f = |shape: &[usize], v: Vec<f32>| {
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    };
    let mut inputs = vec![
        (
            "x".to_string(),
            f(&[3, 4], (0..12).map(|i| (i as f32 - 6.0) / 5.0).collect()),
        ),
        ("labels".to_string(), f(&[3], vec![0.5, -1.0, 2.0])),
    ];
    inputs.extend(perturbed_init(&c, 8));
    let opts = CheckOpts {
        reference: Some(&t.eval),
        h: 2e-3,
        seed: 8,
        direction: Direction::Gradient,
        numeric_in_ort: false,
    };
    let r = check_emitted(&t.train_step, &t.head.loss, &t.grads, &inputs, &opts).unwrap();
    assert!(r.rel_err <= 5e-3, "relative error {:.3e}", r.rel_err);
}
