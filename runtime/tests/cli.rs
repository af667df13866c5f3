//! `bidora check` on a compiled artifact, and on a folder that is not one; `bidora train`
//! through the CLI.

use std::path::Path;

mod common;
use common::bidora;

/// Writes an artifact for the BERT fixture with the compiler's library (DoRA on q/v, seq-cls).
fn compile(dir: &Path) {
    common::write_bert_dora(dir, false);
}

#[test]
fn check_runs_every_program_and_prints_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let out = bidora().arg("check").arg(&art).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [
        "forward (forward.onnx)",
        "train_step (train_step.onnx)",
        "eval (eval.onnx)",
    ] {
        assert!(s.contains(p), "{p} missing:\n{s}");
    }
    let loss: f64 = s
        .lines()
        .find_map(|l| l.trim().strip_prefix("loss      loss [] = "))
        .expect("a loss line")
        .parse()
        .unwrap();
    assert!(
        (0.5..1.0).contains(&loss),
        "a loss near ln 2 for 2 classes, got {loss}:\n{s}"
    );
    assert_eq!(s.matches("gradient").count(), 12, "{s}");
}

/// `bidora check` feeds BiDoRA's upper program a validation batch of other sizes than its
/// training batch (as a real run does), and ONNX Runtime runs it.
#[test]
fn check_feeds_the_upper_program_batches_of_different_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    common::write_artifact_full(
        &art,
        "bert_legacy17.onnx",
        "query,value",
        bidora_compiler::rewrite::Method::Dora,
        bidora_compiler::heads::Task::SeqCls,
        false,
        0,
        8.0,
        Some(bidora_compiler::pipeline::BilevelOptions {
            hypergrad: bidora_compiler::bilevel::Hypergrad::Fd,
            regularizer: bidora_compiler::regularizer::RegVariant::Paper,
        }),
    );
    let backends: &[&str] = if ort_installed() {
        &["tract", "ort"]
    } else {
        &["tract"]
    };
    for backend in backends {
        let out = bidora()
            .args(["check", "--backend", backend, "--batch", "3", "--seq", "9"])
            .arg(&art)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.contains("upper (upper.onnx): ran"), "{backend}:\n{s}");
        assert!(
            s.contains("input     train.input_ids [3, 9]"),
            "{backend}:\n{s}"
        );
        assert!(
            s.contains("input     val.input_ids [2, 8]"),
            "{backend}:\n{s}"
        );
    }
}

#[test]
fn check_with_a_closed_stdout_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let out = common::output_with_closed_stdout(bidora().arg("check").arg(&art));
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn check_of_a_folder_without_manifest_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bidora().arg("check").arg(tmp.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("manifest.json") && !e.contains("panicked"),
        "{e}"
    );
}

/// Whether an ONNX Runtime library can be found here (as the ort backend looks for it);
/// without one the ort cases print SKIPPED, unless `BIDORA_REQUIRE_ORT=1` (CI).
fn ort_installed() -> bool {
    match bidora_runtime::backend::locate::find_ort(None) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("BIDORA_REQUIRE_ORT").as_deref() != Ok("1"),
                "BIDORA_REQUIRE_ORT=1 but {e}"
            );
            eprintln!("SKIPPED: {e} (pip install onnxruntime)");
            false
        }
    }
}

#[test]
fn check_on_ort_says_which_backend_and_matches_tract() {
    if !ort_installed() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let loss = |backend: &str| {
        let out = bidora()
            .args(["check", "--backend", backend])
            .arg(&art)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chosen = s
            .lines()
            .find_map(|l| l.strip_prefix("backend: "))
            .unwrap_or_else(|| panic!("no backend line:\n{s}"))
            .to_string();
        let loss: f64 = s
            .lines()
            .find_map(|l| l.trim().strip_prefix("loss      loss [] = "))
            .expect("a loss line")
            .parse()
            .unwrap();
        (chosen, loss)
    };
    let (ort, ort_loss) = loss("ort");
    assert!(
        ort.starts_with("ort (ONNX Runtime") && ort.contains("libonnxruntime"),
        "{ort}"
    );
    let (auto, _) = loss("auto");
    assert!(auto.starts_with("ort") && auto.contains("auto"), "{auto}");
    let (tract, tract_loss) = loss("tract");
    assert!(tract.starts_with("tract"), "{tract}");
    assert!(
        (ort_loss - tract_loss).abs() <= 1e-5 * tract_loss.abs(),
        "ort {ort_loss} vs tract {tract_loss}"
    );
}

