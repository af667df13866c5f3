//! Seconds per training step of the real trainer loop, LoRA vs DoRA vs one BiDoRA iteration,
//! on the shipped pretrained MiniLM (models/minilm-sst2: all-MiniLM-L6-v2's first 3 layers,
//! hidden 384, 12 heads) at batch 32 × sequence 128, for tract and ONNX Runtime (CPU) at 1
//! and 2 threads. Every figure is the median of the `secs` the trainer logs per step
//! (programs, AdamW, batch assembly), after one warm-up step that builds the plans.
//!
//! Targets (issue "Runtime and bidora CLI"): DoRA ≤ 1.10× LoRA; one BiDoRA iteration
//! (unroll 1) ≤ 4.0× LoRA with `fd` and ≤ 3.0× with `fd-forward`.
//!
//! The main tables feed **fixed-length** synthetic batches (every batch 32 × 128, no padding),
//! so that timings compare like with like; the last table feeds **real SST-2 batches**
//! through the data layer (the quickstart's tokenizer and config, each batch padded to its
//! own longest sentence, rounded up to a multiple of 16), where training and validation
//! batches differ in length from step to step as in a user's run.
//!
//! `cargo bench -p bidora-tests --bench iteration` (results: BENCHMARKS.md). Set
//! `BIDORA_BENCH_STEPS` to change the number of timed steps (default 4), and
//! `BIDORA_BENCH_ONLY=real` to run the real-batch table alone. ONNX Runtime rows
//! need the `onnxruntime` Python package (or ORT_DYLIB_PATH) and are skipped without.

use std::collections::BTreeMap;
use std::path::Path;

use bidora_compiler::bilevel::Hypergrad;
use bidora_compiler::load_model;
use bidora_compiler::rewrite::Method as AdapterMethod;
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::{self, Backend, BackendKind, BackendOptions, HostTensor};
use bidora_runtime::data::DataError;
use bidora_runtime::train::{Examples, Method, RunData, TrainConfig, Trainer};
use bidora_tests::bench::median;
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

const BATCH: usize = 32;
const SEQ: usize = 128;

/// Fixed-length synthetic sentences over the model's vocabulary: every batch has the same
/// shape, as a padded production batch would.
struct Synthetic {
    n: usize,
    vocab: i64,
}

impl Examples for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, DataError> {
        let b = idx.len();
        let ids: Vec<i64> = idx
            .iter()
            .flat_map(|&i| {
                (0..SEQ).map(move |k| 1000 + ((i * 131 + k * 7919) as i64 % (self.vocab - 1000)))
            })
            .collect();
        let t = |s: &[usize], v: Vec<i64>| {
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(s), v).unwrap())
        };
        Ok(vec![
            ("input_ids".into(), t(&[b, SEQ], ids)),
            ("attention_mask".into(), t(&[b, SEQ], vec![1; b * SEQ])),
            (
                "labels".into(),
                t(&[b], idx.iter().map(|&i| (i % 2) as i64).collect()),
            ),
        ])
    }
}

fn artifact(dir: &Path, method: AdapterMethod, mode: Option<Hypergrad>) -> Artifact {
    let model = load_model(&repo_root().join("models/minilm-sst2/model.onnx")).unwrap();
    let opts = seq_cls_options(qv_targets("bert"), method, mode);
    write_artifact(&model, &opts, "model.onnx", dir)
}

/// The trainer settings of every timed run.
fn bench_sets(method: Method) -> Vec<String> {
    vec![
        format!("method={}", format!("{method:?}").to_lowercase()),
        format!("batch_size={BATCH}"),
        "steps=1000".into(),
        "retrain_steps=0".into(),
        "eval_every=0".into(),
        "checkpoint_every=0".into(),
    ]
}

/// Median seconds per part over the timed steps of one run on fixed-length synthetic batches.
fn measure(
    art: &Artifact,
    be: &dyn Backend,
    method: Method,
    steps: usize,
    resident: bool,
) -> BTreeMap<String, f64> {
    let mut sets = bench_sets(method);
    sets.push("data.train=synthetic".into());
    let cfg = TrainConfig::parse("", "bench", &sets).unwrap();
    let n = 10 * BATCH;
    let (train_idx, val_idx) = bidora_runtime::train::split(n, cfg.val_ratio, cfg.seed);
    let data = RunData {
        data: Box::new(Synthetic { n, vocab: 8000 }),
        train_idx,
        val_idx,
        test: None,
    };
    timed(art, be, cfg, data, steps, resident)
}

/// The quickstart's config with `sets` (first 2,000 sentences) and its data for `art`,
/// through the data layer: each batch padded to its own longest sentence, rounded up to 16.
fn real_data(art: &Artifact, mut sets: Vec<String>) -> (TrainConfig, RunData) {
    let config = repo_root().join("examples/sst2/train.toml");
    sets.push("data.limit=2000".into());
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
    let data = bidora_runtime::train::dataset::load(
        &cfg.data,
        config.parent().unwrap(),
        &eval_inputs,
        "seq-cls",
        cfg.val_ratio,
        cfg.seed,
    )
    .unwrap();
    (cfg, data)
}

/// The same on real SST-2 sentences ([`real_data`]).
fn measure_real(
    art: &Artifact,
    be: &dyn Backend,
    method: Method,
    steps: usize,
) -> BTreeMap<String, f64> {
    let (cfg, data) = real_data(art, bench_sets(method));
    timed(art, be, cfg, data, steps, false)
}

