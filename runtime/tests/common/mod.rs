//! Helpers shared by the runtime's integration tests (each test file compiles this module on
//! its own and uses only part of it, hence the allowance).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bidora_compiler::heads::Task;
use bidora_compiler::rewrite::{AdapterConfig, Method};
use bidora_compiler::{pipeline, targets::TargetSpec};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `bidora` binary under test.
pub fn bidora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bidora"))
}

/// Runs `cmd` with its standard output a pipe whose read end is already closed, so every
/// write to it fails with EPIPE, as under `| head -1` once `head` has exited.
pub fn output_with_closed_stdout(cmd: &mut Command) -> std::process::Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills the two descriptors; each is then owned exactly once.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    };
    cmd.stdout(std::process::Stdio::from(write_end))
        .output()
        .unwrap()
}

/// Compiles the fixture `models/{fixture}` with the compiler's library (rank 4, α 8, no
/// BiDoRA programs) into the artifact folder `dir`. Its manifest records no model path, and
/// the fingerprint of the model's weights as `bidora-compile` does.
pub fn write_artifact(
    dir: &Path,
    fixture: &str,
    target: &str,
    method: Method,
    task: Task,
    train_head: bool,
    seed: u64,
) {
    write_artifact_full(
        dir, fixture, target, method, task, train_head, seed, 8.0, None,
    )
}

/// [`write_artifact`] with another α, and BiDoRA's lower and upper programs when `bilevel`
/// is given.
#[allow(clippy::too_many_arguments)]
pub fn write_artifact_full(
    dir: &Path,
    fixture: &str,
    target: &str,
    method: Method,
    task: Task,
    train_head: bool,
    seed: u64,
    alpha: f32,
    bilevel: Option<pipeline::BilevelOptions>,
) {
    let model = bidora_compiler::load_model(&root().join("models").join(fixture)).unwrap();
    let opts = pipeline::CompileOptions {
        targets: TargetSpec::parse(&[target.to_string()], None).unwrap(),
        adapter: AdapterConfig {
            method,
            rank: 4,
            alpha,
            rslora: false,
            detach_norm: false,
            seed,
        },
        task: Some(task),
        train_head,
        bilevel,
        lm_labels: false,
    };
    let c = pipeline::compile(&model, &opts).unwrap();
    let fp = bidora_compiler::provenance::fingerprint(&model);
    bidora_compiler::artifact::write_with_fingerprint(
        &pipeline::artifact(&c, fixture, &opts),
        dir,
        false,
        Some(&fp),
    )
    .unwrap();
}

/// The BERT fixture with DoRA on query/value and a seq-cls head (`train_head`: the
/// classifier trained too), as the CLI tests use it.
pub fn write_bert_dora(dir: &Path, train_head: bool) {
    write_artifact(
        dir,
        "bert_legacy17.onnx",
        "query,value",
        Method::Dora,
        Task::SeqCls,
        train_head,
        0,
    );
}

/// Every logged number of a run: (line kind and step, key, value).
pub fn logged(run: &Path) -> Vec<(String, String, f64)> {
    let mut out = vec![];
    for l in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let at = format!("{} {} {}", v["kind"], v["phase"], v["global_step"]);
        for k in ["loss", "reg", "upper_val_loss", "hypergrad_norm", "metric"] {
            if let Some(x) = v[k].as_f64() {
                out.push((at.clone(), k.to_string(), x));
            }
        }
    }
    out
}

/// Panics with the command's stderr unless it succeeded.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
