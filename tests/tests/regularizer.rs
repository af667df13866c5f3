//! The orthogonality regulariser: its value against an independent ndarray computation for
//! both variants, and its gradient (through `loss + γ·R`) against finite differences in f64.

use bidora_compiler::ir::{AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo, ValueType};
use bidora_compiler::regularizer::{self, RegVariant};
use bidora_compiler::rewrite::{self, Method};
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::gradcheck::check;
use bidora_tests::*;
use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Two adapted modules: `q` as MatMul([in, out]) and `v` as Gemm(transB=1, [out, in]).
fn model(rng: &mut ChaCha8Rng) -> (bidora_compiler::ir::Model, Vec<f64>, Vec<f64>) {
    let mut g = Graph {
        name: "two".into(),
        ..Default::default()
    };
    let d64 =
        |d: &[i64]| ValueType::tensor(DataType::Double, d.iter().map(|&v| Dim::Known(v)).collect());
    g.inputs.push(ValueInfo::new("x", d64(&[3, 6])));
    g.inputs.push(ValueInfo::new("c", d64(&[3, 4])));
    g.outputs.push(ValueInfo::new("loss", d64(&[])));
    let wq: Vec<f64> = (0..24).map(|_| rng.random_range(-1.0..1.0)).collect();
    let wv: Vec<f64> = (0..24).map(|_| rng.random_range(-1.0..1.0)).collect();
    g.initializers.insert(
        "m.query.weight".into(),
        Tensor::from_f64("m.query.weight", vec![6, 4], &wq),
    );
    g.initializers.insert(
        "m.value.weight".into(),
        Tensor::from_f64("m.value.weight", vec![4, 6], &wv),
    );
    g.nodes.push(Node::new(
        "MatMul",
        "/m/query/MatMul",
        vec!["x".into(), "m.query.weight".into()],
        vec!["q".into()],
    ));
    g.nodes.push(
        Node::new(
            "Gemm",
            "/m/value/Gemm",
            vec!["x".into(), "m.value.weight".into()],
            vec!["v".into()],
        )
        .with_attr("transB", AttrValue::Int(1)),
    );
    g.nodes.push(Node::new(
        "Mul",
        "qv",
        vec!["q".into(), "v".into()],
        vec!["p".into()],
    ));
    g.nodes.push(Node::new(
        "Mul",
        "pc",
        vec!["p".into(), "c".into()],
        vec!["pcv".into()],
    ));
    g.nodes.push(
        Node::new("ReduceSum", "sum", vec!["pcv".into()], vec!["loss".into()])
            .with_attr("keepdims", AttrValue::Int(0)),
    );
    (model_of(g), wq, wv)
}

/// ‖DᵀD − I‖²_F for V = W + s·A·B ([in, out]), computed directly.
fn fro2(w: &Array2<f64>, a: &Array2<f64>, b: &Array2<f64>, s: f64) -> f64 {
    let v = w + &(a.dot(b) * s);
    let n = v.map_axis(ndarray::Axis(0), |c| c.dot(&c).sqrt());
    let d = &v / &n;
    let gram = d.t().dot(&d) - Array2::<f64>::eye(v.ncols());
    gram.iter().map(|x| x * x).sum()
}

#[test]
fn value_and_gradient_for_both_variants() {
    for (k, variant) in [RegVariant::Paper, RegVariant::Released]
        .into_iter()
        .enumerate()
    {
        let mut rng = ChaCha8Rng::seed_from_u64(40 + k as u64);
        let (m0, wq, wv) = model(&mut rng);
        let c = compile(&m0, &options(vec!["query,value".into()], Method::Dora));
        let lowered = rewrite::lower(&c.adapted).unwrap();
        let (m, total, r) =
            regularizer::attach(&lowered, &c.adapters, "loss", "gamma", variant).unwrap();
        let mut rnd = |shape: &[usize], lo: f64, hi: f64| {
            let n: usize = shape.iter().product();
            ArrayD::from_shape_vec(
                IxDyn(shape),
                (0..n).map(|_| rng.random_range(lo..hi)).collect(),
            )
            .unwrap()
        };
        let mut inputs = vec![
            ("x".to_string(), HostTensor::F64(rnd(&[3, 6], -1.0, 1.0))),
            ("c".to_string(), HostTensor::F64(rnd(&[3, 4], -1.0, 1.0))),
            (
                "gamma".to_string(),
                HostTensor::F64(ArrayD::from_elem(IxDyn(&[]), 0.3)),
            ),
        ];
        let mut vals = std::collections::HashMap::new();
        for (n, t) in &c.init {
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let a = rnd(&shape, -0.5, 0.5);
            vals.insert(n.clone(), a.clone());
            inputs.push((n.clone(), HostTensor::F64(a)));
        }
        // Independent value of R.
        let two = |v: &ArrayD<f64>| v.clone().into_dimensionality::<ndarray::Ix2>().unwrap();
        let s = c.adapters[0].scaling as f64;
        let wq = Array2::from_shape_vec((6, 4), wq).unwrap();
        let wv = Array2::from_shape_vec((4, 6), wv).unwrap().t().to_owned();
        let terms: Vec<f64> = c
            .adapters
            .iter()
            .zip([&wq, &wv])
            .map(|(ad, w)| fro2(w, &two(&vals[&ad.lora_a]), &two(&vals[&ad.lora_b]), s))
            .collect();
        let expected = match variant {
            RegVariant::Paper => terms.iter().sum::<f64>(),
            RegVariant::Released => {
                terms.iter().map(|t| t.sqrt()).sum::<f64>() / terms.len() as f64
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let p = save(&rewrite::strip_markers(&m), dir.path(), "reg.onnx");
        let outs = run_once(&p, &inputs).unwrap();
        let names: Vec<&str> = m.graph.outputs.iter().map(|o| o.name.as_str()).collect();
        let got = match &outs[names.iter().position(|n| *n == r).unwrap()] {
            HostTensor::F64(a) => a.sum(),
            other => panic!("{other:?}"),
        };
        assert!(
            (got - expected).abs() <= 1e-12 * expected.abs().max(1.0),
            "{variant:?}: R {got} vs {expected}"
        );
        // Gradient of loss + γR w.r.t. every adapter tensor.
        let wrt: Vec<&str> = c.init.keys().map(String::as_str).collect();
        let res = check(&m, &total, &wrt, &inputs, 1e-5, 50 + k as u64);
        assert!(
            res.rel_err <= 1e-6,
            "{variant:?}: gradient relative error {:.3e}",
            res.rel_err
        );
    }
}
