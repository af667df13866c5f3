//! Every task head × every emitted program × both backends, fed the way the trainer feeds
//! them: each batch padded to its own longest example, so every free dimension differs
//! between inputs (training batch 3 × 7, validation batch 2 × 5; the single-batch programs
//! run at both sizes in one loaded session, as the trainer runs them). Fixed-shape batches hid
//! a bug here once: the upper program named the dimensions of both batches alike and ONNX
//! Runtime's memory planner reused buffers of the wrong size.
//!
//! Per program: the compiler's own check ([`bidora_compiler::check`]) and onnx.checker's full
//! check pass; tract and ONNX Runtime agree; and each program matches an independent reading
//! of another one: forward's and train_step's logits and loss are eval's; lower's (γ = 0) data
//! loss and gradients are train_step's on the training batch; upper's validation loss is
//! eval's at the virtual step `V − ξ·g` on the validation batch, and with ξ = 0 its
//! hypergradient is train_step's magnitude gradient on the validation batch.

use std::collections::HashMap;
use std::path::PathBuf;

use bidora_compiler::bilevel::{self, Hypergrad};
use bidora_compiler::heads::Task;
use bidora_compiler::ir::{DataType, Dim, Graph, Model, Node, Tensor, ValueType};
use bidora_compiler::load_model;
use bidora_compiler::pipeline::{BilevelOptions, Compiled};
use bidora_compiler::regularizer::RegVariant;
use bidora_compiler::rewrite::Method;
use bidora_runtime::backend::{Backend, HostTensor};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

/// (batch, sequence) of the training and the validation batch.
const TRAIN: (usize, usize) = (3, 7);
const VAL: (usize, usize) = (2, 5);

struct Case {
    name: String,
    model: Model,
    task: Task,
    lm_labels: bool,
    targets: Vec<String>,
    train_head: bool,
    hypergrad: Hypergrad,
}

fn fixture(file: &str, task: Task, lm_labels: bool, train_head: bool, h: Hypergrad) -> Case {
    let path = repo_root().join("models").join(file);
    Case {
        name: format!("{file} {} {}", task.name(), h.name()),
        model: load_model(&path).unwrap(),
        task,
        lm_labels,
        targets: qv_targets(&family(&path)),
        train_head,
        hypergrad: h,
    }
}

/// A 2-layer regressor `y = tanh(x·Wq)·w` with `x: f32[batch, sequence, 4]` pooled by a mean
/// over the sequence (no fixture has a single output).
fn regression_case() -> Case {
    let mut g = Graph {
        name: "reg".into(),
        ..Default::default()
    };
    let (b, s) = (Dim::Sym("batch".into()), Dim::Sym("sequence".into()));
    g.inputs
        .push(f32_input("x", &[b.clone(), s, Dim::Known(4)]));
    g.outputs.push(f32_input("y", &[b, Dim::Known(1)]));
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
    g.initializers
        .insert("axes".into(), Tensor::from_i64("axes", vec![1], &[1]));
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
        "/enc/query/MatMul",
        &["x", "enc.query.weight"],
        "h",
    ));
    g.nodes.push(node("Tanh", "/enc/act", &["h"], "a"));
    g.nodes.push(
        node("ReduceMean", "/pool", &["a", "axes"], "p")
            .with_attr("keepdims", bidora_compiler::ir::AttrValue::Int(0)),
    );
    g.nodes
        .push(node("MatMul", "/head/MatMul", &["p", "head.weight"], "y"));
    Case {
        name: "regressor regression fd".into(),
        model: model_of(g),
        task: Task::Regression,
        lm_labels: false,
        targets: vec!["query".into()],
        train_head: false,
        hypergrad: Hypergrad::Fd,
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![];
    // Every hypergradient mode once (each reads a different set of inputs).
    for h in Hypergrad::ALL {
        v.push(fixture("bert_dynamo18.onnx", Task::SeqCls, false, true, h));
    }
    v.push(fixture(
        "roberta_legacy17.onnx",
        Task::MultiLabel,
        false,
        false,
        Hypergrad::Fd,
    ));
    v.push(fixture(
        "esm_legacy17.onnx",
        Task::SeqCls,
        false,
        false,
        Hypergrad::FdForward,
    ));
    v.push(fixture(
        "gpt2_dynamo18.onnx",
        Task::TokenCls,
        false,
        false,
        Hypergrad::Fd,
    ));
    v.push(fixture(
        "gpt2_legacy17.onnx",
        Task::CausalLm,
        false,
        false,
        Hypergrad::Fd,
    ));
    v.push(fixture(
        "gpt2_dynamo18.onnx",
        Task::CausalLm,
        true,
        false,
        Hypergrad::Exact,
    ));
    v.push(regression_case());
    v
}

