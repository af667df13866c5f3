//! The fuzz harness in `cargo test` (issue 14): a few thousand seeded mutants of the fixtures
//! through the importer and the compile, and every crasher the harness ever found replayed.
//! `cargo run --release -p bidora-compiler --example fuzz` runs the long campaign.
//!
//! `BIDORA_FUZZ_MUTANTS` and `BIDORA_FUZZ_SEED` change the count and seed here.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bidora_compiler::fuzz::{self, Outcome, RunOptions};

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutants_never_panic_or_hang() {
    let fx = Arc::new(fuzz::fixtures(&fuzz::models_dir()).unwrap());
    let opts = RunOptions {
        start: 0,
        seed: env_u64("BIDORA_FUZZ_SEED", 1),
        mutants: env_u64("BIDORA_FUZZ_MUTANTS", 2000),
        threads: 2,
        hang_after: Duration::from_secs(10),
        time_limit: None,
    };
    let s = fuzz::run(fx, &opts, &|_| {});
    eprintln!("{}", s.line());
    let failures: Vec<String> = s
        .panics
        .iter()
        .map(|f| format!("panic: {f}"))
        .chain(s.hangs.iter().map(|f| format!("hang: {f}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failing mutants (replay with fuzz::mutant(fixtures, seed, index)):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(s.mutants, opts.mutants);
    // A harness whose mutants all die in the decoder tests nothing past it.
    assert!(s.loaded() > opts.mutants / 10, "{}", s.line());
    assert!(s.compiled > 0, "{}", s.line());
    // The whole process, fixtures included; the fixtures' compiles alone stay under 100 MiB, and
    // the long-name crasher took gigabytes.
    if let Some(rss) = s.peak_rss_bytes {
        assert!(rss < 1 << 30, "peak RSS {} MiB: {}", rss >> 20, s.line());
    }
}

/// The crash corpus: `NAME.onnx` beside `NAME.txt`, whose first line is `FIXTURE: what it
/// broke`, FIXTURE naming the options to compile with. Files under `known/` are crashers not
/// fixed yet: reported, not failed on.
fn corpus(dir: &Path) -> Vec<(String, Vec<u8>, String, String)> {
    let mut v = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return v;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "onnx") {
            let note = std::fs::read_to_string(p.with_extension("txt"))
                .unwrap_or_else(|_| panic!("{} has no .txt note", p.display()));
            let line = note.lines().next().unwrap_or_default().to_string();
            let (fixture, what) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("{}: note must read `FIXTURE: what`", p.display()));
            v.push((
                p.display().to_string(),
                std::fs::read(&p).unwrap(),
                fixture.to_string(),
                what.to_string(),
            ));
        }
    }
    v.sort();
    v
}

#[test]
fn crash_corpus_replays_without_panics() {
    let fx = fuzz::fixtures(&fuzz::models_dir()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let dir = fuzz::work_dir().unwrap();
    let run = |(path, bytes, fixture, what): &(String, Vec<u8>, String, String)| {
        let f = fx
            .iter()
            .find(|f| &f.name == fixture)
            .unwrap_or_else(|| panic!("{path}: unknown fixture {fixture}"));
        (
            format!("{path} ({what})"),
            fuzz::run_file(bytes, f, dir.path()),
        )
    };
    let mut failed = vec![];
    for case in corpus(&root) {
        let start = Instant::now();
        let (name, outcome) = run(&case);
        let took = start.elapsed();
        eprintln!("{name}: {outcome:?} in {took:?}");
        if let Outcome::Panicked(m) = outcome {
            failed.push(format!("{name}: {m}"));
        } else if took > Duration::from_secs(10) {
            // Some crashers were hangs, not panics.
            failed.push(format!("{name}: took {took:?}"));
        }
    }
    for case in corpus(&root.join("known")) {
        let (name, outcome) = run(&case);
        eprintln!("known, not fixed yet: {name}: {outcome:?}");
    }
    assert!(
        failed.is_empty(),
        "corpus crashers panic again:\n{}",
        failed.join("\n")
    );
}

#[test]
fn mutants_are_reproducible() {
    let fx = fuzz::fixtures(&fuzz::models_dir()).unwrap();
    for k in [0, 1, 17, 999_999] {
        let (a, b) = (fuzz::mutant(&fx, 7, k), fuzz::mutant(&fx, 7, k));
        assert_eq!((a.fixture, &a.ops, &a.bytes), (b.fixture, &b.ops, &b.bytes));
    }
    let (a, b) = (fuzz::mutant(&fx, 7, 3), fuzz::mutant(&fx, 8, 3));
    assert!(a.bytes != b.bytes || a.ops != b.ops);
}
