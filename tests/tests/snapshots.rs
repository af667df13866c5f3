//! Snapshots of the rewrite as text, for review: the candidate list and the DoRA-adapted graph
//! of each fixture family, and the lowering of one adapter into standard ONNX ops.
//! Update with `INSTA_UPDATE=always cargo test -p bidora-tests --test snapshots` and review
//! the diff (`cargo insta review` if installed).

use bidora_compiler::ir::{AttrValue, Dim, Graph, Node, Tensor};
use bidora_compiler::rewrite::Method;
use bidora_compiler::{dump, load_model, targets};
use bidora_tests::*;

#[test]
fn candidates_and_adapted_graph_per_fixture() {
    for path in fixtures() {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let model = load_model(&path).unwrap();
        insta::assert_snapshot!(
            format!("{stem}.candidates"),
            targets::format_candidates(&targets::candidates(&model.graph))
        );
        let c = compile(&model, &options(qv_targets(&family(&path)), Method::Dora));
        insta::assert_snapshot!(format!("{stem}.dora"), dump::graph(&c.adapted.graph));
    }
}

fn one_linear() -> bidora_compiler::ir::Model {
    let mut g = Graph {
        name: "one_linear".into(),
        ..Default::default()
    };
    g.inputs
        .push(f32_input("x", &[Dim::Sym("batch".into()), Dim::Known(4)]));
    g.outputs
        .push(f32_input("y", &[Dim::Sym("batch".into()), Dim::Known(3)]));
    let w: Vec<f32> = (0..12).map(|i| i as f32 / 10.0 - 0.5).collect();
    g.initializers.insert(
        "enc.query.weight".into(),
        Tensor::from_f32("enc.query.weight", vec![3, 4], &w),
    );
    g.initializers.insert(
        "enc.query.bias".into(),
        Tensor::from_f32("enc.query.bias", vec![3], &[0.1, 0.2, 0.3]),
    );
    g.nodes.push(
        Node::new(
            "Gemm",
            "/enc/query/Gemm",
            vec![
                "x".into(),
                "enc.query.weight".into(),
                "enc.query.bias".into(),
            ],
            vec!["y".into()],
        )
        .with_attr("transB", AttrValue::Int(1)),
    );
    model_of(g)
}

#[test]
fn lowering_of_one_dora_and_one_lora_adapter() {
    let model = one_linear();
    // The training program of the DoRA model with a classification loss: forward, loss head
    // and the backward graph of every adapter tensor.
    let mut opts = options(vec!["query".into()], Method::Dora);
    opts.task = Some(bidora_compiler::heads::Task::SeqCls);
    let c = compile(&model, &opts);
    insta::assert_snapshot!(
        "one_linear.Dora.train_step",
        dump::graph(&c.training.unwrap().train_step.graph)
    );
    for method in [Method::Dora, Method::Lora] {
        let c = compile(&model, &options(vec!["query".into()], method));
        insta::assert_snapshot!(
            format!("one_linear.{method:?}.adapted"),
            dump::graph(&c.adapted.graph)
        );
        insta::assert_snapshot!(
            format!("one_linear.{method:?}.forward"),
            dump::graph(&c.forward.graph)
        );
    }
}

/// The same linear op with f16 weights and activations: the casts the lowering puts around
/// the f32 adapters (x up, x·W up, the output down; A down for Aᵀ·W against the f16 weight)
/// and the loss head's cast of the logits to f32.
#[test]
fn lowering_of_an_f16_linear_op_casts_around_f32_adapters() {
    use bidora_compiler::ir::{DataType, ValueType};
    let mut model = one_linear();
    let g = &mut model.graph;
    for t in g.initializers.values_mut() {
        *t = Tensor::from_f64_as(
            DataType::Float16,
            t.name.clone(),
            t.dims.clone(),
            &t.to_f64_vec().unwrap(),
        );
    }
    for v in g.inputs.iter_mut().chain(&mut g.outputs) {
        if let Some(ValueType::Tensor { elem, .. }) = &mut v.ty {
            *elem = DataType::Float16;
        }
    }
    for method in [Method::Dora, Method::Lora] {
        let c = compile(&model, &options(vec!["query".into()], method));
        insta::assert_snapshot!(
            format!("one_linear_f16.{method:?}.forward"),
            dump::graph(&c.forward.graph)
        );
    }
    let mut opts = options(vec!["query".into()], Method::Dora);
    opts.task = Some(bidora_compiler::heads::Task::SeqCls);
    let c = compile(&model, &opts);
    insta::assert_snapshot!(
        "one_linear_f16.Dora.eval",
        dump::graph(&c.training.unwrap().eval.graph)
    );
}
