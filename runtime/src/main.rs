//! `bidora`: runs artifacts written by `bidora-compile`. Today: `check` (load and run every
//! program once, in tract or ONNX Runtime). Training (`bidora train`) comes with the runtime
//! issue.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::{self, BackendKind, BackendOptions, Device, HostTensor};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bidora",
    version,
    about = "Run bidora artifacts (tract or ONNX Runtime)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load every program of an artifact and run it once on a synthetic batch, printing the
    /// backend chosen and each output's shape (and the loss).
    /// Example: `bidora check run/artifact --backend ort`.
    Check {
        /// The artifact folder written by bidora-compile.
        artifact: PathBuf,
        /// Batch size of the synthetic batch. Example: `--batch 4`.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Sequence length of the synthetic batch. Example: `--seq 32`.
        #[arg(long, default_value_t = 8)]
        seq: usize,
        /// Engine: tract (embedded, the default), ort (ONNX Runtime), or auto (ort when a
        /// library is found, else tract). Example: `--backend ort`.
        #[arg(long, default_value = "tract")]
        backend: BackendKind,
        /// Where ONNX Runtime runs: cpu, cuda or cuda:N (tract: cpu only). Example:
        /// `--device cuda`.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// The ONNX Runtime library to load, instead of ORT_DYLIB_PATH or the `onnxruntime`
        /// Python package. Example: `--ort-lib /opt/ort/lib/libonnxruntime.so.1.32.0`.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// Threads per program run; 0 = all cores. Example: `--threads 2`.
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

fn check(
    dir: &std::path::Path,
    batch: usize,
    seq: usize,
    kind: BackendKind,
    opts: &BackendOptions,
) -> Result<()> {
    let art = Artifact::open(dir)?;
    let engine = backend::select(kind, opts).context("choosing the backend")?;
    println!("{} (from {})", dir.display(), art.manifest.source_model);
    println!("backend: {}", engine.description());
    for (key, prog) in &art.manifest.programs {
        let inputs = art.example_inputs(prog, batch, seq)?;
        let path = art.dir.join(&prog.file);
        let t = std::time::Instant::now();
        let mut program = engine.load(&path)?;
        let outs = program.run(&inputs)?;
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
            backend,
            device,
            ort_lib,
            threads,
        } => check(
            &artifact,
            batch,
            seq,
            backend,
            &BackendOptions {
                threads,
                device,
                ort_lib,
            },
        ),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
