//! `bidora`: runs artifacts written by `bidora-compile`. Today: `check` (load and run every
//! program once with tract). Training (`bidora train`) comes with the runtime issue.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use bidora_runtime::artifact::Artifact;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bidora", version, about = "Run bidora artifacts (tract, CPU)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load every program of an artifact in tract and run it once on a synthetic batch,
    /// printing each output's shape (and the loss). Example: `bidora check run/artifact`.
    Check {
        /// The artifact folder written by bidora-compile.
        artifact: PathBuf,
        /// Batch size of the synthetic batch. Example: `--batch 4`.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Sequence length of the synthetic batch. Example: `--seq 32`.
        #[arg(long, default_value_t = 8)]
        seq: usize,
    },
}

fn check(dir: &std::path::Path, batch: usize, seq: usize) -> Result<()> {
    let art = Artifact::open(dir)?;
    println!("{} (from {})", dir.display(), art.manifest.source_model);
    for (key, prog) in &art.manifest.programs {
        let inputs = art.example_inputs(prog, batch, seq)?;
        let path = art.dir.join(&prog.file);
        let t = std::time::Instant::now();
        let plan = TractProgram::load(&path, &inputs)?;
        let outs = plan.run(&inputs)?;
        println!(
            "  {key} ({}): ran in {:.3} s",
            prog.file,
            t.elapsed().as_secs_f64()
        );
        for (sig, o) in prog.outputs.iter().zip(&outs) {
            let (shape, first) = match o {
                HostTensor::F32(a) => (a.shape().to_vec(), a.iter().next().map(|v| *v as f64)),
                HostTensor::F64(a) => (a.shape().to_vec(), a.iter().next().copied()),
                HostTensor::I64(a) => (a.shape().to_vec(), a.iter().next().map(|v| *v as f64)),
            };
            let value = if sig.role == "loss" {
                format!(" = {:.6}", first.unwrap_or(f64::NAN))
            } else {
                String::new()
            };
            println!("    {:<9} {} {:?}{value}", sig.role, sig.name, shape);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Check {
            artifact,
            batch,
            seq,
        } => check(&artifact, batch, seq),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
