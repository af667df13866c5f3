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

#[test]
fn lowering_of_one_dora_and_one_lora_adapter() {
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
    let model = model_of(g);
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
