//! Every gradient rule against central finite differences of its own op, in f64 through tract
//! (relative error of the directional derivative ≤ 1e-6), with random shapes that exercise
//! broadcasting and a symbolic batch dim. Where tract has no f64 kernel the case runs in f32
//! with a stated, looser tolerance.

use bidora_compiler::ir::{AttrValue, DataType, Dim, Graph, Node, Tensor, ValueInfo, ValueType};
use bidora_compiler::shape;
use bidora_runtime::tract_exec::HostTensor;
use bidora_tests::gradcheck::{check, check_emitted, CheckOpts, Direction};
use bidora_tests::model_of;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One op under test: its inputs (name, concrete shape, differentiate?), constant inputs,
/// attributes and number of outputs.
struct Case {
    op: &'static str,
    inputs: Vec<(&'static str, Vec<usize>, bool)>,
    consts: Vec<Tensor>,
    attrs: Vec<(&'static str, AttrValue)>,
    outputs: usize,
    /// Inputs drawn from [0.5, 1.5] (for Log, Sqrt, Pow, division) instead of ±[0.5, 1.5].
    positive: bool,
    dtype: DataType,
    /// The node's input order when the constants do not all come last (ScatterND's indices).
    order: Option<Vec<&'static str>>,
}

fn case(op: &'static str, inputs: Vec<(&'static str, Vec<usize>, bool)>) -> Case {
    Case {
        op,
        inputs,
        consts: vec![],
        attrs: vec![],
        outputs: 1,
        positive: false,
        dtype: DataType::Double,
        order: None,
    }
}

impl Case {
    fn attr(mut self, k: &'static str, v: AttrValue) -> Case {
        self.attrs.push((k, v));
        self
    }
    fn ints(mut self, name: &str, v: &[i64]) -> Case {
        self.consts
            .push(Tensor::from_i64(name, vec![v.len() as i64], v));
        self
    }
    fn positive(mut self) -> Case {
        self.positive = true;
        self
    }
    fn outputs(mut self, n: usize) -> Case {
        self.outputs = n;
        self
    }
    fn order(mut self, names: &[&'static str]) -> Case {
        self.order = Some(names.to_vec());
        self
    }
    fn f32(mut self) -> Case {
        self.dtype = DataType::Float;
        self
    }
}

fn host(dtype: DataType, shape: &[usize], v: Vec<f64>) -> HostTensor {
    let a = ArrayD::from_shape_vec(IxDyn(shape), v).unwrap();
    match dtype {
        DataType::Double => HostTensor::F64(a),
        _ => HostTensor::F32(a.mapv(|x| x as f32)),
    }
}

/// Builds `loss = Σ_k ReduceSum(y_k ⊙ c_k)` around the op (random weights `c_k` as inputs),
/// differentiates it and checks the gradients; returns the relative error.
fn run(c: Case, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g = Graph {
        name: c.op.into(),
        ..Default::default()
    };
    // Declared with a symbolic leading dim where the case's first input has rank ≥ 2.
    let declare = |shape: &[usize], sym: bool| -> Vec<Dim> {
        shape
            .iter()
            .enumerate()
            // A symbol never stands for a size-1 dim that broadcasts: exporters name batch and
            // sequence dims, and a broadcast axis is declared 1.
            .map(|(i, &d)| {
                if i == 0 && sym && d > 1 {
                    Dim::Sym("batch".into())
                } else {
                    Dim::Known(d as i64)
                }
            })
            .collect()
    };
    let sym = c.inputs[0].1.len() >= 3;
    let mut inputs = vec![];
    for (name, shape, _) in &c.inputs {
        let s = sym && shape.len() == c.inputs[0].1.len() && shape[0] == c.inputs[0].1[0];
        g.inputs.push(ValueInfo::new(
            *name,
            ValueType::tensor(c.dtype, declare(shape, s)),
        ));
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let m = rng.random_range(0.5..1.5);
                if c.positive || rng.random_bool(0.5) {
                    m
                } else {
                    -m
                }
            })
            .collect();
        inputs.push((name.to_string(), host(c.dtype, shape, v)));
    }
    let mut node_inputs: Vec<String> = c.inputs.iter().map(|i| i.0.to_string()).collect();
    for t in &c.consts {
        g.initializers.insert(t.name.clone(), t.clone());
        node_inputs.push(t.name.clone());
    }
    if let Some(order) = &c.order {
        node_inputs = order.iter().map(|s| s.to_string()).collect();
    }
    let outs: Vec<String> = (0..c.outputs).map(|k| format!("y{k}")).collect();
    let mut node = Node::new(c.op, "op", node_inputs, outs.clone());
    for (k, v) in &c.attrs {
        node = node.with_attr(k, v.clone());
    }
    g.nodes.push(node);
    // Concrete output shapes, from inference on a copy with concrete input dims.
    let mut concrete = g.clone();
    for (vi, (_, shape, _)) in concrete.inputs.iter_mut().zip(&c.inputs) {
        vi.ty = Some(ValueType::tensor(
            c.dtype,
            shape.iter().map(|&d| Dim::Known(d as i64)).collect(),
        ));
    }
    let facts = shape::infer_graph(&concrete, 18).unwrap();
    let mut total = String::new();
    for (k, y) in outs.iter().enumerate() {
        let ys: Vec<usize> = facts
            .get(y)
            .unwrap()
            .shape
            .iter()
            .map(|d| d.as_known().unwrap() as usize)
            .collect();
        let cname = format!("c{k}");
        let n: usize = ys.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        g.inputs.push(ValueInfo::new(
            cname.clone(),
            ValueType::tensor(c.dtype, ys.iter().map(|&d| Dim::Known(d as i64)).collect()),
        ));
        inputs.push((cname.clone(), host(c.dtype, &ys, v)));
        let p = format!("p{k}");
        let s = format!("s{k}");
        g.nodes.push(Node::new(
            "Mul",
            format!("w{k}"),
            vec![y.clone(), cname],
            vec![p.clone()],
        ));
        g.nodes.push(
            Node::new("ReduceSum", format!("sum{k}"), vec![p], vec![s.clone()])
                .with_attr("keepdims", AttrValue::Int(0)),
        );
        total = if total.is_empty() {
            s
        } else {
            let t = format!("t{k}");
            g.nodes.push(Node::new(
                "Add",
                format!("acc{k}"),
                vec![total, s],
                vec![t.clone()],
            ));
            t
        };
    }
    g.nodes.push(Node::new(
        "Identity",
        "loss",
        vec![total],
        vec!["loss".into()],
    ));
    g.outputs
        .push(ValueInfo::new("loss", ValueType::tensor(c.dtype, vec![])));
    let wrt: Vec<&str> = c.inputs.iter().filter(|i| i.2).map(|i| i.0).collect();
    let h = if c.dtype == DataType::Double {
        1e-5
    } else {
        1e-2
    };
    let r = if c.op == "LayerNormalization" {
        // tract runs LayerNormalization at f32 precision even for f64 inputs, too coarse for
        // f64 finite differences: they are taken in onnxruntime (exact f64) instead.
        let wrt: Vec<String> = wrt.iter().map(|s| s.to_string()).collect();
        let grads = bidora_compiler::autodiff::backward(&model_of(g), "loss", &wrt).unwrap();
        let opts = CheckOpts {
            reference: None,
            h,
            seed,
            direction: Direction::Random,
            numeric_in_ort: true,
        };
        match check_emitted(&grads.model, "loss", &grads.grads, &inputs, &opts) {
            Some(r) => r,
            None => return 0.0, // onnxruntime absent: ort::run printed SKIPPED
        }
    } else {
        check(&model_of(g), "loss", &wrt, &inputs, h, seed)
    };
    eprintln!(
        "{}: analytic {:.9e} numeric {:.9e} rel err {:.2e}",
        c.op, r.analytic, r.numeric, r.rel_err
    );
    r.rel_err
}

