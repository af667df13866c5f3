//! The long fuzz campaign of issue 14: seeded mutants of the fixtures through the importer
//! and the compile, in-process, with a progress bar and a summary line.
//!
//! `cargo run --release -p bidora-compiler --example fuzz -- --mutants 1000000 --seed 1
//! [--start N] [--threads N] [--hang-secs 10] [--time-limit SECS] [--verbose]`. Exits 1 on any
//! panic or hang, naming each mutant's seed and index (replay:
//! `bidora_compiler::fuzz::mutant(&fixtures, seed, index)`, or `--write-mutant INDEX FILE` to
//! get its bytes).
//!
//! A campaign too long for one sitting: `--campaign LOG.jsonl [--chunk 5000]` runs mutants
//! `0..--mutants` of the seed in chunks, appending one JSON line per finished chunk to LOG
//! (with `--note TEXT`, e.g. the commit, in each line), and
//! on a later start continues after the last chunk LOG holds (the same command continues it;
//! a killed run loses at most its unfinished chunk). `--totals LOG.jsonl` adds the chunks up,
//! checking that they cover `0..N` of one seed without gaps or overlaps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bidora_compiler::fuzz::{self, RunOptions, Summary};

// mimalloc instead of glibc's allocator: a compile allocates and frees a few hundred thousand
// small strings and vectors, and glibc's malloc/free were a third of a mutant's time in a
// profile. The compiler's code under test is the same; only the allocator behind it differs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut o = RunOptions {
        seed: 1,
        start: 0,
        mutants: 1_000_000,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        hang_after: Duration::from_secs(10),
        time_limit: None,
    };
    let mut write: Option<(u64, String)> = None;
    let mut verbose = false;
    let mut campaign: Option<String> = None;
    let mut totals: Option<String> = None;
    let mut chunk = 5000u64;
    let mut note = String::new();
    let num = |v: Option<String>, flag: &str| -> u64 {
        v.and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("{flag} needs a non-negative integer");
            std::process::exit(2)
        })
    };
    let string = |v: Option<String>, flag: &str| -> String {
        v.unwrap_or_else(|| {
            eprintln!("{flag} needs a value");
            std::process::exit(2)
        })
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mutants" => o.mutants = num(args.next(), "--mutants"),
            "--seed" => o.seed = num(args.next(), "--seed"),
            "--start" => o.start = num(args.next(), "--start"),
            "--campaign" => campaign = Some(string(args.next(), "--campaign")),
            "--totals" => totals = Some(string(args.next(), "--totals")),
            "--note" => note = string(args.next(), "--note"),
            "--chunk" => chunk = num(args.next(), "--chunk").max(1),
            "--threads" => o.threads = num(args.next(), "--threads").max(1) as usize,
            "--hang-secs" => o.hang_after = Duration::from_secs(num(args.next(), "--hang-secs")),
            "--time-limit" => {
                o.time_limit = Some(Duration::from_secs(num(args.next(), "--time-limit")))
            }
            "--verbose" => verbose = true,
            "--write-mutant" => {
                let i = num(args.next(), "--write-mutant");
                let file = args.next().unwrap_or_else(|| {
                    eprintln!("--write-mutant INDEX FILE");
                    std::process::exit(2)
                });
                write = Some((i, file));
            }
            other => {
                eprintln!("unknown argument {other}; see the doc comment of examples/fuzz.rs");
                std::process::exit(2)
            }
        }
    }
    if let Some(log) = totals {
        match campaign::totals(std::path::Path::new(&log)) {
            Ok(t) => println!("{t}"),
            Err(e) => {
                eprintln!("{log}: {e}");
                std::process::exit(2)
            }
        }
        return;
    }
    let fx = match fuzz::fixtures(&fuzz::models_dir()) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            eprintln!("cannot read the fixtures: {e}");
            std::process::exit(2)
        }
    };
    if let Some((index, file)) = write {
        let m = fuzz::mutant(&fx, o.seed, index);
        if let Err(e) = std::fs::write(&file, &m.bytes) {
            eprintln!("cannot write {file}: {e}");
            std::process::exit(2)
        }
        let dir = fuzz::work_dir().expect("a temp folder");
        let outcome = fuzz::run_file(&m.bytes, &fx[m.fixture], dir.path());
        println!(
            "{}: {} [{}] -> {outcome:?}",
            file,
            fx[m.fixture].name,
            m.ops.join(", ")
        );
        return;
    }
    if verbose {
        let dir = fuzz::work_dir().expect("a temp folder");
        for k in o.start..o.start.saturating_add(o.mutants) {
            let m = fuzz::mutant(&fx, o.seed, k);
            let out = fuzz::run_file(&m.bytes, &fx[m.fixture], dir.path());
            let mut s = format!("{out:?}");
            s.truncate(300);
            println!("{k} {} [{}] {s}", fx[m.fixture].name, m.ops.join(", "));
        }
        return;
    }
    SEED.store(o.seed, Ordering::SeqCst);
    // SAFETY: the handler only reads atomics and calls write(2), both async-signal-safe.
    unsafe { libc::signal(libc::SIGABRT, on_abort as *const () as libc::sighandler_t) };
    if let Some(log) = campaign {
        let code = campaign::run(fx, o, chunk, std::path::Path::new(&log), &note);
        std::process::exit(code)
    }
    let s = run_with_bar(fx, &o);
    report(&o, &s);
    if !s.panics.is_empty() || !s.hangs.is_empty() {
        // A hung worker cannot be joined; exit rather than wait on it.
        std::process::exit(1);
    }
}

