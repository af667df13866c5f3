//! Generation in the trainer's evaluation (causal-lm head with `--lm-labels` on E2E data):
//! the GPT-2 fixture (random weights, 1000-token vocabulary, hashed words) is trained on
//! the first 30 references of the E2E dev set (5 meaning representations) and scored on the
//! same file as its test set, so what it learnt shows up in the E2E metrics.
//!
//! Checked: generation scores appear in the eval records and the summary; the texts written
//! to `generations/` are what an independent greedy decoding of `forward.onnx` with the
//! saved tensors gives, and re-scoring them reproduces the logged metrics; training raises
//! BLEU far above the untrained model's; a generation metric as `metric` is refused where
//! nothing can generate.

use std::path::{Path, PathBuf};

use bidora_compiler::heads::Task;
use bidora_compiler::load_model;
use bidora_compiler::rewrite::Method as AdapterMethod;
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::{self, HostTensor};
use bidora_runtime::generate::{greedy, GenerateOptions, ProgramLm};
use bidora_runtime::metrics::e2e_scores;
use bidora_runtime::train::dataset::{self, ModelSpec};
use bidora_runtime::train::{checkpoint, Examples, TrainConfig, Trainer};
use bidora_tests::*;
use serde_json::Value;

fn data_dir() -> PathBuf {
    repo_root().join("runtime/tests/data")
}

fn artifact(dir: &Path) -> Artifact {
    let model = load_model(&repo_root().join("models/gpt2_legacy17.onnx")).unwrap();
    let mut opts = options(qv_targets("gpt2"), AdapterMethod::Lora);
    opts.task = Some(Task::CausalLm);
    opts.lm_labels = true;
    write_artifact(&model, &opts, "gpt2_legacy17.onnx", &dir.join("artifact"))
}

fn config(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=lora",
        "batch_size=8",
        "eval_batch_size=8",
        "lower.lr=2e-2",
        "lower.warmup_ratio=0",
        "data.format=e2e",
        "data.train=e2e-devset-head31.csv",
        "data.test=e2e-devset-head31.csv",
        "data.tokenizer=hash:1000",
        "data.max_len=64",
        "data.pad_to_multiple_of=8",
        "generation.max_new_tokens=32",
    ]
    .map(String::from)
    .to_vec();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::parse("", "test", &sets).unwrap()
}

/// Trains with `cfg` into `run`; returns the eval records of the test split.
fn train(cfg: TrainConfig, art: &Artifact, run: &Path) -> Vec<Value> {
    let spec = ModelSpec::of(art).unwrap();
    let data = dataset::load_for(&cfg.data, &data_dir(), &spec, cfg.val_ratio, cfg.seed).unwrap();
    let mut t = Trainer::new(cfg, art, &*tract1(), data, run, false).unwrap();
    t.progress = false;
    t.run_to_end(None).unwrap().unwrap();
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval" && v["split"] == "test")
        .collect()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_on_e2e_is_scored_by_generation_and_the_texts_are_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path());

    // Untrained: LoRA's B = 0, so this is the random fixture itself.
    let before = train(config(&["steps=0"]), &art, &dir.path().join("init"));
    let bleu0 = before.last().unwrap()["bleu"].as_f64().unwrap();

    let run = dir.path().join("run");
    let cfg = config(&["steps=150", "eval_every=75", "generation.every_eval=true"]);
    let evals = train(cfg.clone(), &art, &run);
    assert_eq!(evals.len(), 2, "step 75 and the phase end: {evals:?}");
    let last = evals.last().unwrap();
    for k in [
        "perplexity",
        "bleu",
        "nist",
        "rouge_l",
        "cider",
        "generation_secs",
    ] {
        assert!(last[k].as_f64().is_some(), "{k} missing from {last}");
    }
    let (bleu, rouge) = (
        last["bleu"].as_f64().unwrap(),
        last["rouge_l"].as_f64().unwrap(),
    );
    eprintln!("test BLEU {bleu0:.4} untrained → {bleu:.4} trained; ROUGE-L {rouge:.4}");
    assert!(bleu > 0.2 && bleu > bleu0 + 0.2, "BLEU {bleu0} → {bleu}");

    // The written texts are the model's: greedy decoding of forward.onnx with the final
    // tensors, run here without the trainer.
    let file = run.join(format!(
        "generations/test-step{:06}.jsonl",
        last["global_step"].as_u64().unwrap()
    ));
    let texts = read_jsonl(&file);
    assert_eq!(texts.len(), 5, "one text per meaning representation");
    let spec = ModelSpec::of(&art).unwrap();
    let loaded = dataset::read(&cfg.data, &data_dir(), &spec).unwrap();
    let test = loaded.test.unwrap();
    let refs = test.references().unwrap();
    let codec = test.text_codec().unwrap();
    let prompts: Vec<Vec<i64>> = (0..refs.groups.len())
        .map(|g| {
            let first = refs.example_group.iter().position(|&e| e == g).unwrap();
            test.prompt(first).unwrap()
        })
        .collect();
    let params = checkpoint::read_safetensors(&run.join("final.safetensors")).unwrap();
    let fixed: Vec<(String, HostTensor)> = params
        .into_iter()
        .map(|(n, a)| (n, HostTensor::F32(a)))
        .collect();
    let sig = &art.manifest.programs[&bidora_compiler::artifact::ProgramKey::Forward];
    let mut program = backend::Backend::load(&*tract1(), &art.dir.join(&sig.file)).unwrap();
    let mut lm = ProgramLm::new(&mut *program, fixed, "logits", codec.pad).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 32,
        eos: Some(codec.eos),
        beam_width: 1,
        length_penalty: 1.0,
        no_repeat_ngram: 0,
    };
    let generated = greedy(&mut lm, &prompts, &opts).unwrap();
    for ((g, tokens), written) in generated.iter().enumerate().zip(&texts) {
        let tokens = tokens.strip_suffix(&[codec.eos]).unwrap_or(tokens);
        assert_eq!(written["mr"], refs.groups[g].0);
        assert_eq!(written["generated"], codec.decoder.decode(tokens).unwrap());
        assert_eq!(written["references"].as_array().unwrap().len(), 6);
    }

    // Re-scoring the written texts gives the logged metrics.
    let hyps: Vec<&str> = texts
        .iter()
        .map(|t| t["generated"].as_str().unwrap())
        .collect();
    let rs: Vec<Vec<&str>> = texts
        .iter()
        .map(|t| {
            t["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect()
        })
        .collect();
    let s = e2e_scores(&hyps, &rs).unwrap();
    assert_eq!(last["bleu"].as_f64().unwrap(), s.bleu);
    assert_eq!(last["cider"].as_f64().unwrap(), s.cider);

    // The summary's final scores are the phase end's (not recomputed).
    let summary: Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let final_test = &summary["final_test"]["metrics"];
    assert!(
        final_test.to_string().contains("bleu"),
        "summary without generation scores: {final_test}"
    );
}