const F64_TOL: f64 = 1e-6;
/// f32 central differences with h = 1e-2: truncation and rounding error ~1e-4 relative
/// (measured: Erf 5.7e-5, Sigmoid 1.6e-4).
const F32_TOL: f64 = 1e-3;

fn assert_case(c: Case, seed: u64) {
    let (op, tol) = (
        c.op,
        if c.dtype == DataType::Double {
            F64_TOL
        } else {
            F32_TOL
        },
    );
    let err = run(c, seed);
    assert!(err <= tol, "{op}: relative error {err:.3e} > {tol:e}");
}

fn x(shape: &[usize]) -> (&'static str, Vec<usize>, bool) {
    ("x", shape.to_vec(), true)
}
fn y(shape: &[usize]) -> (&'static str, Vec<usize>, bool) {
    ("y", shape.to_vec(), true)
}
fn z(shape: &[usize]) -> (&'static str, Vec<usize>, bool) {
    ("z", shape.to_vec(), true)
}

#[test]
fn elementwise_binary_with_broadcasting() {
    assert_case(case("Add", vec![x(&[3, 2, 4]), y(&[4])]), 1);
    assert_case(case("Sum", vec![x(&[3, 2, 4]), y(&[4]), z(&[2, 1])]), 8);
    assert_case(case("Sub", vec![x(&[3, 1, 4]), y(&[2, 1])]), 2);
    assert_case(case("Mul", vec![x(&[3, 2, 4]), y(&[2, 1])]), 3);
    assert_case(
        case("Div", vec![x(&[3, 2, 4]), y(&[3, 1, 4])]).positive(),
        4,
    );
    assert_case(case("Pow", vec![x(&[3, 2, 4]), y(&[4])]).positive(), 5);
    assert_case(case("Max", vec![x(&[3, 2, 4]), y(&[2, 4])]), 6);
    assert_case(case("Min", vec![x(&[3, 2, 4]), y(&[3, 1, 1])]), 7);
}

