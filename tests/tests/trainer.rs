//! The training loop end to end on the tiny RoBERTa fixture with the 32 real SST-2 sentences
//! (words hashed into the fixture's vocabulary): BiDoRA's search and retrain phases, the
//! single-level baselines, resume after a kill, and a NaN stop.

use std::path::Path;

use bidora_compiler::bilevel::Hypergrad;
use bidora_compiler::load_model;
use bidora_compiler::rewrite::Method as AdapterMethod;
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::{self, HostTensor};
use bidora_runtime::data::DataError;
use bidora_runtime::train::{self, Examples, Method, RunData, TrainConfig, TrainError, Trainer};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

const SEQ: usize = 32;

fn sst2() -> Vec<(String, i64)> {
    let text =
        std::fs::read_to_string(repo_root().join("tests/data/sst2-train-first32.tsv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let (s, y) = l.rsplit_once('\t').unwrap();
            (s.to_string(), y.trim().parse().unwrap())
        })
        .collect()
}

/// `<s>`, words hashed (FNV-1a) into 3..1000, padding id 1 (the fixture has no tokenizer);
/// each batch padded to its own longest sentence (at most `SEQ` tokens), as the trainer's
/// data layer pads, so training and validation batches differ in length.
struct Hashed(Vec<(String, i64)>);

impl Examples for Hashed {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, DataError> {
        let rows: Vec<Vec<i64>> = idx
            .iter()
            .map(|&i| {
                let mut row = vec![0i64];
                for w in self.0[i].0.split_whitespace().take(SEQ - 1) {
                    let h = w.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                        (h ^ b as u64).wrapping_mul(0x100000001b3)
                    });
                    row.push(3 + (h % 997) as i64);
                }
                row
            })
            .collect();
        let len = rows.iter().map(Vec::len).max().unwrap_or(1);
        let (mut ids, mut mask) = (vec![], vec![]);
        for mut row in rows {
            let mut m = vec![1i64; row.len()];
            row.resize(len, 1);
            m.resize(len, 0);
            ids.extend(row);
            mask.extend(m);
        }
        let labels = idx.iter().map(|&i| self.0[i].1).collect();
        let b = idx.len();
        let t = |s: &[usize], v: Vec<i64>| {
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(s), v).unwrap())
        };
        Ok(vec![
            ("input_ids".into(), t(&[b, len], ids)),
            ("attention_mask".into(), t(&[b, len], mask)),
            ("labels".into(), t(&[b], labels)),
        ])
    }
}

fn artifact(dir: &Path, method: AdapterMethod) -> Artifact {
    let model = load_model(&repo_root().join("models/roberta_legacy17.onnx")).unwrap();
    let fd = (method == AdapterMethod::Dora).then_some(Hypergrad::Fd);
    let opts = seq_cls_options(qv_targets("roberta"), method, fd);
    write_artifact(
        &model,
        &opts,
        "roberta_legacy17.onnx",
        &dir.join("artifact"),
    )
}

fn config(method: Method, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("method={}", format!("{method:?}").to_lowercase()),
        "steps=40".into(),
        "retrain_steps=12".into(),
        "batch_size=8".into(),
        "eval_every=10".into(),
        "checkpoint_every=10".into(),
        "lower.lr=5e-3".into(),
        "upper.lr=5e-3".into(),
        "lower.warmup_ratio=0.1".into(),
        "data.train=sst2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::parse("", "test", &sets).unwrap()
}

fn data(cfg: &TrainConfig) -> RunData {
    let rows = sst2();
    let (train_idx, val_idx) = train::split(rows.len(), cfg.val_ratio, cfg.seed);
    RunData {
        data: Box::new(Hashed(rows)),
        train_idx,
        val_idx,
        test: None,
    }
}

fn trainer<'a>(cfg: TrainConfig, art: &'a Artifact, run: &Path, resume: bool) -> Trainer<'a> {
    let d = data(&cfg);
    let mut t = Trainer::new(cfg, art, &*tract1(), d, run, resume).unwrap();
    t.progress = false;
    t
}

