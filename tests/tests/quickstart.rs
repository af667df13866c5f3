//! The quickstart's shipped pretrained model (models/minilm-sst2): the exporter's reference
//! logits, DoRA/LoRA at initialisation reproducing them, and a short BiDoRA run on the
//! shipped SST-2 subset through the real tokenizer that must beat chance clearly.

use std::path::Path;

use bidora_compiler::bilevel::Hypergrad;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method as AdapterMethod;

use bidora_runtime::backend::{self, HostTensor};
use bidora_runtime::tract_exec::TractProgram;
use bidora_runtime::train::{dataset, TrainConfig, Trainer};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn model_path() -> std::path::PathBuf {
    repo_root().join("models/minilm-sst2/model.onnx")
}

/// The recipe's fixed input and torch's logits for it.
fn reference() -> (Vec<(String, HostTensor)>, Vec<f32>) {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("models/minilm-sst2/model.ref.json")).unwrap(),
    )
    .unwrap();
    let mat = |k: &str| {
        let rows = r["inputs"][k].as_array().unwrap();
        let v: Vec<i64> = rows
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
            .collect();
        HostTensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[rows.len(), v.len() / rows.len()]), v).unwrap(),
        )
    };
    let logits = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (
        vec![
            ("input_ids".into(), mat("input_ids")),
            ("attention_mask".into(), mat("attention_mask")),
        ],
        logits,
    )
}

fn run(path: &Path, inputs: &[(String, HostTensor)]) -> Vec<f32> {
    let p = TractProgram::load(path, inputs).unwrap();
    match &p.run(inputs).unwrap()[0] {
        HostTensor::F32(a) => a.iter().copied().collect(),
        other => panic!("logits are {}", other.dtype()),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn shipped_model_matches_torch_and_adapters_at_init_reproduce_it() {
    let (inputs, want) = reference();
    let got = run(&model_path(), &inputs);
    let d = max_diff(&got, &want);
    assert!(d <= 1e-4, "tract vs torch: {d}");
    let model = load_model(&model_path()).unwrap();
    for method in [AdapterMethod::Dora, AdapterMethod::Lora] {
        let c = pipeline::compile(&model, &options(qv_targets("bert"), method)).unwrap();
        assert_eq!(c.adapters.len(), 6, "3 layers × query, value");
        let dir = tempfile::tempdir().unwrap();
        let fwd = save(&c.forward, dir.path(), "forward.onnx");
        let mut with = inputs.clone();
        with.extend(init_inputs(&c));
        let d = max_diff(&run(&fwd, &with), &got);
        assert!(d <= 1e-5, "{method:?} at initialisation differs by {d}");
    }
}

#[test]
fn short_bidora_run_on_the_sst2_subset_beats_chance() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&model_path()).unwrap();
    let mut opts = seq_cls_options(qv_targets("bert"), AdapterMethod::Dora, Some(Hypergrad::Fd));
    opts.adapter.rank = 8;
    opts.adapter.alpha = 16.0;
    let art = write_artifact(&model, &opts, "model.onnx", &dir.path().join("artifact"));

    // The quickstart's own config, shortened: 40 iterations on 640 sentences, no retrain,
    // scored on the first 256 sentences of SST-2 dev.
    let config = repo_root().join("examples/sst2/train.toml");
    let sets: Vec<String> = [
        "steps=40",
        "retrain_steps=0",
        "eval_every=0",
        "checkpoint_every=0",
        "lower.lr=2e-3",
        "upper.lr=2e-3",
        "data.limit=640",
        "data.test_limit=256",
        "data.max_len=32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = TrainConfig::parse(
        &std::fs::read_to_string(&config).unwrap(),
        "train.toml",
        &sets,
    )
    .unwrap();
    let eval_inputs: Vec<String> = art.manifest.programs
        [&bidora_compiler::artifact::ProgramKey::Eval]
        .inputs
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let data = dataset::load(
        &cfg.data,
        config.parent().unwrap(),
        &eval_inputs,
        "seq-cls",
        cfg.val_ratio,
        cfg.seed,
    )
    .unwrap();
    let be = backend::tract::TractBackend::new(&Default::default(), None).unwrap();
    let mut t = Trainer::new(cfg, &art, &be, data, &dir.path().join("run"), false).unwrap();
    t.progress = false;
    let s = t.run_to_end(None).unwrap().unwrap();
    let test = s.final_test.expect("a test split");
    let acc = test
        .metrics
        .iter()
        .find(|(k, _)| k == "accuracy")
        .unwrap()
        .1;
    eprintln!(
        "after 40 BiDoRA iterations: test accuracy {acc:.4}, loss {:.4}",
        test.loss
    );
    // The first 256 dev sentences are 51% positive; 40 iterations reach about 0.75.
    assert!(acc >= 0.65, "test accuracy {acc}");
}