fn compile_case(c: &Case) -> Compiled {
    let mut opts = options(c.targets.clone(), Method::Dora);
    opts.task = Some(c.task);
    opts.lm_labels = c.lm_labels;
    opts.train_head = c.train_head;
    opts.bilevel = Some(BilevelOptions {
        hypergrad: c.hypergrad,
        regularizer: RegVariant::Paper,
    });
    compile(&c.model, &opts)
}

/// One batch of `(b, s)`, padded to its longest row as the trainer pads: row r keeps
/// `s - 2·(r mod 3)` tokens (row 0 all of them), the rest is padding (id 1, mask 0, label
/// -100 where the task ignores labels). Names are the model's input names.
fn batch(c: &Case, inputs: &[(String, ValueType)], (b, s): (usize, usize), seed: u64) -> Feed {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let len = |r: usize| s.saturating_sub(2 * (r % 3)).max(1);
    let mut out = vec![];
    for (name, ty) in inputs {
        let ValueType::Tensor {
            elem,
            shape: Some(dims),
            ..
        } = ty
        else {
            panic!("{name}: no shape")
        };
        let shape: Vec<usize> = dims
            .iter()
            .enumerate()
            .map(|(k, d)| match d {
                Dim::Known(v) => *v as usize,
                _ if k == 0 => b,
                _ => s,
            })
            .collect();
        let n: usize = shape.iter().product();
        // (row, position) of a flat index in [batch, sequence, ...].
        let at = |i: usize| {
            let per_row = n / shape[0];
            let row = i / per_row;
            let pos = if shape.len() > 1 {
                (i % per_row) / (per_row / shape[1])
            } else {
                0
            };
            (row, pos)
        };
        let t = match (elem, name.as_str()) {
            (DataType::Int64, "labels") => {
                HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                    let (r, p) = (ix[0], if shape.len() > 1 { ix[1] } else { 0 });
                    match c.task {
                        Task::SeqCls => ((r + seed as usize) % 2) as i64,
                        // An ignored prompt position, then ignored padding.
                        _ if p == 1 || p >= len(r) => -100,
                        _ => 5 + ((r * 7 + p * 3) % 13) as i64,
                    }
                }))
            }
            (DataType::Float, "labels") => {
                HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&shape), |ix| match c.task {
                    Task::MultiLabel => ((ix[0] + ix[1] + seed as usize) % 2) as f32,
                    _ => rng.random_range(-1.0..1.0),
                }))
            }
            (DataType::Int64, _) => {
                let v: Vec<i64> = (0..n)
                    .map(|i| {
                        let (r, p) = at(i);
                        if name.contains("mask") {
                            (p < len(r)) as i64
                        } else if name.contains("type") {
                            0
                        } else if p >= len(r) {
                            1
                        } else {
                            rng.random_range(5..20)
                        }
                    })
                    .collect();
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap())
            }
            (DataType::Float, _) => HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&shape), |_| {
                rng.random_range(-1.0..1.0)
            })),
            (e, _) => panic!("{name}: unexpected {e:?} input"),
        };
        out.push((name.clone(), t));
    }
    out
}

type Feed = Vec<(String, HostTensor)>;

/// The model's data and label inputs, as the single-batch programs declare them.
fn batch_inputs(prog: &Model, c: &Compiled) -> Vec<(String, ValueType)> {
    let scalars = [bilevel::GAMMA, bilevel::XI, bilevel::ALPHA_FD];
    prog.graph
        .inputs
        .iter()
        .filter(|i| !c.init.contains_key(&i.name) && !scalars.contains(&i.name.as_str()))
        .map(|i| (i.name.clone(), i.ty.clone().unwrap()))
        .collect()
}