fn step_losses(run: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| {
            (
                v["phase"].as_str().unwrap().to_string(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn bidora_runs_both_phases_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let run = dir.path().join("run");
    let s = trainer(config(Method::Bidora, &[]), &art, &run, false)
        .run_to_end(None)
        .unwrap()
        .unwrap();
    let losses = step_losses(&run);
    assert_eq!(losses.len(), 52, "40 search + 12 retrain steps");
    assert_eq!(losses.iter().filter(|(p, _)| p == "search").count(), 40);
    let first: f64 = losses[..8].iter().map(|l| l.1).sum::<f64>() / 8.0;
    let last: f64 = losses[32..40].iter().map(|l| l.1).sum::<f64>() / 8.0;
    eprintln!("search loss {first:.4} -> {last:.4}; summary {s:?}");
    assert!(last < first, "search loss {first} -> {last}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "curves.svg",
        "final.safetensors",
        "search.safetensors",
        "best.safetensors",
        "summary.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(run.join("curves.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("polyline"),
        "curves.svg has no lines"
    );
    // The magnitudes are frozen in the retrain phase: final = after search.
    let read = |f: &str| bidora_runtime::train::checkpoint::read_safetensors(&run.join(f)).unwrap();
    let (search, fin) = (read("search.safetensors"), read("final.safetensors"));
    let mag =
        |v: &[(String, ArrayD<f32>)], n: &str| v.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let b = art.manifest.bilevel.as_ref().unwrap();
    for m in &b.groups.upper {
        assert_eq!(mag(&search, m), mag(&fin, m), "{m} changed in retrain");
    }
    assert!(s.final_val.is_some());
}

#[test]
fn resume_after_a_kill_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let full = dir.path().join("full");
    trainer(config(Method::Bidora, &[]), &art, &full, false)
        .run_to_end(None)
        .unwrap();
    // Killed after 27 steps (7 past the step-20 checkpoint), then resumed; and a kill in the
    // retrain phase (step 40 + 5).
    for kill in [27usize, 45] {
        let cut = dir.path().join(format!("cut{kill}"));
        let r = trainer(config(Method::Bidora, &[]), &art, &cut, false)
            .run_to_end(Some(kill))
            .unwrap();
        assert!(r.is_none());
        trainer(config(Method::Bidora, &[]), &art, &cut, true)
            .run_to_end(None)
            .unwrap()
            .unwrap();
        let read = |r: &Path| {
            bidora_runtime::train::checkpoint::read_safetensors(&r.join("final.safetensors"))
                .unwrap()
        };
        assert!(
            read(&full) == read(&cut),
            "kill at {kill}: final tensors differ"
        );
        assert_eq!(
            step_losses(&full),
            step_losses(&cut),
            "kill at {kill}: loss curves differ"
        );
    }
}

#[test]
fn single_level_baselines_run_on_their_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let dora = artifact(&dir.path().join("d"), AdapterMethod::Dora);
    let lora = artifact(&dir.path().join("l"), AdapterMethod::Lora);
    for (method, art) in [(Method::Dora, &dora), (Method::Lora, &lora)] {
        let run = dir.path().join(format!("{method:?}"));
        trainer(config(method, &[]), art, &run, false)
            .run_to_end(None)
            .unwrap()
            .unwrap();
        let losses = step_losses(&run);
        assert_eq!(losses.len(), 40, "{method:?}: no retrain phase");
        let first: f64 = losses[..8].iter().map(|l| l.1).sum::<f64>() / 8.0;
        let last: f64 = losses[32..].iter().map(|l| l.1).sum::<f64>() / 8.0;
        assert!(last < first, "{method:?}: loss {first} -> {last}");
    }
    // BiDoRA on a LoRA artifact, or LoRA on a DoRA one, is a clear error.
    let d = data(&config(Method::Bidora, &[]));
    let e = Trainer::new(
        config(Method::Bidora, &[]),
        &lora,
        &*tract1(),
        d,
        &dir.path().join("x"),
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("lower.onnx"), "{e}");
}

/// A program the manifest lists but the folder lacks (a copy that left a file behind) is
/// refused by name, with what to compile, before the backend is asked to load a missing path.
#[test]
fn a_program_missing_from_the_artifact_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    std::fs::remove_file(art.dir.join("lower.onnx")).unwrap();
    let cfg = config(Method::Bidora, &[]);
    let d = data(&cfg);
    let e = match Trainer::new(cfg, &art, &*tract1(), d, &dir.path().join("run"), false) {
        Ok(_) => panic!("a run without lower.onnx started"),
        Err(e) => e,
    };
    let msg = e.to_string();
    match &e {
        TrainError::MissingProgram { file, dir, .. } => {
            assert_eq!(file, "lower.onnx", "{msg}");
            assert_eq!(dir, &art.dir, "{msg}");
        }
        _ => panic!("not a missing-program error: {msg}"),
    }
    assert!(
        msg.contains("lower.onnx is missing from")
            && msg.contains("compile the artifact again from a DoRA model with --task"),
        "{msg}"
    );
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let run = dir.path().join("run");
    // A learning rate this large drives the tensors to infinity within a few steps.
    let cfg = config(
        Method::Dora,
        &[
            "lower.lr=1e30",
            "lower.warmup_ratio=0.0",
            "checkpoint_every=1",
        ],
    );
    let e = trainer(cfg, &art, &run, false)
        .run_to_end(None)
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, TrainError::NonFinite { .. }), "{msg}");
    assert!(
        msg.contains("non-finite") && msg.contains("last good checkpoint"),
        "{msg}"
    );
    let latest = bidora_runtime::train::checkpoint::latest(&run)
        .unwrap()
        .unwrap();
    let (t, _): (
        bidora_runtime::train::checkpoint::Tensors,
        serde_json::Value,
    ) = bidora_runtime::train::checkpoint::load(&latest).unwrap();
    assert!(
        t.params
            .iter()
            .all(|(_, a)| a.iter().all(|x| x.is_finite())),
        "the kept checkpoint is finite"
    );
}