#[test]
fn elementwise_unary() {
    for (i, op) in ["Neg", "Exp", "Tanh", "Relu", "Sin", "Cos", "Identity"]
        .into_iter()
        .enumerate()
    {
        assert_case(case(op, vec![x(&[3, 2, 5])]), 10 + i as u64);
    }
    for (i, op) in ["Sqrt", "Log", "Reciprocal"].into_iter().enumerate() {
        assert_case(case(op, vec![x(&[3, 2, 5])]).positive(), 20 + i as u64);
    }
    assert_case(
        case("Softmax", vec![x(&[3, 2, 5])]).attr("axis", AttrValue::Int(-1)),
        30,
    );
    assert_case(
        case("LogSoftmax", vec![x(&[3, 2, 5])]).attr("axis", AttrValue::Int(1)),
        31,
    );
    assert_case(
        case("Cast", vec![x(&[3, 4])]).attr("to", AttrValue::Int(DataType::Double as i64)),
        32,
    );
}

#[test]
fn unary_without_f64_kernels_in_tract() {
    // tract has no f64 Erf or Sigmoid: checked in f32 (F32_TOL).
    assert_case(case("Erf", vec![x(&[3, 2, 5])]).f32(), 40);
    assert_case(case("Sigmoid", vec![x(&[3, 2, 5])]).f32(), 41);
}

/// Where(c, a, b) with the condition computed in-graph from a float input (`cond_in > 0`), so
/// the harness feeds float inputs only; the loss `Σ w²` makes both branches' weights differ.
#[test]
fn where_selects_the_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(50);
    let mut g = Graph {
        name: "where".into(),
        ..Default::default()
    };
    let mut inputs = vec![];
    for (name, shape) in [
        ("cond_in", vec![2usize, 4]),
        ("y", vec![3, 2, 4]),
        ("z", vec![2, 4]),
    ] {
        let dims = shape.iter().map(|&d| Dim::Known(d as i64)).collect();
        g.inputs.push(ValueInfo::new(
            name,
            ValueType::tensor(DataType::Double, dims),
        ));
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        inputs.push((name.to_string(), host(DataType::Double, &shape, v)));
    }
    g.initializers
        .insert("zero".into(), Tensor::from_f64("zero", vec![], &[0.0]));
    let n = |op: &str, i: &[&str], o: &str| {
        Node::new(
            op,
            o,
            i.iter().map(|s| s.to_string()).collect(),
            vec![o.to_string()],
        )
    };
    g.nodes.push(n("Greater", &["cond_in", "zero"], "cond"));
    g.nodes.push(n("Where", &["cond", "y", "z"], "w"));
    g.nodes.push(n("Mul", &["w", "w"], "w2"));
    g.nodes
        .push(n("ReduceSum", &["w2"], "loss").with_attr("keepdims", AttrValue::Int(0)));
    g.outputs.push(ValueInfo::new(
        "loss",
        ValueType::tensor(DataType::Double, vec![]),
    ));
    let r = check(&model_of(g), "loss", &["y", "z"], &inputs, 1e-5, 50);
    assert!(
        r.rel_err <= F64_TOL,
        "Where: relative error {:.3e}",
        r.rel_err
    );
}

