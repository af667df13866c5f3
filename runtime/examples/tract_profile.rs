//! Where tract spends a program's time: every program of an artifact run on example inputs
//! (`Artifact::example_inputs`), each node timed; per op, the fastest of RUNS runs.
//!
//! `cargo run --release -p bidora-runtime --example tract_profile -- ARTIFACT [BATCH SEQ [RUNS]]`
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::tract::{Profile, TractProgram};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tract_profile ARTIFACT [BATCH SEQ [RUNS]]"))?;
    let batch = args.get(2).map_or(Ok(16), |s| s.parse())?;
    let seq = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let art = Artifact::open(std::path::Path::new(dir))?;
    for (key, prog) in &art.manifest.programs {
        let inputs = art.example_inputs(prog, batch, seq)?;
        let p = TractProgram::open(&art.dir.join(&prog.file))?;
        let mut best: Option<(f64, Profile)> = None;
        for _ in 0..runs.max(1) {
            let profile = p.profile(&inputs)?;
            let total: f64 = profile.ops.iter().map(|o| o.seconds).sum();
            if best.as_ref().is_none_or(|b| total < b.0) {
                best = Some((total, profile));
            }
        }
        let Some((total, profile)) = best else {
            continue;
        };
        println!("{key}: {total:.3} s, {} plan nodes", profile.nodes);
        for o in profile.ops.iter().take(12) {
            println!(
                "  {:<28} {:>8.4} s {:>5.1} % ({} nodes)",
                o.op,
                o.seconds,
                100.0 * o.seconds / total,
                o.nodes
            );
        }
    }
    Ok(())
}
