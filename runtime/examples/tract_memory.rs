//! Resident memory as tract plans accumulate: every program of an artifact opened with one
//! constant pool (as `bidora train` does) and run at batch 16 for four padded lengths, with
//! the process's RSS after each. `--unpooled` gives every program and plan its own constants.
//!
//! `cargo run --release -p bidora-runtime --example tract_memory -- ARTIFACT [--unpooled]`
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::tract::TractProgram;
use bidora_runtime::backend::tract_consts::ConstPool;

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(f64::NAN);
    pages * 4096.0 / 1e6
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tract_memory ARTIFACT [--unpooled]"))?;
    let pool = if args.iter().any(|a| a == "--unpooled") {
        ConstPool::off()
    } else {
        ConstPool::default()
    };
    let art = Artifact::open(std::path::Path::new(dir))?;
    println!("start: {:.0} MB", rss_mb());
    let mut open = vec![];
    for (key, prog) in &art.manifest.programs {
        let p = TractProgram::open_pooled(&art.dir.join(&prog.file), pool.clone())?;
        println!("{key} opened: {:.0} MB", rss_mb());
        for seq in [16, 32, 48, 64] {
            p.run(&art.example_inputs(prog, 16, seq)?)?;
            println!(
                "  {key} plan at 16 x {seq}: {:.0} MB (constants {:.0} MB)",
                rss_mb(),
                pool.stats().live_bytes as f64 / 1e6
            );
        }
        open.push(p);
    }
    println!("pool: {:?}", pool.stats());
    Ok(())
}