#[test]
fn matmul_and_gemm() {
    // A batched input against a 2-D weight (the linear layers), and batched × batched.
    assert_case(case("MatMul", vec![x(&[3, 4, 5]), y(&[5, 2])]), 60);
    assert_case(case("MatMul", vec![x(&[2, 3, 4, 5]), y(&[3, 5, 2])]), 61);
    for (i, (ta, tb)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
        let a = if ta == 1 { vec![5, 3] } else { vec![3, 5] };
        let b = if tb == 1 { vec![4, 5] } else { vec![5, 4] };
        let gemm = || {
            case("Gemm", vec![x(&a), y(&b), z(&[4])])
                .attr("transA", AttrValue::Int(ta))
                .attr("transB", AttrValue::Int(tb))
        };
        assert_case(gemm(), 62 + i as u64);
        // tract's f64 Gemm fails on alpha/beta != 1 (it builds them as f32 constants), so the
        // scaled form is checked in f32.
        let scaled = gemm()
            .attr("alpha", AttrValue::Float(0.5))
            .attr("beta", AttrValue::Float(2.0))
            .f32();
        assert_case(scaled, 66 + i as u64);
    }
}

#[test]
fn reductions_and_layer_norm() {
    assert_case(
        case("ReduceSum", vec![x(&[3, 4, 5])]).ints("axes", &[1]),
        70,
    );
    assert_case(
        case("ReduceSum", vec![x(&[3, 4, 5])])
            .ints("axes", &[-1, 0])
            .attr("keepdims", AttrValue::Int(0)),
        71,
    );
    assert_case(
        case("ReduceMean", vec![x(&[3, 4, 5])]).ints("axes", &[2]),
        72,
    );
    let ln = |flags: (bool, bool, bool)| {
        case(
            "LayerNormalization",
            vec![
                ("x", vec![3, 4, 6], flags.0),
                ("y", vec![6], flags.1),
                ("z", vec![6], flags.2),
            ],
        )
        .attr("axis", AttrValue::Int(-1))
        .attr("epsilon", AttrValue::Float(1e-5))
        // Statistics in f64 too (the default stash type is f32).
        .attr("stash_type", AttrValue::Int(DataType::Double as i64))
    };
    assert_case(ln((true, true, true)), 73);
}

