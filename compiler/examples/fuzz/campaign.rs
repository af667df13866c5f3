//! A fuzz campaign carried across sittings: chunks of one seeded sequence, one JSON line per
//! finished chunk in a log, continued after the last logged chunk on the next start.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bidora_compiler::fuzz::{self, Fixture, RunOptions, Summary};
use serde_json::{json, Value};

/// One logged chunk, as read back.
struct Chunk {
    seed: u64,
    start: u64,
    mutants: u64,
    refused: u64,
    compile_errors: u64,
    compiled: u64,
    panics: u64,
    hangs: u64,
    peak_rss_bytes: u64,
    seconds: f64,
    slowest: (u64, f64),
    threads: u64,
}

fn read_log(log: &Path) -> Result<Vec<Chunk>, String> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e.to_string()),
    };
    let mut chunks: Vec<Chunk> = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("line {}: not a chunk record ({e})", i + 1))?;
        let u = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| format!("line {}: `{k}` is missing or not a count", i + 1))
        };
        let f = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| format!("line {}: `{k}` is missing or not a number", i + 1))
        };
        let n = |k: &str| v[k].as_array().map_or(0, |a| a.len() as u64);
        let c = Chunk {
            seed: u("seed")?,
            start: u("start")?,
            mutants: u("mutants")?,
            refused: u("refused")?,
            compile_errors: u("compile_errors")?,
            compiled: u("compiled")?,
            panics: n("panics"),
            hangs: n("hangs"),
            peak_rss_bytes: u("peak_rss_bytes")?,
            seconds: f("seconds")?,
            slowest: (u("slowest_index")?, f("slowest_seconds")?),
            threads: u("threads")?,
        };
        if let Some(prev) = chunks.last() {
            let end = prev.start + prev.mutants;
            if c.seed != prev.seed {
                return Err(format!(
                    "line {}: seed {} after seed {}; one log holds one seed's sequence",
                    i + 1,
                    c.seed,
                    prev.seed
                ));
            }
            if c.start != end {
                return Err(format!(
                    "line {}: chunk starts at mutant {} but the previous one ended at {end} (a gap or an overlap)",
                    i + 1,
                    c.start
                ));
            }
        } else if c.start != 0 {
            return Err(format!(
                "line {}: the first chunk starts at mutant {}, not 0",
                i + 1,
                c.start
            ));
        }
        chunks.push(c);
    }
    Ok(chunks)
}

fn record(o: &RunOptions, s: &Summary, note: &str) -> Value {
    let failures = |v: &[fuzz::Failure]| v.iter().map(|f| f.to_string()).collect::<Vec<_>>();
    json!({
        "seed": o.seed,
        "start": o.start,
        "mutants": s.mutants,
        "refused": s.refused,
        "compile_errors": s.compile_errors,
        "compiled": s.compiled,
        "panics": failures(&s.panics),
        "hangs": failures(&s.hangs),
        "peak_rss_bytes": s.peak_rss_bytes.unwrap_or(0),
        "seconds": s.seconds,
        "slowest_index": s.slowest.map_or(0, |x| x.0),
        "slowest_seconds": s.slowest.map_or(0.0, |x| x.1),
        "threads": o.threads,
        "note": note,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// Runs the campaign `0..o.mutants` of `o.seed` from where `log` ends; the exit code.
/// `note` goes into each chunk's line (the commit the binary was built from, say), since a
/// campaign's chunks may be run by different builds.
pub fn run(fx: Arc<Vec<Fixture>>, mut o: RunOptions, chunk: u64, log: &Path, note: &str) -> i32 {
    let done = match read_log(log) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", log.display());
            return 2;
        }
    };
    if let Some(c) = done.first().filter(|c| c.seed != o.seed) {
        eprintln!(
            "{} holds seed {}'s campaign, not seed {}: pass --seed {} or another log",
            log.display(),
            c.seed,
            o.seed,
            c.seed
        );
        return 2;
    }
    let total = o.mutants;
    let limit = o.time_limit.take();
    let began = Instant::now();
    let mut next = done.last().map_or(0, |c| c.start + c.mutants);
    eprintln!(
        "{}: seed {}, {next} of {total} mutants done, continuing in chunks of {chunk}",
        log.display(),
        o.seed
    );
    while next < total {
        if limit.is_some_and(|l| began.elapsed() >= l) {
            break;
        }
        o.start = next;
        o.mutants = chunk.min(total - next);
        o.time_limit = limit.map(|l| l.saturating_sub(began.elapsed()));
        let s = fuzz::run(fx.clone(), &o, &|_| {});
        super::report(&o, &s);
        let line = record(&o, &s, note).to_string();
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| {
                writeln!(f, "{line}")?;
                f.sync_data()
            });
        if let Err(e) = appended {
            eprintln!("cannot append to {}: {e}", log.display());
            return 2;
        }
        if !s.panics.is_empty() || !s.hangs.is_empty() {
            return 1;
        }
        next += s.mutants;
    }
    0
}

/// The campaign's figures summed over its chunks.
pub fn totals(log: &Path) -> Result<String, String> {
    let c = read_log(log)?;
    let Some(first) = c.first() else {
        return Err("no chunks logged yet".into());
    };
    let sum = |f: fn(&Chunk) -> u64| c.iter().map(f).sum::<u64>();
    let mutants = sum(|c| c.mutants);
    let seconds: f64 = c.iter().map(|c| c.seconds).sum();
    let slowest = c
        .iter()
        .map(|c| c.slowest)
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let threads: Vec<String> = {
        let mut t: Vec<u64> = c.iter().map(|c| c.threads).collect();
        t.dedup();
        t.iter().map(|t| t.to_string()).collect()
    };
    Ok(format!(
        "seed {}, mutants 0..{mutants} in {} chunks: loaded {}, compiled {}, errors {}, panics {}, hangs {}, peak RSS {} MiB, {:.0} s run ({:.1} mutants/s on {} thread(s)), slowest mutant {} ({:.2} s)",
        first.seed,
        c.len(),
        sum(|c| c.compiled + c.compile_errors),
        sum(|c| c.compiled),
        sum(|c| c.refused + c.compile_errors),
        sum(|c| c.panics),
        sum(|c| c.hangs),
        c.iter().map(|c| c.peak_rss_bytes).max().unwrap_or(0) >> 20,
        seconds,
        mutants as f64 / seconds.max(1e-9),
        threads.join("/"),
        slowest.0,
        slowest.1,
    ))
}
