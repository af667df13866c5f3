//! The module layering ARCHITECTURE.md promises, checked on the sources: a lower module never
//! names the one above it, so the two cannot grow back into an import cycle. Each rule is
//! (folder below, path it must not name, why).

use std::collections::{BTreeMap, BTreeSet};
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

/// The crate's top-level modules (a file or folder under `src`) and which others each one
/// names through `crate::`, in code lines. Test code may use the whole crate (a rule's unit
/// test runs the shape driver), so a file's `#[cfg(test)]` module, by convention its end, and
/// `tests.rs` files are not read.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = vec![];
    rust_files(src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let edges = g.entry(top.clone()).or_default();
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    edges.insert(name);
                }
            }
        }
    }
    g
}

/// Every module that reaches itself again through the graph, with one such path.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = vec![];
    for start in g.keys() {
        // Depth-first from `start`, keeping the path, until it comes back to `start`.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in g.get(&at).into_iter().flatten() {
                if next == start {
                    found.push(format!("{} -> {start}", path.join(" -> ")));
                    stack.clear();
                    break;
                }
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    found
}

/// The runtime's top-level modules import one way only.
#[test]
fn the_runtime_has_no_import_cycle_between_its_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/src");
    let g = module_graph(&src);
    assert!(g.contains_key("train") && g.contains_key("data"), "{g:?}");
    let c = cycles(&g);
    assert!(
        c.is_empty(),
        "import cycles in runtime/src:\n{}",
        c.join("\n")
    );
}

/// The compiler's top-level modules import one way only: `error` and `fact` at the bottom, the
/// passes above `shape` and `ops`, the programs and the pipeline on top (ARCHITECTURE.md,
/// "Layers import downward only").
#[test]
fn the_compiler_has_no_import_cycle_between_its_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compiler/src");
    let g = module_graph(&src);
    assert!(
        g.contains_key("ops") && g.contains_key("shape") && g.contains_key("fact"),
        "{g:?}"
    );
    assert!(
        g["ops"].contains("fact") && g["shape"].contains("ops"),
        "{g:?}"
    );
    let c = cycles(&g);
    assert!(
        c.is_empty(),
        "import cycles in compiler/src:\n{}",
        c.join("\n")
    );
}

/// The cycle finder can fail: two modules naming each other are a cycle, a chain is not.
#[test]
fn the_cycle_finder_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::X;\n").unwrap();
    std::fs::write(dir.path().join("b/mod.rs"), "use crate::c::Y;\n").unwrap();
    std::fs::write(
        dir.path().join("c.rs"),
        "// crate::a only in prose\n#[cfg(test)]\nmod tests { use crate::a::g; }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("b/tests.rs"), "use crate::a::g;\n").unwrap();
    assert!(cycles(&module_graph(dir.path())).is_empty());
    std::fs::write(dir.path().join("c.rs"), "fn f() { crate::a::g() }\n").unwrap();
    let c = cycles(&module_graph(dir.path()));
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(c.contains(&"a -> b -> c -> a".to_string()), "{c:?}");
}

/// No source file grows past about a thousand lines (ARCHITECTURE.md: small modules with one
/// job); a family that outgrows its file becomes a folder, as `ops/shape_ops/` did.
#[test]
fn no_source_file_is_over_a_thousand_lines() {
    const LIMIT: usize = 1000;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![];
    for dir in ["compiler", "runtime", "tests", "examples", "models"] {
        let d = root.join(dir);
        if d.is_dir() {
            rust_files(&d, &mut files);
        }
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > LIMIT).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(files.len() > 50, "{files:?}");
    assert!(
        long.is_empty(),
        "split these (over {LIMIT} lines):\n{}",
        long.join("\n")
    );
}

/// The files that may name prost messages (`proto::onnx::…`, `prost::`), each with why; every
/// other module works on the IR. ARCHITECTURE.md, "Only onnx_io and ir::convert handle prost
/// messages".
const PROTO_FILES: &[(&str, &str)] = &[
    ("compiler/src/proto.rs", "the generated types themselves"),
    ("compiler/src/onnx_io/", "reads and writes the messages"),
    ("compiler/src/ir/convert.rs", "messages to IR and back"),
    (
        "compiler/src/ir/mod.rs",
        "carries the parts it does not reason about as their messages (passthrough fields)",
    ),
    (
        "compiler/src/lib.rs",
        "load_model: onnx_io, then the import check, then convert",
    ),
    (
        "compiler/src/import_check.rs",
        "the IR-version bounds of onnx.proto's Version enum; sizes of carried messages",
    ),
    (
        "compiler/src/fuzz.rs",
        "mutates messages to build fuzz cases",
    ),
    (
        "runtime/src/backend/ort.rs",
        "legalises an emitted program's message for ONNX Runtime at load (half upcasts)",
    ),
    (
        "runtime/src/backend/ort_shared.rs",
        "hands the shared weights' tensors to ONNX Runtime",
    ),
];

#[test]
fn only_the_onnx_boundary_names_prost_messages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut broken = vec![];
    for crate_src in ["compiler/src", "runtime/src"] {
        for path in ["proto::onnx", "prost::"] {
            for hit in offenders(&root.join(crate_src), path) {
                let rel = hit
                    .strip_prefix(&format!("{}/", root.display()))
                    .unwrap_or(&hit);
                if !PROTO_FILES.iter().any(|(f, _)| rel.starts_with(f)) {
                    broken.push(rel.to_string());
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "prost messages named outside the ONNX boundary (work on the IR, or add the file to \
         PROTO_FILES with why):\n{}",
        broken.join("\n")
    );
}