#[test]
fn check_with_a_missing_ort_library_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let out = bidora()
        .args([
            "check",
            "--backend",
            "ort",
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
        ])
        .arg(&art)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("/nonexistent/libonnxruntime.so") && !e.contains("panicked"),
        "{e}"
    );
}

#[test]
fn check_on_cuda_without_a_gpu_build_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let run = |args: &[&str]| {
        let out = bidora().arg("check").args(args).arg(&art).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, e) = run(&["--device", "cuda"]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("CPU only") && !e.contains("panicked"), "{e}");
    if !ort_installed() {
        return;
    }
    let (code, e) = run(&["--backend", "ort", "--device", "cuda"]);
    if code == Some(0) {
        eprintln!("this machine has a CUDA-enabled ONNX Runtime");
        return;
    }
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains("cuda") && e.contains("CUDA") && !e.contains("panicked"),
        "{e}"
    );
}

/// `bidora train` end to end through the CLI: a config file with relative data paths,
/// `--set` overrides, resident mode on request, and the run folder's outputs.
#[test]
fn train_runs_a_config_and_writes_the_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cfg = tmp.path().join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "method = 'dora'\nsteps = 6\nbatch_size = 4\n[data]\nformat = 'glue-tsv'\n\
             train = '{}'\ntext_a = 'sentence1'\ntext_b = 'sentence2'\ntokenizer = 'hash:100'\n\
             max_len = 32\n",
            data.join("rte-train-head21.tsv").display()
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let out = bidora()
        .args([
            "train",
            "--threads",
            "1",
            "--resident",
            "--set",
            "lower.lr=1e-2",
        ])
        .arg(&art)
        .arg("--config")
        .arg(&cfg)
        .arg("-o")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resident"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("validation: accuracy"), "{stdout}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "final.safetensors",
        "curves.svg",
        "programs/adamw-lower.onnx",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("lr = 0.01"), "{saved}");
    // The two modes cannot both be asked for.
    let out = bidora()
        .args(["train", "--resident", "--no-resident"])
        .arg(&art)
        .arg("--config")
        .arg(&cfg)
        .arg("-o")
        .arg(tmp.path().join("run2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

/// `bidora generate`: prompts from flags and a file, one line out per prompt, the same text
/// every time; clear errors for no prompt and for tensors of another artifact.
#[test]
fn generate_prints_one_text_per_prompt() {
    use bidora_compiler::{heads::Task, rewrite::Method};
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("gpt2");
    common::write_artifact(
        &art,
        "gpt2_legacy17.onnx",
        "c_attn:q,v",
        Method::Dora,
        Task::CausalLm,
        false,
        3,
    );
    let tok = common::root().join("examples/e2e/tokenizer.json");
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "name[Aromi], eatType[pub] || \n\nname[The Eagle] || \n",
    )
    .unwrap();
    let run_with = |tensors: &Path, extra: &[&str]| {
        bidora()
            .arg("generate")
            .arg(&art)
            .arg("--tensors")
            .arg(tensors)
            .arg("--tokenizer")
            .arg(&tok)
            .args(["--threads", "1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let init = art.join("init.safetensors");
    let run = |extra: &[&str]| run_with(&init, extra);
    let three = [
        "--max-new-tokens",
        "6",
        "--prompt",
        "name[Alimentum] || ",
        "--prompts",
        prompts.to_str().unwrap(),
    ];
    let out = run(&three);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.lines().count(), 3, "{text}");
    let again = run(&three);
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);
    let beams = run(&[
        "--max-new-tokens",
        "6",
        "--prompt",
        "name[Alimentum] || ",
        "--beam-width",
        "3",
    ]);
    assert!(
        beams.status.success(),
        "{}",
        String::from_utf8_lossy(&beams.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&beams.stdout).lines().count(), 1);

    // Past the fixture's 64 positions: tract panics while planning that shape (constant
    // folding of the position Gather); it must come back as an error, not a crash.
    let long = run(&["--prompt", "name[Alimentum] || ", "--max-new-tokens", "80"]);
    let err = String::from_utf8_lossy(&long.stderr);
    assert_eq!(long.status.code(), Some(1), "{err}");
    assert!(
        err.contains("forward.onnx") && err.contains("positions"),
        "{err}"
    );

    let none = run(&[]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no prompt"));
    // Tensors of another artifact (the BERT one) name the file and what is missing.
    let bert = tmp.path().join("bert");
    compile(&bert);
    let other = run_with(&bert.join("init.safetensors"), &["--prompt", "x"]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(
        err.contains("init.safetensors") && err.contains("lora_A"),
        "{err}"
    );
}

/// A config for a seq-cls run on the RTE slice with hashed words: `steps` DoRA steps.
fn rte_config(dir: &Path, steps: usize) -> std::path::PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cfg = dir.join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "method = 'dora'\nsteps = {steps}\nbatch_size = 4\ncheckpoint_every = 2\n[data]\n\
             format = 'glue-tsv'\ntrain = '{}'\ntext_a = 'sentence1'\ntext_b = 'sentence2'\n\
             tokenizer = 'hash:100'\nmax_len = 32\n",
            data.join("rte-train-head21.tsv").display()
        ),
    )
    .unwrap();
    cfg
}

/// Two `bidora train` on one run folder: the second stops at once naming the first's pid,
/// and leaves the first's files alone.
#[test]
fn a_second_writer_of_a_run_folder_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let cfg = rte_config(tmp.path(), 100_000);
    let run = tmp.path().join("run");
    let train = |extra: &[&str]| {
        let mut c = bidora();
        c.args(["train", "--threads", "1"])
            .arg(&art)
            .arg("--config")
            .arg(&cfg)
            .arg("-o")
            .arg(&run)
            .args(extra);
        c
    };
    let mut first = train(&[])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = run.join(bidora_compiler::lock::RUN_LOCK);
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid ")) {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the first run never locked its folder"
        );
        assert!(first.try_wait().unwrap().is_none(), "the first run ended");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for extra in [&[][..], &["--resume"][..]] {
        let out = train(extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("in use by another bidora process")
                && err.contains(&format!("pid {} (bidora train)", first.id())),
            "{err}"
        );
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run was disturbed"
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

/// A run records its artifact; `--resume` with an artifact compiled with another α is
/// refused naming α, and so is exporting the run's tensors with that artifact.
#[test]
fn resume_and_export_refuse_an_artifact_with_other_settings() {
    use bidora_compiler::{heads::Task, rewrite::Method};
    let tmp = tempfile::tempdir().unwrap();
    let (a8, a16) = (tmp.path().join("a8"), tmp.path().join("a16"));
    for (dir, alpha) in [(&a8, 8.0), (&a16, 16.0)] {
        common::write_artifact_full(
            dir,
            "bert_legacy17.onnx",
            "query,value",
            Method::Dora,
            Task::SeqCls,
            false,
            0,
            alpha,
            None,
        );
    }
    let cfg = rte_config(tmp.path(), 2);
    let run = tmp.path().join("run");
    let train = |art: &Path, resume: bool| {
        let mut c = bidora();
        c.args(["train", "--threads", "1"])
            .arg(art)
            .arg("--config")
            .arg(&cfg)
            .arg("-o")
            .arg(&run);
        if resume {
            c.arg("--resume");
        }
        c.output().unwrap()
    };
    let out = train(&a8, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = train(&a16, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another artifact") && err.contains("alpha: 8.0 vs 16.0"),
        "{err}"
    );
    let out = bidora()
        .arg("export")
        .arg(&a16)
        .arg("--tensors")
        .arg(run.join("final.safetensors"))
        .arg("--model")
        .arg(common::root().join("models/bert_legacy17.onnx"))
        .arg("--merged")
        .arg(tmp.path().join("m.onnx"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("alpha: 8.0 vs 16.0"), "{err}");
    assert!(!tmp.path().join("m.onnx").exists());
}

/// `--resume` keeps the run's own config (only `checkpoint_every` may be `--set`), falls
/// back past a newest checkpoint holding a NaN saying so, refuses a `latest` naming a folder
/// outside the run and a log shorter than the checkpoint's, which it never pads.
#[test]
fn resume_keeps_the_config_and_refuses_or_skips_what_does_not_belong() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let cfg = rte_config(tmp.path(), 4);
    let run = tmp.path().join("run");
    let train = |extra: &[&str]| {
        bidora()
            .args(["train", "--threads", "1"])
            .arg(&art)
            .arg("--config")
            .arg(&cfg)
            .arg("-o")
            .arg(&run)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = train(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();

    let out = train(&["--resume", "--set", "steps=9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--set: 'steps' cannot change on --resume")
            && err.contains("only checkpoint_every"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("config.toml")).unwrap(),
        saved
    );
    let out = train(&["--resume", "--set", "checkpoint_every=1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A NaN in the newest checkpoint: the resume falls back to the one before.
    let ckpts = run.join("checkpoints");
    let newest = std::fs::read_to_string(ckpts.join("latest")).unwrap();
    let file = ckpts.join(newest.trim()).join("tensors.safetensors");
    let mut tensors = bidora_runtime::train::checkpoint::read_safetensors(&file).unwrap();
    let (name, first) = tensors
        .iter_mut()
        .find(|(n, _)| n.starts_with("param/"))
        .unwrap();
    first[[0, 0]] = f32::NAN;
    let name = name.clone();
    let views: Vec<(String, &ndarray::ArrayD<f32>)> =
        tensors.iter().map(|(n, a)| (n.clone(), a)).collect();
    bidora_runtime::train::checkpoint::write_safetensors(&file, &views, None).unwrap();
    let out = train(&["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(newest.trim())
            && err.contains("cannot be used")
            && err.contains(&format!("tensor '{}' holds a non-finite value", &name[6..]))
            && err.contains("resuming from"),
        "{err}"
    );

    // `latest` naming a folder outside the run.
    let latest = std::fs::read_to_string(ckpts.join("latest")).unwrap();
    std::fs::write(ckpts.join("latest"), "../../elsewhere").unwrap();
    let out = train(&["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a checkpoint folder of this run"), "{err}");
    std::fs::write(ckpts.join("latest"), latest).unwrap();

    // A log shorter than the checkpoint says: refused, not padded with NULs.
    let log = run.join("metrics.jsonl");
    std::fs::write(&log, "{}\n").unwrap();
    let out = train(&["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("metrics.jsonl") && err.contains("was cut or replaced"),
        "{err}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), b"{}\n");
}

/// A batch that cannot fit is refused with the estimate before anything is allocated (it
/// aborted the process before); more threads than cores get a warning.
#[test]
fn a_batch_that_cannot_fit_is_refused_and_too_many_threads_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    compile(&art);
    let cfg = rte_config(tmp.path(), 2);
    let run = tmp.path().join("run");
    let out = bidora()
        .args(["train", "--set", "batch_size=1000000000000"])
        .arg(&art)
        .arg("--config")
        .arg(&cfg)
        .arg("-o")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("batch_size: the run needs at least") && err.contains("GiB"),
        "{err}"
    );
    assert!(!run.exists());
    let more = std::thread::available_parallelism().unwrap().get() + 1;
    let out = bidora()
        .args(["check", "--threads", &more.to_string()])
        .arg(&art)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--threads {more} is more than the")),
        "{err}"
    );
}
