//! Whole-model gradients: DoRA adapters of real fixture graphs differentiated through the
//! exported transformer (attention, softmax, LayerNorm, GELU), against finite differences.

use bidora_compiler::autodiff;
use bidora_compiler::ir::{DataType, Dim, Node};
use bidora_compiler::load_model;
use bidora_compiler::rewrite::{self, Method};
use bidora_runtime::tract_exec::HostTensor;
use bidora_tests::gradcheck::{check, check_emitted, CheckOpts, Direction};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Lowered DoRA model (StopGradient markers kept) with `loss = Σ value ⊙ c` appended.
fn with_loss(
    path: &std::path::Path,
    value: &str,
    value_shape: &[usize],
) -> (
    bidora_compiler::ir::Model,
    Vec<(String, HostTensor)>,
    Vec<String>,
) {
    let model = load_model(path).unwrap();
    let inputs = example_inputs(&model);
    with_loss_on(
        &model,
        qv_targets(&family(path)),
        inputs,
        value,
        value_shape,
    )
}

/// [`with_loss`] for any model, adapters on `targets`, fed `inputs`.
fn with_loss_on(
    model: &bidora_compiler::ir::Model,
    targets: Vec<String>,
    mut inputs: Vec<(String, HostTensor)>,
    value: &str,
    value_shape: &[usize],
) -> (
    bidora_compiler::ir::Model,
    Vec<(String, HostTensor)>,
    Vec<String>,
) {
    let c = compile(model, &options(targets, Method::Dora));
    let mut m = rewrite::lower(&c.adapted).unwrap();
    let dims: Vec<i64> = value_shape.iter().map(|&d| d as i64).collect();
    add_weighted_sum_loss(&mut m, value, &dims, DataType::Float);
    // Random non-zero adapters (B = 0 at initialisation would hide half the gradient).
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    inputs.extend(perturbed_init(&c, 3));
    let n: usize = value_shape.iter().product();
    let cv: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    inputs.push((
        "c".into(),
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(value_shape), cv).unwrap()),
    ));
    let wrt = c.init.keys().cloned().collect();
    (m, inputs, wrt)
}

#[test]
fn an_op_without_a_rule_names_the_op_node_and_path() {
    // Softplus has a shape rule but no gradient rule: put it between an adapter and the loss.
    let path = repo_root().join("models/bert_legacy17.onnx");
    let (mut m, _, wrt) = with_loss(&path, "logits", &[2, 2]);
    let g = &mut m.graph;
    let at = g.nodes.iter().position(|n| n.name == "loss.mul").unwrap();
    g.nodes.insert(
        at,
        Node::new(
            "Softplus",
            "/head/softplus",
            vec!["logits".into()],
            vec!["logits.sp".into()],
        ),
    );
    g.nodes[at + 1].inputs[0] = "logits.sp".into();
    let err = autodiff::backward(&m, "loss", &wrt)
        .err()
        .expect("Softplus has no rule")
        .to_string();
    assert!(
        err.contains("Softplus")
            && err.contains("/head/softplus")
            && err.contains("no gradient rule"),
        "{err}"
    );
    assert!(
        err.contains("lora_"),
        "the path starts at an adapter: {err}"
    );
    assert!(
        err.contains("logits → [Softplus") && err.contains("→ loss; "),
        "the path runs through the op to the loss: {err}"
    );
    assert!(
        err.contains("what you can do: put the adapters after this node"),
        "it says what to do: {err}"
    );
}

#[test]
fn dora_adapter_gradients_of_the_classifier_logits() {
    // Through both layers and the classification head (pooler token selection, Tanh, Gemm).
    let path = repo_root().join("models/bert_legacy17.onnx");
    let (m, inputs, wrt) = with_loss(&path, "logits", &[2, 2]);
    let wrt: Vec<&str> = wrt.iter().map(String::as_str).collect();
    let r = check(&m, "loss", &wrt, &inputs, 1e-2, 12);
    eprintln!(
        "logits: analytic {} numeric {} rel {:.2e}",
        r.analytic, r.numeric, r.rel_err
    );
    assert!(r.rel_err <= 5e-3, "relative error {:.3e}", r.rel_err);
}

/// The op fixtures' logits: through GatherND last-token pooling (Llama), the blocks of a
/// grouped-query fused qkv_proj (Phi-3) and a ViT's encoder after its Conv patch embedding.
#[test]
fn dora_adapter_gradients_of_the_op_fixtures() {
    for f in op_fixtures() {
        let model = load_model(&f.path).unwrap();
        let (inputs, shape, _) = reference(&f.path);
        let logits = model.graph.outputs[0].name.clone();
        let (m, inputs, wrt) = with_loss_on(&model, f.targets.clone(), inputs, &logits, &shape);
        let grads = autodiff::backward(&m, "loss", &wrt).unwrap();
        // Along the gradient: at these tiny random weights the random-direction derivative
        // (~1e-5) is as small as the f32 rounding of the differences.
        let opts = CheckOpts {
            reference: None,
            h: 1e-2,
            seed: 13,
            direction: Direction::Gradient,
            numeric_in_ort: false,
        };
        let r = check_emitted(&grads.model, "loss", &grads.grads, &inputs, &opts).unwrap();
        let name = f.path.file_name().unwrap().to_string_lossy().to_string();
        eprintln!(
            "{name}: analytic {} numeric {} rel {:.2e}",
            r.analytic, r.numeric, r.rel_err
        );
        assert!(
            r.analytic.abs() > 1e-6,
            "{name}: a gradient that is not zero"
        );
        assert!(
            r.rel_err <= 5e-3,
            "{name}: relative error {:.3e}",
            r.rel_err
        );
    }
}