fn report(o: &RunOptions, s: &Summary) {
    for f in &s.panics {
        println!("panic: {f}");
    }
    for f in &s.hangs {
        println!("hang: {f}");
    }
    println!(
        "seed {}, mutants {}..{}, {} threads: {}",
        o.seed,
        o.start,
        o.start + s.mutants,
        o.threads,
        s.line()
    );
}

fn run_with_bar(fx: Arc<Vec<fuzz::Fixture>>, o: &RunOptions) -> Summary {
    let bar = indicatif::ProgressBar::new(o.mutants);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} mutants ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Without a terminal the bar is hidden: a line a minute says how far a long run got.
    let quiet = bar.is_hidden();
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let s = fuzz::run(fx, o, &|done| {
        bar.set_position(done);
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if quiet && last.elapsed() > Duration::from_secs(60) {
            *last = std::time::Instant::now();
            eprintln!(
                "{done} mutants, peak RSS {:?} bytes",
                fuzz::peak_rss_bytes()
            );
        }
    });
    bar.finish_and_clear();
    s
}

#[path = "fuzz/campaign.rs"]
mod campaign;

static SEED: AtomicU64 = AtomicU64::new(0);

/// On an abort (a failed allocation prints its size, then aborts): which mutants were running,
/// so the crasher can be replayed with `--write-mutant`.
extern "C" fn on_abort(_: libc::c_int) {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    let mut push = |b: &[u8]| {
        for &c in b {
            if n < buf.len() {
                buf[n] = c;
                n += 1;
            }
        }
    };
    let push_u64 = |mut v: u64, push: &mut dyn FnMut(&[u8])| {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        push(&digits[i..]);
    };
    push(b"abort: seed ");
    push_u64(SEED.load(Ordering::SeqCst), &mut push);
    push(b", mutants in flight:");
    for slot in &fuzz::IN_FLIGHT {
        let v = slot.load(Ordering::SeqCst);
        if v != u64::MAX {
            push(b" ");
            push_u64(v, &mut push);
        }
    }
    push(b"\n");
    // SAFETY: writing our own stack buffer to standard error, then dying of the signal as if
    // unhandled (abort() would, but a SIGABRT sent from outside would otherwise be survived).
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::signal(libc::SIGABRT, libc::SIG_DFL);
        libc::raise(libc::SIGABRT);
    }
}