#[test]
fn data_movement() {
    assert_case(
        case("Transpose", vec![x(&[3, 4, 5])]).attr("perm", AttrValue::Ints(vec![2, 0, 1])),
        80,
    );
    assert_case(
        case("Reshape", vec![x(&[3, 4, 6])]).ints("shape", &[0, -1, 3]),
        81,
    );
    assert_case(
        case("Flatten", vec![x(&[3, 4, 5])]).attr("axis", AttrValue::Int(2)),
        82,
    );
    assert_case(
        case("Unsqueeze", vec![x(&[3, 4, 5])]).ints("axes", &[1]),
        83,
    );
    assert_case(case("Squeeze", vec![x(&[3, 1, 5])]).ints("axes", &[1]), 84);
    assert_case(
        case("Expand", vec![x(&[1, 4, 1])]).ints("shape", &[3, 4, 5]),
        85,
    );
    assert_case(
        case("Concat", vec![x(&[3, 2, 5]), y(&[3, 4, 5])]).attr("axis", AttrValue::Int(1)),
        86,
    );
    assert_case(
        case("Split", vec![x(&[3, 6, 5])])
            .ints("split", &[2, 4])
            .attr("axis", AttrValue::Int(1))
            .outputs(2),
        87,
    );
    let mut c = case("Gather", vec![x(&[3, 6, 5])]).attr("axis", AttrValue::Int(1));
    c.consts.push(Tensor::from_i64("idx", vec![], &[2]));
    assert_case(c, 89);
    let mut c = case("Gather", vec![x(&[3, 6, 5])]).attr("axis", AttrValue::Int(-1));
    c.consts
        .push(Tensor::from_i64("idx", vec![4], &[0, 4, -1, 4]));
    assert_case(c, 90);
    let mut c = case("GatherElements", vec![x(&[3, 6, 5])]).attr("axis", AttrValue::Int(1));
    let idx: Vec<i64> = (0..3 * 4 * 5).map(|k| [0, 5, -1, 2, 2][k % 5]).collect();
    c.consts.push(Tensor::from_i64("idx", vec![3, 4, 5], &idx));
    assert_case(c, 91);
    let c = case("Slice", vec![x(&[3, 6, 5])])
        .ints("starts", &[1, -4])
        .ints("ends", &[5, i64::MAX])
        .ints("axes", &[1, 2]);
    assert_case(c, 88);
    // GatherND picks [batch, position] pairs (decoders' last-token pooling): a repeated pair
    // sums its gradients. (No negative index: tract's GatherND refuses them.)
    let mut c = case("GatherND", vec![x(&[3, 6, 5])]);
    c.consts.push(Tensor::from_i64(
        "idx",
        vec![4, 2],
        &[0, 5, 1, 2, 2, 4, 1, 2],
    ));
    assert_case(c, 92);
    // Whole-row tuples (depth 1), and tuples reaching single elements (depth 3).
    let mut c = case("GatherND", vec![x(&[4, 3, 2])]);
    c.consts
        .push(Tensor::from_i64("idx", vec![2, 1, 1], &[3, 0]));
    assert_case(c, 93);
    let mut c = case("GatherND", vec![x(&[4, 3, 2])]);
    c.consts
        .push(Tensor::from_i64("idx", vec![2, 3], &[3, 2, 1, 0, 1, 0]));
    assert_case(c, 94);
    // ScatterND, the GatherND gradient (the exact hypergradient differentiates it again):
    // overwriting, and adding with a repeated tuple.
    let mut c = case("ScatterND", vec![x(&[3, 6, 5]), y(&[3, 5])]).order(&["x", "idx", "y"]);
    c.consts
        .push(Tensor::from_i64("idx", vec![3, 2], &[0, 5, 1, 2, 2, 0]));
    assert_case(c, 95);
    let mut c = case("ScatterND", vec![x(&[3, 6, 5]), y(&[3, 5])])
        .order(&["x", "idx", "y"])
        .attr("reduction", AttrValue::String(b"add".to_vec()));
    c.consts
        .push(Tensor::from_i64("idx", vec![3, 2], &[0, 5, 1, 2, 0, 5]));
    assert_case(c, 96);
    // Slice's gradient is a Pad; the exact hypergradient differentiates it again.
    let c = case("Pad", vec![x(&[3, 4, 2])]).ints("pads", &[0, 2, 1, 1, 0, 3]);
    assert_case(c, 89);
    let mut c = case("Pad", vec![x(&[3, 4, 2])]).ints("pads", &[1, 2]);
    c.consts.push(Tensor::from_f64("value", vec![], &[0.5]));
    let c = c.ints("axes", &[-2]);
    assert_case(c, 90);
}

