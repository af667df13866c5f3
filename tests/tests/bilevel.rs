//! BiDoRA's lower and upper programs in f64 against independent computations:
//!
//! - `fd`, `fd-forward` and `exact` against a brute-force central difference of the unrolled
//!   objective `F(M) = L_val(V − ξ·∇_V L_lower(V, M), M)`, itself computed by running the
//!   lower program (for the inner gradient) and the loss graph (for L_val), along random
//!   directions of M;
//! - `first-order` against `∇_M L_val(V, M)` from a plain backward program;
//! - `betty` against its definition assembled here from plain gradient programs.
//!
//! The model is small but has what matters: two DoRA modules (MatMul `[in, out]` and Gemm
//! `transB=1` `[out, in]`), a nonlinearity between them and the loss, symbolic batch, and
//! train and validation batches of different sizes.

use std::collections::HashMap;

use bidora_compiler::autodiff;
use bidora_compiler::bilevel::{self, Groups, Hypergrad, Lower};
use bidora_compiler::heads::{Head, Task};
use bidora_compiler::ir::{
    AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo, ValueType,
};
use bidora_compiler::regularizer::RegVariant;
use bidora_compiler::rewrite::{self, Method};
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Vals = HashMap<String, ArrayD<f64>>;

const XI: f64 = 0.5;
const GAMMA: f64 = 0.3;
const ALPHA_FD: f64 = 0.01;

/// `loss = Σ (Tanh(q) ⊙ v · Wo − c)²` with q, v the two adapted projections of x.
fn model(rng: &mut ChaCha8Rng) -> Model {
    let mut g = Graph {
        name: "bilevel_toy".into(),
        ..Default::default()
    };
    let ty = |d: Vec<Dim>| ValueType::tensor(DataType::Double, d);
    let batch = || Dim::Sym("batch".into());
    g.inputs
        .push(ValueInfo::new("x", ty(vec![batch(), Dim::Known(6)])));
    g.inputs
        .push(ValueInfo::new("c", ty(vec![batch(), Dim::Known(2)])));
    g.outputs.push(ValueInfo::new("loss", ty(vec![])));
    let mut w = |name: &str, dims: Vec<i64>| {
        let n: i64 = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        g.initializers
            .insert(name.into(), Tensor::from_f64(name, dims, &v));
    };
    w("m.query.weight", vec![6, 4]);
    w("m.value.weight", vec![4, 6]);
    w("m.out.weight", vec![4, 2]);
    let node = |op: &str, name: &str, i: &[&str], o: &str| {
        Node::new(
            op,
            name,
            i.iter().map(|s| s.to_string()).collect(),
            vec![o.to_string()],
        )
    };
    g.nodes.push(node(
        "MatMul",
        "/m/query/MatMul",
        &["x", "m.query.weight"],
        "q",
    ));
    g.nodes.push(
        node("Gemm", "/m/value/Gemm", &["x", "m.value.weight"], "v")
            .with_attr("transB", AttrValue::Int(1)),
    );
    g.nodes.push(node("Tanh", "act", &["q"], "tq"));
    g.nodes.push(node("Mul", "gate", &["tq", "v"], "hid"));
    g.nodes.push(node(
        "MatMul",
        "/m/out/MatMul",
        &["hid", "m.out.weight"],
        "logits",
    ));
    g.nodes.push(node("Sub", "err", &["logits", "c"], "d"));
    g.nodes.push(node("Mul", "sq", &["d", "d"], "d2"));
    g.nodes
        .push(node("ReduceSum", "sum", &["d2"], "loss").with_attr("keepdims", AttrValue::Int(0)));
    model_of(g)
}

struct Setup {
    with_loss: Model,
    head: Head,
    groups: Groups,
    adapters: Vec<rewrite::AdapterRecord>,
    /// V and M.
    params: Vals,
    train: Vals,
    val: Vals,
}