/// The same 20 BiDoRA iterations on tract and on ONNX Runtime (the PyPI `onnxruntime` CPU
/// library): the per-step losses agree to 1e-4 relative.
#[test]
fn tract_and_onnxruntime_give_the_same_loss_curve() {
    let Some(ort) = ort1() else { return };
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let cfg = || config(Method::Bidora, &["steps=20", "retrain_steps=0"]);
    let runs: Vec<Vec<(String, f64)>> = [&*tract1(), &*ort]
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let run = dir.path().join(format!("run{k}"));
            let c = cfg();
            let d = data(&c);
            let mut t = Trainer::new(c, &art, *b, d, &run, false).unwrap();
            t.progress = false;
            t.run_to_end(None).unwrap();
            step_losses(&run)
        })
        .collect();
    assert_eq!(runs[0].len(), 20);
    let worst = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(a, b)| (a.1 - b.1).abs() / a.1.abs())
        .fold(0.0, f64::max);
    eprintln!(
        "tract vs onnxruntime over 20 BiDoRA iterations: worst relative difference {worst:.2e}"
    );
    assert!(worst <= 1e-4, "{worst:e}");
}

type Losses = Vec<(String, f64)>;
type Tensors = Vec<(String, ndarray::ArrayD<f32>)>;

/// Runs BiDoRA (search and retrain) on `b`, host or resident; returns the loss curve and the
/// final tensors.
fn run_on(
    b: &dyn backend::Backend,
    art: &Artifact,
    run: &Path,
    resident: bool,
    stop_after: Option<usize>,
    resume: bool,
) -> Option<(Losses, Tensors)> {
    let c = config(Method::Bidora, &["steps=20", "retrain_steps=6"]);
    let d = data(&c);
    let mut t = Trainer::new(c, art, b, d, run, resume).unwrap();
    t.progress = false;
    if resident {
        t = t.resident(b).unwrap();
    }
    t.run_to_end(stop_after).unwrap()?;
    let tensors =
        bidora_runtime::train::checkpoint::read_safetensors(&run.join("final.safetensors"))
            .unwrap();
    Some((step_losses(run), tensors))
}

fn worst_rel(a: &[(String, f64)], b: &[(String, f64)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.1 - y.1).abs() / x.1.abs().max(1e-12))
        .fold(0.0, f64::max)
}

fn worst_tensor_diff(
    a: &[(String, ndarray::ArrayD<f32>)],
    b: &[(String, ndarray::ArrayD<f32>)],
) -> f32 {
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            max_abs_diff(x, y)
        })
        .fold(0.0, f32::max)
}

/// Resident mode (tensors, gradients and AdamW moments kept in the backend's memory, AdamW as
/// an ONNX program) gives the host mode's run: on tract, and on ONNX Runtime through
/// IoBinding (CPU memory here; the same path allocates on the GPU under CUDA).
#[test]
fn resident_mode_gives_the_host_run_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let tract = tract1();
    let ort = ort1();
    let mut backends: Vec<(&str, &dyn backend::Backend)> = vec![("tract", &*tract)];
    if let Some(o) = &ort {
        backends.push(("ort", &**o));
    }
    for (name, b) in backends {
        let host = run_on(
            b,
            &art,
            &dir.path().join(format!("{name}-host")),
            false,
            None,
            false,
        )
        .unwrap();
        let res = run_on(
            b,
            &art,
            &dir.path().join(format!("{name}-res")),
            true,
            None,
            false,
        )
        .unwrap();
        assert_eq!(host.0.len(), 26);
        let (dl, dt) = (
            worst_rel(&host.0, &res.0),
            worst_tensor_diff(&host.1, &res.1),
        );
        eprintln!("{name}: resident vs host: losses {dl:.2e} relative, final tensors {dt:.2e}");
        assert!(
            dl <= 1e-5 && dt <= 1e-5,
            "{name}: losses {dl:e}, tensors {dt:e}"
        );
        assert!(dir
            .path()
            .join(format!("{name}-res/programs/adamw-upper.onnx"))
            .exists());
    }
}