fn scalar(v: f32) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
}

fn f32s(t: &HostTensor) -> &ArrayD<f32> {
    t.as_f32().expect("an f32 output")
}

/// Runs `prog` on every backend at each feed; returns, per feed, the outputs by name (from
/// the first backend), after asserting finite outputs and agreement between backends.
struct Runner {
    dir: tempfile::TempDir,
    backends: Vec<(&'static str, Box<dyn Backend>)>,
    checked: Vec<PathBuf>,
}

impl Runner {
    fn new() -> Runner {
        let mut backends: Vec<(&'static str, Box<dyn Backend>)> = vec![("tract", tract1())];
        if let Some(o) = ort1() {
            backends.push(("ort", o));
        }
        Runner {
            dir: tempfile::tempdir().unwrap(),
            backends,
            checked: vec![],
        }
    }

    fn run(
        &mut self,
        label: &str,
        prog: &Model,
        feeds: &[Feed],
    ) -> Vec<HashMap<String, HostTensor>> {
        let file = self
            .dir
            .path()
            .join(format!("{}.onnx", label.replace([' ', '/'], "_")));
        if !file.exists() {
            save(
                prog,
                file.parent().unwrap(),
                file.file_name().unwrap().to_str().unwrap(),
            );
            self.checked.push(file.clone());
        }
        let mut per_backend = vec![];
        for (bname, b) in &self.backends {
            let mut p = b
                .load(&file)
                .unwrap_or_else(|e| panic!("{label} on {bname}: load: {e}"));
            let names = p.output_names().to_vec();
            let mut results = vec![];
            for (k, feed) in feeds.iter().enumerate() {
                let outs = p
                    .run(feed)
                    .unwrap_or_else(|e| panic!("{label} on {bname}, feed {k}: {e}"));
                for (n, t) in names.iter().zip(&outs) {
                    if let Some(a) = t.as_f32() {
                        assert!(
                            a.iter().all(|x| x.is_finite()),
                            "{label} on {bname}, feed {k}: {n} is not finite"
                        );
                    }
                }
                results.push(names.iter().cloned().zip(outs).collect::<HashMap<_, _>>());
            }
            per_backend.push((*bname, results));
        }
        let (first, rest) = per_backend.split_first().unwrap();
        for (bname, results) in rest {
            for (k, (a, b)) in first.1.iter().zip(results).enumerate() {
                for (n, ta) in a {
                    let (Some(x), Some(y)) = (ta.as_f32(), b[n].as_f32()) else {
                        assert_eq!(ta, &b[n], "{label} feed {k} {n}");
                        continue;
                    };
                    assert_eq!(x.shape(), y.shape(), "{label} feed {k} {n}: shapes");
                    let d = rel_diff(x, y);
                    assert!(
                        d <= 2e-4,
                        "{label} feed {k} {n}: {} vs {bname} differ by {d:.2e}",
                        first.0
                    );
                }
            }
        }
        first.1.clone()
    }
}

/// Largest difference relative to the larger of the two arrays' magnitudes (floored at 1e-3).
fn rel_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let scale = a
        .iter()
        .chain(b.iter())
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1e-3);
    max_abs_diff(a, b) / scale
}

fn close(what: &str, a: &HostTensor, b: &HostTensor, tol: f32) {
    let (x, y) = (f32s(a), f32s(b));
    assert_eq!(x.shape(), y.shape(), "{what}: shapes");
    let d = rel_diff(x, y);
    assert!(d <= tol, "{what}: differ by {d:.2e} (tolerance {tol:e})");
}

fn with(mut feed: Feed, extra: &[(String, HostTensor)]) -> Feed {
    feed.extend(extra.iter().cloned());
    feed
}

fn prefixed(feed: &Feed, p: &str) -> Feed {
    feed.iter()
        .map(|(n, t)| (format!("{p}{n}"), t.clone()))
        .collect()
}