/// (min, mean, max) padded length of the real data's batches of `BATCH` consecutive
/// training examples: how far they are from the fixed 128.
fn real_lengths(art: &Artifact) -> (usize, f64, usize) {
    let (_, d) = real_data(art, vec![]);
    let lens: Vec<usize> = d
        .train_idx
        .chunks(BATCH)
        .map(|c| {
            let b = d.data.batch(c).unwrap();
            b.iter().find(|(n, _)| n == "input_ids").unwrap().1.shape()[1]
        })
        .collect();
    let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    (
        *lens.iter().min().unwrap(),
        mean,
        *lens.iter().max().unwrap(),
    )
}

/// Runs `steps` + 1 steps and takes the medians of the logged per-step seconds, skipping the
/// first (plan building).
fn timed(
    art: &Artifact,
    be: &dyn Backend,
    cfg: TrainConfig,
    data: RunData,
    steps: usize,
    resident: bool,
) -> BTreeMap<String, f64> {
    let run = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg, art, be, data, run.path(), false).unwrap();
    if resident {
        t = t.resident(be).unwrap();
    }
    t.progress = false;
    t.run_to_end(Some(steps + 1)).unwrap();
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(run.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "step")
        .skip(1)
        .collect();
    let mut parts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &recs {
        for (k, v) in r["secs"].as_object().unwrap() {
            parts
                .entry(k.clone())
                .or_default()
                .push(v.as_f64().unwrap());
        }
    }
    parts.into_iter().map(|(k, v)| (k, median(v))).collect()
}

fn split_of(p: &BTreeMap<String, f64>) -> String {
    p.iter()
        .filter(|(k, _)| k.as_str() != "total")
        .map(|(k, v)| format!("{k} {v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let steps: usize = std::env::var("BIDORA_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let lora = artifact(&dir.path().join("lora"), AdapterMethod::Lora, None);
    let fd = artifact(
        &dir.path().join("fd"),
        AdapterMethod::Dora,
        Some(Hypergrad::Fd),
    );
    let fdf = artifact(
        &dir.path().join("fdf"),
        AdapterMethod::Dora,
        Some(Hypergrad::FdForward),
    );
    println!(
        "minilm-sst2 (3 layers, hidden 384), batch {BATCH} × {SEQ}, DoRA/LoRA on query,value \
         (rank {}), seq-cls head trained; medians of {steps} steps, seconds",
        lora.manifest.adapters[0].rank
    );
    println!("| backend | threads | LoRA s | DoRA s | BiDoRA fd s | BiDoRA fd-forward s | DoRA / LoRA | fd / LoRA | fd-forward / LoRA | split of the fd iteration |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let real_only = std::env::var("BIDORA_BENCH_ONLY").as_deref() == Ok("real");
    let mut resident_rows = vec![];
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        for threads in [1, 2] {
            if real_only {
                break;
            }
            let opts = BackendOptions {
                threads,
                ..Default::default()
            };
            let be = match backend::select(kind, &opts) {
                Ok(b) => b,
                Err(e) => {
                    println!("| {kind:?} | {threads} | skipped: {e} | | | | | | | |");
                    continue;
                }
            };
            let l = measure(&lora, &*be, Method::Lora, steps, false);
            let d = measure(&fd, &*be, Method::Dora, steps, false);
            let b = measure(&fd, &*be, Method::Bidora, steps, false);
            let f = measure(&fdf, &*be, Method::Bidora, steps, false);
            let (l0, d0, b0, f0) = (l["total"], d["total"], b["total"], f["total"]);
            println!(
                "| {} | {threads} | {l0:.3} | {d0:.3} | {b0:.3} | {f0:.3} | {:.2} | {:.2} | {:.2} | {} |",
                be.name(),
                d0 / l0,
                b0 / l0,
                f0 / l0,
                split_of(&b)
            );
            if kind == BackendKind::Ort {
                resident_rows.push((threads, b0, measure(&fd, &*be, Method::Bidora, steps, true)));
            }
        }
    }
    // Resident mode (tensors, gradients and AdamW moments kept in ONNX Runtime's memory,
    // AdamW as a program; what `--device cuda` runs) against host mode, same BiDoRA fd
    // iteration. On the CPU provider both live in host memory: this shows the cost of the
    // mode's mechanics (IoBinding, the AdamW program), not a GPU's saving.
    println!();
    println!("| backend | threads | BiDoRA fd host s | BiDoRA fd resident s | resident / host | split of the resident iteration |");
    println!("|---|---|---|---|---|---|");
    for (threads, host, r) in resident_rows {
        println!(
            "| ort | {threads} | {host:.3} | {:.3} | {:.2} | {} |",
            r["total"],
            r["total"] / host,
            split_of(&r)
        );
    }
    // Real batches: what a user's run feeds (lengths differ between the training and the
    // validation batch of one iteration, and from step to step).
    let (lo, mean, hi) = real_lengths(&fd);
    println!();
    println!(
        "Real SST-2 batches of {BATCH} (first 2,000 training sentences, the quickstart's \
         tokenizer, each batch padded to its longest sentence rounded up to 16: lengths \
         {lo}–{hi}, mean {mean:.1}), one thread:"
    );
    println!("| backend | LoRA s | BiDoRA fd s | fd / LoRA | split of the fd iteration |");
    println!("|---|---|---|---|---|");
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let opts = BackendOptions {
            threads: 1,
            ..Default::default()
        };
        let be = match backend::select(kind, &opts) {
            Ok(b) => b,
            Err(e) => {
                println!("| {kind:?} | skipped: {e} | | | |");
                continue;
            }
        };
        let l = measure_real(&lora, &*be, Method::Lora, steps);
        let b = measure_real(&fd, &*be, Method::Bidora, steps);
        println!(
            "| {} | {:.3} | {:.3} | {:.2} | {} |",
            be.name(),
            l["total"],
            b["total"],
            b["total"] / l["total"],
            split_of(&b)
        );
    }
}