/// A resident run killed and resumed (the checkpoint brings the resident values to the
/// host and back) ends where the uninterrupted resident run does, bit for bit on tract.
#[test]
fn a_resident_run_resumes_to_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), AdapterMethod::Dora);
    let tract = tract1();
    let full = run_on(&*tract, &art, &dir.path().join("full"), true, None, false).unwrap();
    let cut = dir.path().join("cut");
    assert!(run_on(&*tract, &art, &cut, true, Some(13), false).is_none());
    let resumed = run_on(&*tract, &art, &cut, true, None, true).unwrap();
    assert!(full.1 == resumed.1, "final tensors differ");
    assert_eq!(full.0, resumed.0, "loss curves differ");
}

/// BiDoRA end to end on half-precision BERTs (f16 and bf16 weights, f32 adapters): both
/// phases run on both engines with finite losses, and the curves agree within f32 rounding
/// (both engines upcast half programs on the CPU).
#[test]
fn bidora_trains_half_precision_models_on_both_backends() {
    for (file, tol) in [("bert_legacy17_bf16", 1e-4), ("bert_dynamo18_f16", 1e-4)] {
        let dir = tempfile::tempdir().unwrap();
        let model = load_model(&repo_root().join(format!("models/half/{file}.onnx"))).unwrap();
        let opts = seq_cls_options(qv_targets("bert"), AdapterMethod::Dora, Some(Hypergrad::Fd));
        let art = write_artifact(&model, &opts, file, &dir.path().join("artifact"));
        let mut engines: Vec<Box<dyn backend::Backend>> = vec![tract1()];
        engines.extend(ort1());
        let mut curves = vec![];
        for (k, b) in engines.iter().enumerate() {
            let run = dir.path().join(format!("run{k}"));
            let c = config(Method::Bidora, &["steps=20", "retrain_steps=6"]);
            let d = data(&c);
            let mut t = Trainer::new(c, &art, &**b, d, &run, false).unwrap();
            t.progress = false;
            t.run_to_end(None).unwrap();
            let losses = step_losses(&run);
            assert_eq!(losses.len(), 26, "{file}");
            let (first, last) = (losses[0].1, losses[19].1);
            assert!(
                losses.iter().all(|(_, l)| l.is_finite()),
                "{file}: non-finite loss"
            );
            eprintln!("{file} on {}: search loss {first:.4} → {last:.4}", b.name());
            curves.push(losses);
        }
        if curves.len() == 2 {
            let worst = worst_rel(&curves[0], &curves[1]);
            eprintln!("{file}: tract vs ORT worst relative loss difference {worst:.2e}");
            assert!(worst <= tol, "{file}: {worst:e} > {tol:e}");
        }
    }
}

/// The upper level run as a data-parallel run runs it, in its two phases (`upper_val`, then
/// `upper_mixed`, the hypergradient formed on the host), gives one process's upper program's
/// losses and tensors, in every hypergradient mode: the phases split the program without
/// changing what it computes.
#[test]
fn the_upper_phases_compose_to_the_upper_program_in_every_mode() {
    let model = load_model(&repo_root().join("models/roberta_legacy17.onnx")).unwrap();
    for mode in Hypergrad::ALL {
        let dir = tempfile::tempdir().unwrap();
        let opts = seq_cls_options(qv_targets("roberta"), AdapterMethod::Dora, Some(mode));
        let art = write_artifact(
            &model,
            &opts,
            "roberta_legacy17.onnx",
            &dir.path().join("artifact"),
        );
        let backend = tract1();
        let run = |phased: bool, name: &str| {
            let c = config(Method::Bidora, &["steps=12", "retrain_steps=0"]);
            let d = data(&c);
            let run = dir.path().join(name);
            let mut t = Trainer::new(c, &art, &*backend, d, &run, false).unwrap();
            t.progress = false;
            if phased {
                t = t.phased(&*backend).unwrap();
            }
            t.run_to_end(None).unwrap().unwrap();
            let log: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["kind"] == "step")
                .flat_map(|v| [v["loss"].as_f64(), v["upper_val_loss"].as_f64()])
                .flatten()
                .collect();
            let tensors =
                bidora_runtime::train::checkpoint::read_safetensors(&run.join("final.safetensors"))
                    .unwrap();
            (log, tensors)
        };
        let (one_log, one_t) = run(false, "program");
        let (two_log, two_t) = run(true, "phases");
        assert_eq!(one_log.len(), two_log.len());
        for (a, b) in one_log.iter().zip(&two_log) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{mode:?}: loss {a} vs {b}");
        }
        for ((n, a), (_, b)) in one_t.iter().zip(&two_t) {
            let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(
                diff <= 1e-6 * scale,
                "{mode:?}: {n} differs by {diff:e} (largest value {scale:e})"
            );
        }
    }
}