fn setup(seed: u64) -> Setup {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m0 = model(&mut rng);
    let c = compile(&m0, &options(vec!["query,value".into()], Method::Dora));
    let with_loss = rewrite::lower(&c.adapted).unwrap();
    let head = Head {
        task: Task::Regression,
        logits: "logits".into(),
        loss: "loss".into(),
        labels: vec!["c".into()],
    };
    let groups = Groups::new(&c.adapters, &[]).unwrap();
    let mut rnd = |shape: &[usize], lo: f64, hi: f64| {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n).map(|_| rng.random_range(lo..hi)).collect(),
        )
        .unwrap()
    };
    let mut params = Vals::new();
    for (n, t) in &c.init {
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let init = ArrayD::from_shape_vec(IxDyn(&shape), t.to_f64_vec().unwrap()).unwrap();
        params.insert(n.clone(), init + rnd(&shape, -0.3, 0.3));
    }
    let mut batch = |b: usize| {
        Vals::from([
            ("x".to_string(), rnd(&[b, 6], -1.0, 1.0)),
            ("c".to_string(), rnd(&[b, 2], -1.0, 1.0)),
        ])
    };
    let train = batch(3);
    let val = batch(5);
    Setup {
        with_loss,
        head,
        groups,
        adapters: c.adapters,
        params,
        train,
        val,
    }
}

fn scalar(v: f64) -> ArrayD<f64> {
    ArrayD::from_elem(IxDyn(&[]), v)
}

/// Runs `model` on named f64 inputs (unused names are dropped) and returns its outputs by name.
fn run(model: &Model, inputs: &Vals) -> Vals {
    let dir = tempfile::tempdir().unwrap();
    let p = save(&rewrite::strip_markers(model), dir.path(), "p.onnx");
    let feed: Vec<(String, HostTensor)> = model
        .graph
        .inputs
        .iter()
        .map(|i| {
            let v = inputs
                .get(&i.name)
                .unwrap_or_else(|| panic!("no value for input '{}'", i.name));
            (i.name.clone(), HostTensor::F64(v.clone()))
        })
        .collect();
    let outs = run_once(&p, &feed).unwrap();
    model
        .graph
        .outputs
        .iter()
        .zip(outs)
        .map(|(o, t)| match t {
            HostTensor::F64(a) => (o.name.clone(), a),
            other => panic!("{} is not f64: {other:?}", o.name),
        })
        .collect()
}

fn with(base: &Vals, extra: &[(&str, ArrayD<f64>)]) -> Vals {
    let mut v = base.clone();
    for (k, a) in extra {
        v.insert(k.to_string(), a.clone());
    }
    v
}

fn prefixed(batch: &Vals, prefix: &str) -> Vals {
    batch
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect()
}

/// The lower program's outputs at (V, M) on the training batch.
fn lower_outputs(s: &Setup, lower: &Lower, params: &Vals) -> Vals {
    let mut inputs = params.clone();
    inputs.extend(s.train.clone());
    inputs.insert(bilevel::GAMMA.into(), scalar(GAMMA));
    run(&lower.model, &inputs)
}

/// `F(M) = L_val(V − ξ·∇_V L_lower(V, M), M)`, unrolled by running programs.
fn unrolled(s: &Setup, lower: &Lower, params: &Vals) -> f64 {
    let outs = lower_outputs(s, lower, params);
    let mut at = params.clone();
    for (w, gname) in &lower.grads {
        if s.groups.lower.contains(w) {
            let v = &params[w] - &(&outs[gname] * XI);
            at.insert(w.clone(), v);
        }
    }
    at.extend(s.val.clone());
    run(&s.with_loss, &at)["loss"].sum()
}