#[test]
fn dora_adapter_gradients_through_two_encoder_layers() {
    // The last encoder layer's output: both layers' attention (q and v adapted), softmax,
    // LayerNorm and the GELU (Erf) MLP lie between the adapters and this value.
    let path = repo_root().join("models/bert_legacy17.onnx");
    let model = load_model(&path).unwrap();
    let last = model
        .graph
        .nodes
        .iter()
        .rev()
        .find(|n| n.op_type == "LayerNormalization" && n.name.contains("layer.1/output"))
        .unwrap()
        .outputs[0]
        .clone();
    let (m, inputs, wrt) = with_loss(&path, &last, &[2, 8, 64]);
    let wrt: Vec<&str> = wrt.iter().map(String::as_str).collect();
    // f32 program (the fixture is f32): central differences with h = 1e-2 on a loss of ~100
    // terms; the stated tolerance covers f32 rounding of the differences.
    let r = check(&m, "loss", &wrt, &inputs, 1e-2, 11);
    eprintln!(
        "analytic {} numeric {} rel {:.2e}",
        r.analytic, r.numeric, r.rel_err
    );
    assert!(r.rel_err <= 5e-3, "relative error {:.3e}", r.rel_err);
}

/// DoRA with `detach_norm`: the emitted gradients are those of the model in which the column
/// norm is a constant (held at its current value), and they differ from the full gradients.
#[test]
fn detach_norm_gradients_treat_the_norm_as_a_constant() {
    use bidora_compiler::ir::{Graph, Tensor};
    use bidora_compiler::pipeline::CompileOptions;

    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut g = Graph {
        name: "lin".into(),
        ..Default::default()
    };
    g.inputs
        .push(f32_input("x", &[Dim::Known(4), Dim::Known(6)]));
    g.outputs
        .push(f32_input("y", &[Dim::Known(4), Dim::Known(5)]));
    let w: Vec<f32> = (0..30).map(|_| rng.random_range(-1.0..1.0)).collect();
    g.initializers.insert(
        "enc.query.weight".into(),
        Tensor::from_f32("enc.query.weight", vec![6, 5], &w),
    );
    g.nodes.push(Node::new(
        "MatMul",
        "/enc/query/MatMul",
        vec!["x".into(), "enc.query.weight".into()],
        vec!["y".into()],
    ));
    let model = model_of(g);
    let grads_for = |detach: bool| {
        let mut opts: CompileOptions = options(vec!["query".into()], Method::Dora);
        opts.adapter.detach_norm = detach;
        let c = compile(&model, &opts);
        let mut m = rewrite::lower(&c.adapted).unwrap();
        add_weighted_sum_loss(&mut m, "y", &[4, 5], DataType::Float);
        (c, m)
    };
    let (c, m) = grads_for(true);
    let mut inputs = vec![];
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut rnd = |shape: &[usize], lo: f32, hi: f32| {
        let n: usize = shape.iter().product();
        HostTensor::F32(
            ArrayD::from_shape_vec(
                IxDyn(shape),
                (0..n).map(|_| rng.random_range(lo..hi)).collect(),
            )
            .unwrap(),
        )
    };
    inputs.push(("x".to_string(), rnd(&[4, 6], -1.0, 1.0)));
    inputs.push(("c".to_string(), rnd(&[4, 5], -1.0, 1.0)));
    for (n, t) in &c.init {
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        inputs.push((n.clone(), rnd(&dims, 0.2, 0.8)));
    }
    let reference = bidora_tests::gradcheck::constant_norm_reference(&m, &mut inputs);
    let wrt: Vec<String> = c.init.keys().cloned().collect();
    let detached = autodiff::backward(&m, "loss", &wrt).unwrap();
    let prog = rewrite::strip_markers(&detached.model);
    let opts = bidora_tests::gradcheck::CheckOpts {
        reference: Some(&reference),
        h: 1e-2,
        seed: 23,
        direction: bidora_tests::gradcheck::Direction::Random,
        numeric_in_ort: false,
    };
    let r = bidora_tests::gradcheck::check_emitted(&prog, "loss", &detached.grads, &inputs, &opts)
        .unwrap();
    assert!(
        r.rel_err <= 1e-3,
        "detached gradients vs constant-norm model: {:.3e}",
        r.rel_err
    );
    // And against the full model (norm differentiated) they differ.
    let (_, full) = grads_for(false);
    let opts = bidora_tests::gradcheck::CheckOpts {
        reference: Some(&rewrite::strip_markers(&full)),
        ..opts
    };
    let r_full =
        bidora_tests::gradcheck::check_emitted(&prog, "loss", &detached.grads, &inputs, &opts)
            .unwrap();
    assert!(
        r_full.rel_err > 1e-2,
        "detach_norm changed nothing: {:.3e}",
        r_full.rel_err
    );
}