#[test]
fn a_generation_metric_is_refused_where_nothing_generates() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path());
    let spec = ModelSpec::of(&art).unwrap();
    let cfg = config(&["steps=1", "metric=bleu", "generation.max_new_tokens=0"]);
    let data = dataset::load_for(&cfg.data, &data_dir(), &spec, cfg.val_ratio, cfg.seed).unwrap();
    let err = match Trainer::new(cfg, &art, &*tract1(), data, &dir.path().join("r"), false) {
        Ok(_) => panic!("metric = bleu without generation was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("bleu") && err.contains("max_new_tokens"),
        "{err}"
    );
    // And a generation metric is not a seq-cls metric.
    let e = TrainConfig::parse("metric = 'bleu'\n[data]\ntrain = 'x'\n", "t.toml", &[]).unwrap();
    assert!(bidora_runtime::train::eval::check_metric("seq-cls", e.metric.as_deref()).is_err());
}

#[test]
fn the_e2e_example_config_runs() {
    // examples/e2e as its README compiles and trains it, cut to a few steps and prompts
    // (and decoding by beam search).
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&repo_root().join("models/gpt2_legacy17.onnx")).unwrap();
    let mut opts = options(
        ["c_attn", "c_proj", "c_fc"].map(String::from).to_vec(),
        AdapterMethod::Dora,
    );
    opts.adapter.rank = 16;
    opts.task = Some(Task::CausalLm);
    opts.lm_labels = true;
    opts.bilevel = Some(bidora_compiler::pipeline::BilevelOptions {
        hypergrad: bidora_compiler::bilevel::Hypergrad::Fd,
        regularizer: bidora_compiler::regularizer::RegVariant::Paper,
    });
    let art = write_artifact(&model, &opts, "gpt2_legacy17.onnx", &dir.path().join("a"));
    let example = repo_root().join("examples/e2e");
    let toml = std::fs::read_to_string(example.join("train.toml")).unwrap();
    let cfg = TrainConfig::parse(
        &toml,
        "examples/e2e/train.toml",
        &[
            "steps=2",
            "retrain_steps=1",
            "eval_every=0",
            "generation.max_prompts=2",
            "generation.max_new_tokens=4",
            "generation.beam_width=2",
        ]
        .map(String::from),
    )
    .unwrap();
    let spec = ModelSpec::of(&art).unwrap();
    let data = dataset::load_for(&cfg.data, &example, &spec, cfg.val_ratio, cfg.seed).unwrap();
    let mut t = Trainer::new(cfg, &art, &*tract1(), data, &dir.path().join("run"), false).unwrap();
    t.progress = false;
    let s = t.run_to_end(None).unwrap().unwrap();
    let test = s.final_test.unwrap();
    assert!(test.get("bleu").is_some() && test.get("cider").is_some());
}
