//! The module layering ARCHITECTURE.md promises, checked on the sources: a lower module never
//! names the one above it, so the two cannot grow back into an import cycle. Each rule is
//! (folder below, path it must not name, why).

use std::path::{Path, PathBuf};

const RULES: &[(&str, &str, &str)] = &[
    (
        "compiler/src/ops",
        "crate::autodiff",
        "the op tables own the gradient rules' API (ops::grad_cx); the driver calls them",
    ),
    (
        "runtime/src/data",
        "crate::train",
        "readers implement data::Examples without knowing the trainer",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every line under `dir` that names `path` in code (comments and doc comments are prose).
fn offenders(dir: &Path, path: &str) -> Vec<String> {
    let mut files = vec![];
    rust_files(dir, &mut files);
    let mut hits = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(path) {
                hits.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    hits
}

#[test]
fn lower_modules_do_not_import_the_modules_above_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut broken = vec![];
    for (below, path, why) in RULES {
        for hit in offenders(&root.join(below), path) {
            broken.push(format!("{hit}\n    ({below} must not name {path}: {why})"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The check can fail: a source line that names the upper module is found, a comment is not.
#[test]
fn the_layering_check_finds_an_import_and_ignores_prose() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.rs"),
        "//! crate::train in prose\nuse crate::train::TrainError;\n",
    )
    .unwrap();
    let hits = offenders(dir.path(), "crate::train");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(
        hits[0].ends_with(":2: use crate::train::TrainError;"),
        "{hits:?}"
    );
}