#[test]
fn every_program_runs_on_dynamically_padded_batches_on_every_backend() {
    let mut r = Runner::new();
    for case in cases() {
        let c = compile_case(&case);
        let t = c.training.as_ref().unwrap();
        let bl = c.bilevel.as_ref().unwrap();
        let params = perturbed_init(&c, 3);
        let names = batch_inputs(&t.eval, &c);
        let fwd_names = batch_inputs(&c.forward, &c);
        let tr = batch(&case, &names, TRAIN, 1);
        let va = batch(&case, &names, VAL, 2);
        let only = |f: &Feed, keep: &[(String, ValueType)]| -> Feed {
            f.iter()
                .filter(|(n, _)| keep.iter().any(|(k, _)| k == n))
                .cloned()
                .collect()
        };
        let both = [with(tr.clone(), &params), with(va.clone(), &params)];
        let label = |p: &str| format!("{} {p}", case.name);

        let eval = r.run(&label("eval"), &t.eval, &both);
        let step = r.run(&label("train_step"), &t.train_step, &both);
        let fwd_feeds: Vec<Feed> = both.iter().map(|f| only(f, &fwd_names)).collect();
        let fwd_feeds: Vec<Feed> = fwd_feeds.into_iter().map(|f| with(f, &params)).collect();
        let fwd = r.run(&label("forward"), &c.forward, &fwd_feeds);
        let logits = &t.head.logits;
        let fwd_logits = &c.forward.graph.outputs[0].name;
        for k in 0..2 {
            let what = |s: &str| format!("{} feed {k}: {s}", case.name);
            close(
                &what("forward vs eval logits"),
                &fwd[k][fwd_logits],
                &eval[k][logits],
                1e-5,
            );
            close(
                &what("train_step vs eval loss"),
                &step[k][&t.head.loss],
                &eval[k][&t.head.loss],
                1e-5,
            );
        }

        // lower at γ = 0: train_step's loss and gradients.
        let gamma0 = [(bilevel::GAMMA.to_string(), scalar(0.0))];
        let low_feeds: Vec<Feed> = both.iter().map(|f| with(f.clone(), &gamma0)).collect();
        let low = r.run(&label("lower"), &bl.lower.model, &low_feeds);
        let step_grads: HashMap<&str, &str> = t
            .grads
            .iter()
            .map(|(w, g)| (w.as_str(), g.as_str()))
            .collect();
        for k in 0..2 {
            let what = |s: &str| format!("{} lower feed {k}: {s}", case.name);
            close(
                &what("data loss"),
                &low[k][&bl.lower.data_loss],
                &eval[k][&t.head.loss],
                1e-5,
            );
            for (w, g) in &bl.lower.grads {
                close(&what(g), &low[k][g], &step[k][step_grads[w.as_str()]], 1e-4);
            }
        }

        // upper: train batch TRAIN, val batch VAL, random lower-step gradients g.
        let u = &bl.upper;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut g_feed: Feed = vec![];
        let mut vbar = params.clone();
        for (v, input) in &u.g_inputs {
            let p = params.iter().find(|(n, _)| n == v).unwrap();
            let g = f32s(&p.1).mapv(|_| rng.random_range(-1.0..1.0f32));
            g_feed.push((input.clone(), HostTensor::F32(g)));
        }
        for (m, input) in &u.gm_inputs {
            let p = params.iter().find(|(n, _)| n == m).unwrap();
            let g = f32s(&p.1).mapv(|_| rng.random_range(-0.1..0.1f32));
            g_feed.push((input.clone(), HostTensor::F32(g)));
        }
        let upper_feed = |xi: f32| -> Feed {
            let mut f = prefixed(&tr, bilevel::TRAIN_PREFIX);
            f.extend(prefixed(&va, bilevel::VAL_PREFIX));
            f.extend(params.iter().cloned());
            f.extend(g_feed.iter().cloned());
            if case.hypergrad != Hypergrad::FirstOrder {
                f.push((bilevel::XI.into(), scalar(xi)));
                f.push((bilevel::ALPHA_FD.into(), scalar(0.01)));
            }
            f
        };
        let xi = 0.05;
        let up = r.run(
            &label("upper"),
            &u.model,
            &[upper_feed(0.0), upper_feed(xi)],
        );
        // ξ = 0: V̄ = V, so the validation loss and h are eval's and train_step's on VAL.
        close(
            &format!("{} upper ξ=0: val loss", case.name),
            &up[0][bilevel::VAL_LOSS],
            &eval[1][&t.head.loss],
            1e-5,
        );
        for (m, h) in &u.hypergrads {
            close(
                &format!("{} upper ξ=0: {h}", case.name),
                &up[0][h],
                &step[1][step_grads[m.as_str()]],
                1e-4,
            );
        }
        // ξ > 0: the validation loss is eval's at V̄ = V − ξ·g on VAL.
        if case.hypergrad.virtual_step() {
            for (v, input) in &u.g_inputs {
                let g = f32s(&g_feed.iter().find(|(n, _)| n == input).unwrap().1).clone();
                let slot = vbar.iter_mut().find(|(n, _)| n == v).unwrap();
                slot.1 = HostTensor::F32(f32s(&slot.1) - &(g * xi));
            }
            let at_vbar = r.run(&label("eval"), &t.eval, &[with(va.clone(), &vbar)]);
            close(
                &format!("{} upper ξ={xi}: val loss at V̄", case.name),
                &up[1][bilevel::VAL_LOSS],
                &at_vbar[0][&t.head.loss],
                1e-5,
            );
        }
        eprintln!("{}: every program agrees", case.name);
    }
    onnx_checker(&r.checked);
}

