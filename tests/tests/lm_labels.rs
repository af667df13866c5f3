//! `--lm-labels`: the causal-lm head scores position t against `labels[t+1]` unless it is
//! -100 (a data-to-text prompt, padding). Checked against cross-entropy computed here from
//! the program's own logits, and against the default head when no label is ignored.

use bidora_compiler::heads::Task;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

const B: usize = 2;
const S: usize = 8;

fn ids() -> Vec<i64> {
    (0..(B * S) as i64).map(|k| 5 + (k * 37) % 900).collect()
}

fn i64s(v: Vec<i64>) -> HostTensor {
    HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[B, S]), v).unwrap())
}

/// (logits, loss) of the eval program compiled with or without `--lm-labels`.
fn eval(lm_labels: bool, labels: Option<Vec<i64>>) -> (ArrayD<f32>, f32) {
    let model = load_model(&repo_root().join("models/gpt2_legacy17.onnx")).unwrap();
    let mut opts = options(qv_targets("gpt2"), Method::Lora);
    opts.task = Some(Task::CausalLm);
    opts.lm_labels = lm_labels;
    let c = pipeline::compile(&model, &opts).unwrap();
    let t = c.training.as_ref().unwrap();
    assert_eq!(
        t.head.labels,
        if lm_labels {
            vec!["labels".to_string()]
        } else {
            vec![]
        }
    );
    let dir = tempfile::tempdir().unwrap();
    let path = save(&t.eval, dir.path(), "eval.onnx");
    let mut inputs = vec![
        ("input_ids".to_string(), i64s(ids())),
        ("attention_mask".to_string(), i64s(vec![1; B * S])),
    ];
    if let Some(l) = labels {
        inputs.push(("labels".to_string(), i64s(l)));
    }
    inputs.extend(init_inputs(&c));
    let p = TractProgram::load(&path, &inputs).unwrap();
    let out = p.run(&inputs).unwrap();
    let f = |t: &HostTensor| t.as_f32().unwrap().clone();
    (f(&out[0]), f(&out[1]).iter().sum())
}

#[test]
fn ignored_labels_are_not_scored() {
    let mut labels = ids();
    // Row 0: a 3-token prompt; row 1: the last 2 positions are padding.
    labels[..3].fill(-100);
    labels[2 * S - 2..].fill(-100);
    let (logits, loss) = eval(true, Some(labels.clone()));
    let (mut sum, mut n) = (0f64, 0usize);
    for b in 0..B {
        for t in 0..S - 1 {
            let y = labels[b * S + t + 1];
            if y == -100 {
                continue;
            }
            let row: Vec<f64> = (0..1000).map(|v| logits[[b, t, v]] as f64).collect();
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            sum += lse - row[y as usize];
            n += 1;
        }
    }
    assert_eq!(n, 5 + 5, "row 0 scores targets 3..=7, row 1 targets 1..=5");
    let want = sum / n as f64;
    let rel = ((loss as f64 - want) / want).abs();
    assert!(rel <= 1e-5, "loss {loss} vs {want} (rel {rel})");
}

#[test]
fn with_nothing_ignored_it_equals_the_default_head() {
    let (_, with) = eval(true, Some(ids()));
    let (_, default) = eval(false, None);
    assert!(
        (with - default).abs() <= 1e-6 * default.abs(),
        "{with} vs {default}"
    );
}

#[test]
fn lm_labels_needs_causal_lm() {
    let model = load_model(&repo_root().join("models/bert_legacy17.onnx")).unwrap();
    let mut opts = options(qv_targets("bert"), Method::Lora);
    opts.task = Some(Task::SeqCls);
    opts.lm_labels = true;
    let Err(e) = pipeline::compile(&model, &opts) else {
        panic!("--lm-labels with seq-cls compiled")
    };
    let err = e.to_string();
    assert!(err.contains("--lm-labels"), "{err}");
}

#[test]
fn train_step_gradients_match_finite_differences_with_ignored_labels() {
    use bidora_tests::gradcheck::{check_emitted, CheckOpts, Direction};
    let model = load_model(&repo_root().join("models/gpt2_legacy17.onnx")).unwrap();
    for method in [Method::Lora, Method::Dora] {
        let mut opts = options(qv_targets("gpt2"), method);
        opts.task = Some(Task::CausalLm);
        opts.lm_labels = true;
        let c = pipeline::compile(&model, &opts).unwrap();
        let t = c.training.as_ref().unwrap();
        let mut labels = ids();
        labels[..3].fill(-100);
        let mut inputs = vec![
            ("input_ids".to_string(), i64s(ids())),
            ("attention_mask".to_string(), i64s(vec![1; B * S])),
            ("labels".to_string(), i64s(labels)),
        ];
        inputs.extend(perturbed_init(&c, 5));
        let check = CheckOpts {
            reference: Some(&t.eval),
            h: 2e-3,
            seed: 9,
            direction: Direction::Gradient,
            numeric_in_ort: false,
        };
        let r = check_emitted(&t.train_step, &t.head.loss, &t.grads, &inputs, &check).unwrap();
        eprintln!(
            "{method:?}: analytic {:.6e} numeric {:.6e} rel {:.2e}",
            r.analytic, r.numeric, r.rel_err
        );
        // The tolerance of the other heads' checks (tests/tests/train_programs.rs).
        assert!(
            r.rel_err <= 5e-3,
            "{method:?}: relative error {:.3e}",
            r.rel_err
        );
    }
}