/// The composite DoRA and LoRA nodes (differentiated through their lowering), in f64, for a
/// MatMul and a Gemm(transB=1) weight, w.r.t. x, A, B and m; and DoRA with `detach_norm`
/// against the same model with the column norm held constant.
#[test]
fn dora_and_lora_nodes_in_f64() {
    use bidora_compiler::rewrite::{self, Method};
    use bidora_tests::compile;

    let mut seed = 100;
    for gemm in [false, true] {
        for (method, detach) in [
            (Method::Lora, false),
            (Method::Dora, false),
            (Method::Dora, true),
        ] {
            seed += 1;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (din, dout) = (6usize, 5usize);
            let mut g = Graph {
                name: "lin".into(),
                ..Default::default()
            };
            g.inputs.push(ValueInfo::new(
                "x",
                ValueType::tensor(
                    DataType::Double,
                    vec![Dim::Sym("batch".into()), Dim::Known(din as i64)],
                ),
            ));
            g.outputs.push(ValueInfo::new(
                "y",
                ValueType::tensor(
                    DataType::Double,
                    vec![Dim::Sym("batch".into()), Dim::Known(dout as i64)],
                ),
            ));
            let w: Vec<f64> = (0..din * dout)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let dims = if gemm {
                vec![dout as i64, din as i64]
            } else {
                vec![din as i64, dout as i64]
            };
            g.initializers.insert(
                "enc.query.weight".into(),
                Tensor::from_f64("enc.query.weight", dims, &w),
            );
            let node = if gemm {
                Node::new(
                    "Gemm",
                    "/enc/query/Gemm",
                    vec!["x".into(), "enc.query.weight".into()],
                    vec!["y".into()],
                )
                .with_attr("transB", AttrValue::Int(1))
            } else {
                Node::new(
                    "MatMul",
                    "/enc/query/MatMul",
                    vec!["x".into(), "enc.query.weight".into()],
                    vec!["y".into()],
                )
            };
            g.nodes.push(node);
            let mut opts = bidora_tests::options(vec!["query".into()], method);
            opts.adapter.detach_norm = detach;
            let c = compile(&model_of(g), &opts);
            let mut m = rewrite::lower(&c.adapted).unwrap();
            bidora_tests::add_weighted_sum_loss(&mut m, "y", &[3, dout as i64], DataType::Double);
            let mut rnd = |shape: &[usize], lo: f64, hi: f64| {
                let n: usize = shape.iter().product();
                host(
                    DataType::Double,
                    shape,
                    (0..n).map(|_| rng.random_range(lo..hi)).collect(),
                )
            };
            let mut inputs = vec![
                ("x".to_string(), rnd(&[3, din], -1.0, 1.0)),
                ("c".to_string(), rnd(&[3, dout], -1.0, 1.0)),
            ];
            for (n, t) in &c.init {
                let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                inputs.push((n.clone(), rnd(&shape, 0.2, 0.8)));
            }
            let mut wrt: Vec<String> = vec!["x".into()];
            wrt.extend(c.init.keys().cloned());
            let grads = bidora_compiler::autodiff::backward(&m, "loss", &wrt).unwrap();
            let prog = rewrite::strip_markers(&grads.model);
            // With detach_norm, finite differences of the model whose norm is an input held at
            // its value here.
            let reference =
                detach.then(|| bidora_tests::gradcheck::constant_norm_reference(&m, &mut inputs));
            let opts = CheckOpts {
                reference: reference.as_ref(),
                h: 1e-5,
                seed,
                direction: Direction::Random,
                numeric_in_ort: false,
            };
            let r = check_emitted(&prog, "loss", &grads.grads, &inputs, &opts).unwrap();
            eprintln!(
                "{method:?} detach={detach} gemm={gemm}: rel err {:.2e}",
                r.rel_err
            );
            assert!(
                r.rel_err <= F64_TOL,
                "{method:?} detach={detach} gemm={gemm}: relative error {:.3e}",
                r.rel_err
            );
        }
    }
}