/// onnx.checker's full check on every program written, in one python process.
fn onnx_checker(files: &[PathBuf]) {
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/onnx_check.py"))
        .args(files)
        .output()
        .expect("python3 runs");
    if out.status.code() == Some(3) {
        assert!(
            std::env::var("BIDORA_REQUIRE_ORT").as_deref() != Ok("1"),
            "BIDORA_REQUIRE_ORT=1 but the onnx package is not installed"
        );
        eprintln!("SKIPPED onnx.checker: pip install onnx");
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "onnx.checker:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        files.len()
    );
}

/// The compiler's program check, shown failing: the upper program with its validation
/// inputs renamed back to the training batch's dimension names is refused, naming both.
#[test]
fn the_program_check_refuses_shared_dimension_names_across_batches() {
    let case = fixture(
        "bert_dynamo18.onnx",
        Task::SeqCls,
        false,
        true,
        Hypergrad::Fd,
    );
    let c = compile_case(&case);
    let u = &c.bilevel.as_ref().unwrap().upper;
    let groups = [
        bidora_compiler::check::InputGroup::new(
            "training batch",
            u.batch_inputs.iter().map(|b| b.1.clone()),
        ),
        bidora_compiler::check::InputGroup::new(
            "validation batch",
            u.batch_inputs.iter().map(|b| b.2.clone()),
        ),
    ];
    bidora_compiler::check::program("upper.onnx", &u.model, &groups).unwrap();
    let mut bad = u.model.clone();
    for i in &mut bad.graph.inputs {
        if i.name.starts_with(bilevel::VAL_PREFIX) {
            let ty = i.ty.take().unwrap();
            i.ty = Some(ty.with_dims_renamed(|d| {
                d.replacen(bilevel::VAL_DIM_PREFIX, bilevel::TRAIN_DIM_PREFIX, 1)
            }));
        }
    }
    let e = bidora_compiler::check::program("upper.onnx", &bad, &groups)
        .unwrap_err()
        .to_string();
    assert!(e.contains("upper.onnx"), "{e}");
    assert!(e.contains("share the dimension name 'train_batch'"), "{e}");
}

/// A seq-cls head over one logit (an export with num_labels=1) would have a cross-entropy of
/// exactly 0: refused at compile time, pointing to regression.
#[test]
fn seq_cls_over_one_class_is_refused() {
    let case = regression_case();
    let mut opts = options(case.targets.clone(), Method::Dora);
    opts.task = Some(Task::SeqCls);
    let e = match bidora_compiler::pipeline::compile(&case.model, &opts) {
        Ok(_) => panic!("a one-class seq-cls head compiled"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("at least 2 classes"), "{e}");
    assert!(e.contains("--task regression"), "{e}");
}