/// A random unit direction over every magnitude.
fn direction(s: &Setup, seed: u64) -> Vals {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u: Vals = s
        .groups
        .upper
        .iter()
        .map(|m| {
            let shape = s.params[m].shape().to_vec();
            let n: usize = shape.iter().product();
            let a = ArrayD::from_shape_vec(
                IxDyn(&shape),
                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
            )
            .unwrap();
            (m.clone(), a)
        })
        .collect();
    let norm: f64 = u
        .values()
        .map(|a| a.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    for a in u.values_mut() {
        *a /= norm;
    }
    u
}

/// `d/dt F(M + t·u)` by central differences with step `h`.
fn brute_force(s: &Setup, lower: &Lower, u: &Vals, h: f64) -> f64 {
    let at = |t: f64| {
        let mut p = s.params.clone();
        for (m, d) in u {
            p.insert(m.clone(), &s.params[m] + &(d * t));
        }
        unrolled(s, lower, &p)
    };
    (at(h) - at(-h)) / (2.0 * h)
}

/// Runs the upper program of `mode`; returns (hypergradient by magnitude, val loss).
fn upper(s: &Setup, lower: &Lower, mode: Hypergrad) -> (Vals, f64) {
    let up = bilevel::upper_program(&s.with_loss, &s.head, &s.groups, &lower.grads, mode).unwrap();
    let lo = lower_outputs(s, lower, &s.params);
    let mut inputs = s.params.clone();
    inputs.extend(prefixed(&s.train, bilevel::TRAIN_PREFIX));
    inputs.extend(prefixed(&s.val, bilevel::VAL_PREFIX));
    for (_, gname) in up.g_inputs.iter().chain(&up.gm_inputs) {
        inputs.insert(gname.clone(), lo[gname].clone());
    }
    inputs.insert(bilevel::XI.into(), scalar(XI));
    inputs.insert(bilevel::ALPHA_FD.into(), scalar(ALPHA_FD));
    let outs = run(&up.model, &inputs);
    let hg = up
        .hypergrads
        .iter()
        .map(|(m, o)| (m.clone(), outs[o].clone()))
        .collect();
    (hg, outs[bilevel::VAL_LOSS].sum())
}

fn dot(a: &Vals, b: &Vals) -> f64 {
    a.iter().map(|(k, x)| (x * &b[k]).sum()).sum()
}

fn lower_of(s: &Setup) -> Lower {
    bilevel::lower_program(
        &s.with_loss,
        &s.head,
        &s.adapters,
        &s.groups,
        RegVariant::Paper,
    )
    .unwrap()
}

/// Gradient programs of the plain loss: (∇ w.r.t. `wrt`) at `inputs`.
fn grads(s: &Setup, wrt: &[String], inputs: &Vals) -> Vals {
    let g = autodiff::backward(&s.with_loss, "loss", wrt).unwrap();
    let outs = run(&g.model, inputs);
    g.grads
        .iter()
        .map(|(w, o)| (w.clone(), outs[o].clone()))
        .collect()
}

#[test]
fn hypergradients_match_the_unrolled_objective() {
    for seed in [1u64, 2] {
        let s = setup(seed);
        let lower = lower_of(&s);
        let (fo, _) = upper(&s, &lower, Hypergrad::FirstOrder);
        for k in 0..2 {
            let u = direction(&s, 100 * seed + k);
            let brute = brute_force(&s, &lower, &u, 1e-4);
            let first_order = dot(&fo, &u);
            // The mixed term must matter here, or the comparisons below prove nothing.
            let mixed_share = (first_order - brute).abs() / brute.abs();
            assert!(mixed_share > 1e-2, "mixed term too small: {mixed_share:e}");
            for (mode, tol) in [
                (Hypergrad::Exact, 1e-6),
                (Hypergrad::Fd, 1e-4),
                (Hypergrad::FdForward, 2e-2),
            ] {
                let (hg, val_loss) = upper(&s, &lower, mode);
                let got = dot(&hg, &u);
                let rel = (got - brute).abs() / brute.abs();
                println!(
                    "seed {seed} dir {k} {:<11} ⟨∇M, u⟩ {got:+.10e} brute {brute:+.10e} rel {rel:.2e} (mixed share {mixed_share:.2e})",
                    mode.name()
                );
                assert!(rel <= tol, "{}: rel {rel:e} > {tol:e}", mode.name());
                assert!(val_loss.is_finite() && val_loss > 0.0);
            }
        }
    }
}

#[test]
fn first_order_is_the_plain_validation_gradient() {
    let s = setup(3);
    let lower = lower_of(&s);
    let (fo, val_loss) = upper(&s, &lower, Hypergrad::FirstOrder);
    let inputs = with(
        &s.params,
        &[("x", s.val["x"].clone()), ("c", s.val["c"].clone())],
    );
    let reference = grads(&s, &s.groups.upper, &inputs);
    for (m, r) in &reference {
        let d = (&fo[m] - r).mapv(f64::abs).fold(0.0, |a: f64, &b| a.max(b));
        assert!(d <= 1e-12, "{m}: {d:e}");
    }
    let l = run(&s.with_loss, &inputs)["loss"].sum();
    assert!((l - val_loss).abs() <= 1e-12 * l.abs());
}

#[test]
fn betty_matches_its_definition() {
    let s = setup(4);
    let lower = lower_of(&s);
    let (hg, _) = upper(&s, &lower, Hypergrad::Betty);
    // h and v at V (no virtual step), on the validation batch.
    let all: Vec<String> = s
        .groups
        .lower
        .iter()
        .chain(&s.groups.upper)
        .cloned()
        .collect();
    let at_val = with(
        &s.params,
        &[("x", s.val["x"].clone()), ("c", s.val["c"].clone())],
    );
    let hv = grads(&s, &all, &at_val);
    let norm = s
        .groups
        .lower
        .iter()
        .map(|p| hv[p].iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let eps = ALPHA_FD / norm;
    let at = |sign: f64| {
        let mut p = s.params.clone();
        for w in &s.groups.lower {
            p.insert(w.clone(), &s.params[w] + &(&hv[w] * (sign * eps)));
        }
        p.extend(s.train.clone());
        grads(&s, &s.groups.upper, &p)
    };
    let (gp, gm) = (at(1.0), at(-1.0));
    for m in &s.groups.upper {
        let expect = &hv[m] - &((&gp[m] - &gm[m]) * (XI / (2.0 * eps)));
        let d = (&hg[m] - &expect)
            .mapv(f64::abs)
            .fold(0.0, |a: f64, &b| a.max(b));
        let scale = expect.mapv(f64::abs).fold(0.0, |a: f64, &b| a.max(b));
        assert!(d <= 1e-9 * scale, "{m}: {d:e} (scale {scale:e})");
    }
}

#[test]
fn lower_program_outputs_the_regularised_loss_and_both_groups() {
    let s = setup(5);
    let lower = lower_of(&s);
    let outs = lower_outputs(&s, &lower, &s.params);
    let total = outs[&lower.loss].sum();
    let data = outs[&lower.data_loss].sum();
    let r = outs[&lower.reg].sum();
    assert!((total - (data + GAMMA * r)).abs() <= 1e-12 * total.abs());
    // ∇_M of the lower program equals ∇_M L_tr: R does not depend on M.
    let at_train = with(
        &s.params,
        &[("x", s.train["x"].clone()), ("c", s.train["c"].clone())],
    );
    let reference = grads(&s, &s.groups.upper, &at_train);
    for (w, g) in &lower.grads {
        if let Some(r) = reference.get(w) {
            let d = (&outs[g] - r)
                .mapv(f64::abs)
                .fold(0.0, |a: f64, &b| a.max(b));
            assert!(d <= 1e-12, "{w}: {d:e}");
        }
    }
    assert_eq!(
        lower.grads.len(),
        s.groups.lower.len() + s.groups.upper.len()
    );
    // With γ = 0 every gradient is the plain loss's.
    let mut inputs = at_train.clone();
    inputs.insert(bilevel::GAMMA.into(), scalar(0.0));
    let outs = run(&lower.model, &inputs);
    let all: Vec<String> = s
        .groups
        .lower
        .iter()
        .chain(&s.groups.upper)
        .cloned()
        .collect();
    let reference = grads(&s, &all, &at_train);
    for (w, g) in &lower.grads {
        let d = (&outs[g] - &reference[w])
            .mapv(f64::abs)
            .fold(0.0, |a: f64, &b| a.max(b));
        assert!(d <= 1e-12, "{w}: {d:e}");
    }
}