/// The emitted backward graphs are themselves differentiable: differentiating
/// `s = Σ ⟨∇_V L, v⟩` (V = the DoRA directions A, B) w.r.t. the magnitudes m gives the mixed
/// Hessian-vector product ∇²_{m,V} L · v that BiDoRA's exact hypergradient needs; it is
/// checked against finite differences of `s` in f64.
#[test]
fn backward_graphs_differentiate_again() {
    use bidora_compiler::rewrite::{self, Method};

    let mut rng = ChaCha8Rng::seed_from_u64(300);
    let (din, dout) = (5usize, 4usize);
    let mut g = Graph {
        name: "lin".into(),
        ..Default::default()
    };
    g.inputs.push(ValueInfo::new(
        "x",
        ValueType::tensor(
            DataType::Double,
            vec![Dim::Known(3), Dim::Known(din as i64)],
        ),
    ));
    g.outputs.push(ValueInfo::new(
        "y",
        ValueType::tensor(
            DataType::Double,
            vec![Dim::Known(3), Dim::Known(dout as i64)],
        ),
    ));
    let w: Vec<f64> = (0..din * dout)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    g.initializers.insert(
        "enc.query.weight".into(),
        Tensor::from_f64("enc.query.weight", vec![din as i64, dout as i64], &w),
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
        vec!["y".into()],
    ));
    let c = bidora_tests::compile(
        &model_of(g),
        &bidora_tests::options(vec!["query".into()], Method::Dora),
    );
    let mut m = rewrite::lower(&c.adapted).unwrap();
    bidora_tests::add_weighted_sum_loss(&mut m, "y", &[3, dout as i64], DataType::Double);
    let ad = &c.adapters[0];
    let (a, b, mag) = (
        ad.lora_a.clone(),
        ad.lora_b.clone(),
        ad.magnitude.clone().unwrap(),
    );
    let first =
        bidora_compiler::autodiff::backward(&m, "loss", &[a.clone(), b.clone(), mag.clone()])
            .unwrap();
    // s = Σ ⟨∇_A L, v_A⟩ + Σ ⟨∇_B L, v_B⟩
    let mut m2 = first.model.clone();
    let g2 = &mut m2.graph;
    let mut terms = vec![];
    for (k, (wname, gname)) in first
        .grads
        .iter()
        .enumerate()
        .filter(|(_, (w, _))| *w == a || *w == b)
    {
        let shape = c.init[wname].dims.iter().map(|&d| Dim::Known(d)).collect();
        let v = format!("v{k}");
        g2.inputs.push(ValueInfo::new(
            v.clone(),
            ValueType::tensor(DataType::Double, shape),
        ));
        g2.nodes.push(Node::new(
            "Mul",
            format!("s.mul{k}"),
            vec![gname.clone(), v.clone()],
            vec![format!("s.p{k}")],
        ));
        g2.nodes.push(
            Node::new(
                "ReduceSum",
                format!("s.sum{k}"),
                vec![format!("s.p{k}")],
                vec![format!("s.t{k}")],
            )
            .with_attr("keepdims", AttrValue::Int(0)),
        );
        terms.push(format!("s.t{k}"));
    }
    g2.nodes
        .push(Node::new("Add", "s.add", terms.clone(), vec!["s".into()]));
    g2.outputs.push(ValueInfo::new(
        "s",
        ValueType::tensor(DataType::Double, vec![]),
    ));
    let mut rnd = |shape: &[usize], lo: f64, hi: f64| {
        let n: usize = shape.iter().product();
        host(
            DataType::Double,
            shape,
            (0..n).map(|_| rng.random_range(lo..hi)).collect(),
        )
    };
    let mut inputs = vec![
        ("x".to_string(), rnd(&[3, din], -1.0, 1.0)),
        ("c".to_string(), rnd(&[3, dout], -1.0, 1.0)),
    ];
    for (n, t) in &c.init {
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        inputs.push((n.clone(), rnd(&shape, 0.2, 0.8)));
    }
    for (k, (wname, _)) in first
        .grads
        .iter()
        .enumerate()
        .filter(|(_, (w, _))| *w == a || *w == b)
    {
        let shape: Vec<usize> = c.init[wname].dims.iter().map(|&d| d as usize).collect();
        inputs.push((format!("v{k}"), rnd(&shape, -1.0, 1.0)));
    }
    let r = check(&m2, "s", &[mag.as_str()], &inputs, 1e-5, 301);
    eprintln!(
        "∇_m ⟨∇_V L, v⟩: analytic {:.9e} numeric {:.9e} rel err {:.2e}",
        r.analytic, r.numeric, r.rel_err
    );
    assert!(
        r.analytic.abs() > 1e-6,
        "the mixed term is not trivially zero"
    );
    assert!(
        r.rel_err <= F64_TOL,
        "second-order relative error {:.3e}",
        r.rel_err
    );
}

/// Every op with a gradient rule is named in one of this file's cases (as a string literal):
/// a rule added without a finite-difference case fails here. The composite ai.bidora ops are
/// checked through their lowering (`dora_and_lora_nodes_in_f64`).
#[test]
fn every_gradient_rule_has_a_case() {
    let src = include_str!("grad_rules.rs");
    let mut missing: Vec<String> = bidora_compiler::ops::all()
        .filter(|(_, def)| def.grad.is_some())
        .filter(|(_, def)| !src.contains(&format!("\"{}\"", def.op)))
        .map(|(domain, def)| format!("{domain}:{}", def.op))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "gradient rules without a case in tests/tests/grad_rules.rs: {missing:?}"
    );
}
