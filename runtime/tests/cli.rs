//! `bidora check` on a compiled artifact, and on a folder that is not one.

use std::path::Path;
use std::process::Command;

fn bidora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bidora"))
}

/// Writes an artifact for the BERT fixture with the compiler's library (DoRA on q/v, seq-cls).
fn compile(dir: &Path) {
    use bidora_compiler::{heads::Task, pipeline, rewrite, targets};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let model = bidora_compiler::load_model(&root.join("models/bert_legacy17.onnx")).unwrap();
    let opts = pipeline::CompileOptions {
        targets: targets::TargetSpec::parse(&["query,value".to_string()], None).unwrap(),
        adapter: rewrite::AdapterConfig {
            method: rewrite::Method::Dora,
            rank: 4,
            alpha: 8.0,
            rslora: false,
            detach_norm: false,
            seed: 0,
        },
        task: Some(Task::SeqCls),
        train_head: false,
        bilevel: None,
    };
    let c = pipeline::compile(&model, &opts).unwrap();
    bidora_compiler::artifact::write(
        &pipeline::artifact(&c, "bert_legacy17.onnx", &opts),
        dir,
        false,
    )
    .unwrap();
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
