//! `bidora`: runs artifacts written by `bidora-compile`: `train` (BiDoRA, DoRA or LoRA on a
//! dataset, in tract or ONNX Runtime), `check` (run every program once), `generate` (text
//! from a causal LM with trained adapters) and `export` (the trained adapters as a merged
//! ONNX model and a peft adapter folder).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bidora_runtime::artifact::{Artifact, ProgramKey, Role};
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Distributed {
    Mpi,
    Nccl,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load every program of an artifact and run it once on a synthetic batch, printing the
    /// backend chosen, what was fed and each output's shape (and the loss). A program that
    /// takes two batches (BiDoRA's upper) gets a second one a size smaller in each dimension,
    /// as real, separately padded batches differ.
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
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// What each program of an artifact holds in memory at a batch size, computed from the
    /// programs (no run): the frozen weights once, the trainable tensors and AdamW state, and
    /// per program its inputs and the peak of its live intermediate values. What a GPU run
    /// needs on the device is the weights plus the largest program's figure.
    /// Example: `bidora memory run/artifact --batch 8 --seq 512`.
    Memory {
        /// The artifact folder written by bidora-compile.
        artifact: PathBuf,
        /// Batch size (every dim named `*batch`). Example: `--batch 8`.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Sequence length (every dim named `*sequence`). Example: `--seq 512`.
        #[arg(long, default_value_t = 128)]
        seq: usize,
    },
    /// Train an artifact on a dataset: BiDoRA (search + retrain), DoRA or LoRA, as the config
    /// says. Writes config.toml, metrics.jsonl, curves.svg, checkpoints/, best/final/search
    /// tensors (.safetensors) and summary.json into the run folder.
    /// Example: `bidora train run/artifact --config examples/sst2/train.toml -o run/sst2`.
    Train {
        /// The artifact folder written by bidora-compile (with --task).
        artifact: PathBuf,
        /// The training config (TOML); relative data paths are read from its folder.
        /// Example: `--config examples/sst2/train.toml`.
        #[arg(long, short)]
        config: PathBuf,
        /// The run folder. Example: `-o run/sst2`.
        #[arg(long, short)]
        output: PathBuf,
        /// Override a config value, repeatable. Example: `--set lower.lr=5e-4 --set steps=200`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in the output folder from its newest usable checkpoint, with the
        /// config and artifact it started with (`--set` may change only checkpoint_every).
        #[arg(long)]
        resume: bool,
        /// Keep the trainable tensors, gradients and AdamW moments in the backend's memory
        /// between runs, and run AdamW there as an ONNX program (the default with `--device
        /// cuda`; on the CPU it changes where nothing lives, so it is off).
        #[arg(long, conflicts_with = "no_resident")]
        resident: bool,
        /// Move every value through host memory on every run, even with `--device cuda`.
        #[arg(long)]
        no_resident: bool,
        /// Data-parallel training across the ranks `mpirun -np N` starts: mpi (processes on
        /// CPUs, one machine or several) or nccl (one process per GPU). Without it, a process
        /// started by mpirun with several ranks uses mpi. Needs a build with `--features mpi`
        /// (or `nccl`). Example: `mpirun -np 2 bidora train … --distributed mpi`.
        #[arg(long, value_enum)]
        distributed: Option<Distributed>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Compare LoRA, DoRA and BiDoRA (and ablations) over seeds on one task: compiles the
    /// artifacts, runs every cell as its own `bidora train`, skips finished cells and resumes
    /// a killed one on a rerun, and writes results.jsonl, results.md and results.svg.
    /// Example: `bidora sweep examples/sweep/sst2.toml -o runs/sweep --backend ort`.
    Sweep {
        /// The sweep file (TOML; see examples/sweep/).
        file: PathBuf,
        /// The sweep folder: artifacts/, cells/, results.*. Example: `-o runs/sweep`.
        #[arg(long, short)]
        output: PathBuf,
        /// Cells run at once; the threads are split between them.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// The weight-decomposition analysis (DoRA's Figure 2, BiDoRA's Figure 3): per adapted
    /// layer, the change of the column magnitudes ΔM and of the directions ΔD against the
    /// pre-trained weight, their fit per method; writes analysis.jsonl, .md and .svg.
    /// Example: `bidora analyze runs/sweep-sst2` (every cell of a sweep), or
    /// `bidora analyze --artifact run/artifact --tensors run/sst2/final.safetensors -o out`.
    Analyze {
        /// A sweep folder: every cell's search and final tensors.
        sweep: Option<PathBuf>,
        /// One artifact, with `--tensors`.
        #[arg(long, conflicts_with = "sweep", requires = "tensors")]
        artifact: Option<PathBuf>,
        /// Tensors files trained for `--artifact`, repeatable.
        #[arg(long)]
        tensors: Vec<PathBuf>,
        /// The source model, if the manifest records no path.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The output folder (default: the sweep folder).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Generate text with a causal-LM artifact and trained tensors: greedy or beam search
    /// over `forward.onnx`, one output line per prompt.
    /// Example: `bidora generate runs/e2e-gpt2 --tensors runs/e2e/final.safetensors
    /// --tokenizer examples/e2e/tokenizer.json --prompt "name[Aromi], eatType[pub] || "`.
    Generate {
        /// The artifact folder written by bidora-compile.
        artifact: PathBuf,
        /// The trained tensors (a run's `final.safetensors` or `best.safetensors`, or the
        /// artifact's `init.safetensors`).
        #[arg(long)]
        tensors: PathBuf,
        /// The model's tokenizer.json. Example: `--tokenizer examples/e2e/tokenizer.json`.
        #[arg(long)]
        tokenizer: PathBuf,
        /// A prompt, repeatable. Example: `--prompt "name[Aromi] || "`.
        #[arg(long)]
        prompt: Vec<String>,
        /// A file of prompts, one per line.
        #[arg(long, value_name = "FILE")]
        prompts: Option<PathBuf>,
        /// Tokens generated per prompt at most.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 1: greedy; more: beam search with this many beams.
        #[arg(long, default_value_t = 1)]
        beam_width: usize,
        /// Exponent of beam search's length normalisation.
        #[arg(long, default_value_t = 1.0)]
        length_penalty: f64,
        /// Never repeat an n-gram of this length (prompt included; 0: off).
        #[arg(long, default_value_t = 0)]
        no_repeat_ngram: usize,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Export trained tensors: the source model with every adapter folded into its weight
    /// (same graph, new weights) and/or a Hugging Face peft adapter folder.
    /// Example: `bidora export run/artifact --tensors run/sst2/final.safetensors
    /// --merged merged.onnx --peft peft_adapter/`.
    Export {
        /// The artifact folder written by bidora-compile.
        artifact: PathBuf,
        /// The trained tensors (`final.safetensors` or `best.safetensors` of a run, or the
        /// artifact's `init.safetensors`). Example: `--tensors run/sst2/final.safetensors`.
        #[arg(long)]
        tensors: PathBuf,
        /// Write the merged ONNX model here. Example: `--merged merged.onnx`.
        #[arg(long, value_name = "FILE")]
        merged: Option<PathBuf>,
        /// Write a peft adapter folder here. Example: `--peft out/adapter`.
        #[arg(long, value_name = "DIR")]
        peft: Option<PathBuf>,
        /// The model the artifact was compiled from, instead of the path its manifest
        /// recorded. Example: `--model models/roberta_legacy17.onnx`.
        #[arg(long)]
        model: Option<PathBuf>,
        /// `base_model_name_or_path` for adapter_config.json. Example:
        /// `--base-model FacebookAI/roberta-base`.
        #[arg(long)]
        base_model: Option<String>,
        /// Replace existing outputs.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct EngineArgs {
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
}

impl EngineArgs {
    fn options(self) -> Result<(BackendKind, BackendOptions)> {
        if let Ok(cores) = std::thread::available_parallelism() {
            // Far past the cores, starting the pools alone takes minutes and gigabytes.
            let most = cores.get().saturating_mul(MAX_THREADS_PER_CORE);
            if self.threads > most {
                anyhow::bail!(
                    "--threads {} is not allowed: this process may use {} cores, and more than \
                     {most} threads ({MAX_THREADS_PER_CORE} a core) only take turns on them; \
                     give at most the core count (0 uses every core)",
                    self.threads,
                    cores.get()
                );
            }
            if self.threads > cores.get() {
                eprintln!(
                    "warning: --threads {} is more than the {} cores this process may use; \
                     the threads then take turns on them, which is slower, not faster (0 \
                     uses every core)",
                    self.threads,
                    cores.get()
                );
            }
        }
        Ok((
            self.backend,
            BackendOptions {
                threads: self.threads,
                device: self.device,
                ort_lib: self.ort_lib,
            },
        ))
    }
}

fn analyze_cmd(
    sweep: Option<&std::path::Path>,
    artifact: Option<&std::path::Path>,
    tensors: &[PathBuf],
    model: Option<&std::path::Path>,
    output: Option<&std::path::Path>,
) -> Result<()> {
    use bidora_runtime::analyze;
    let (inputs, out) = match (sweep, artifact) {
        (Some(dir), _) => (
            analyze::sweep_inputs(dir)?,
            output.unwrap_or(dir).to_path_buf(),
        ),
        (None, Some(a)) => (
            tensors
                .iter()
                .map(|t| analyze::Input {
                    artifact: a.to_path_buf(),
                    tensors: t.clone(),
                    label: "run".to_string(),
                    seed: None,
                })
                .collect(),
            output
                .map(|o| o.to_path_buf())
                .context("pass -o DIR for the analysis files")?,
        ),
        (None, None) => anyhow::bail!("pass a sweep folder, or --artifact with --tensors"),
    };
    if inputs.is_empty() {
        anyhow::bail!("no finished runs with tensors to analyse");
    }
    // Each artifact's manifest and source model once, however many runs used it.
    let mut sources: std::collections::HashMap<PathBuf, analyze::Source> = Default::default();
    let mut pts = vec![];
    for i in &inputs {
        let src = match sources.entry(i.artifact.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(analyze::Source::open(&i.artifact, model)?)
            }
        };
        pts.extend(analyze::points(src, &i.tensors, &i.label, i.seed)?);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut jsonl = String::new();
    for p in &pts {
        jsonl.push_str(&serde_json::to_string(p)?);
        jsonl.push('\n');
    }
    std::fs::write(out.join("analysis.jsonl"), jsonl)
        .with_context(|| format!("writing {}/analysis.jsonl", out.display()))?;
    let md = analyze::markdown(&pts);
    std::fs::write(out.join("analysis.md"), &md)
        .with_context(|| format!("writing {}/analysis.md", out.display()))?;
    analyze::plot(&pts, &out.join("analysis.svg"))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{md}")?;
    writeln!(
        stdout,
        "analysis: {0}/analysis.md, {0}/analysis.jsonl, {0}/analysis.svg",
        out.display()
    )?;
    Ok(())
}

fn sweep_cmd(
    file: &std::path::Path,
    out: &std::path::Path,
    jobs: usize,
    e: EngineArgs,
) -> Result<()> {
    use bidora_runtime::sweep::{report, RunOptions, Sweep};
    let sweep = Sweep::load(file, out)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!(
        "sweep: {} cells ({} methods and ablations × {} seeds), {} artifacts, into {}",
        sweep.cells.len(),
        sweep.cells.len() / sweep.cfg.seeds.len(),
        sweep.cfg.seeds.len(),
        sweep.artifacts.len(),
        out.display()
    );
    sweep.compile()?;
    let mut engine_args = vec![
        "--backend".to_string(),
        match e.backend {
            BackendKind::Auto => "auto",
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        }
        .to_string(),
        "--device".into(),
        e.device.to_string(),
    ];
    if let Some(lib) = &e.ort_lib {
        engine_args.push("--ort-lib".into());
        engine_args.push(lib.display().to_string());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = RunOptions {
        jobs,
        threads: if e.threads == 0 { cores } else { e.threads },
        engine_args,
        progress: true,
    };
    let records = sweep.run(&opts)?;
    let title = format!("Sweep {}", file.display());
    report::write_all(&records, out, &title)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", report::markdown(&records, &title))?;
    writeln!(
        stdout,
        "results: {0}/results.md, {0}/results.jsonl, {0}/results.svg",
        out.display()
    )?;
    let failed = records.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} cells failed (see results.md)",
            records.len()
        );
    }
    Ok(())
}

/// `--threads` above this many a core is refused rather than warned about.
const MAX_THREADS_PER_CORE: usize = 16;

/// What `bidora train` was asked to run, apart from the engine and the communicator.
struct TrainArgs<'a> {
    artifact: &'a std::path::Path,
    config: &'a std::path::Path,
    output: &'a std::path::Path,
    set: &'a [String],
    resume: bool,
    /// `--resident` / `--no-resident`; `None`: resident on a device, not on the CPU.
    resident: Option<bool>,
}

fn train_cmd(
    args: TrainArgs<'_>,
    engine: EngineArgs,
    comm: &dyn bidora_runtime::distributed::Communicator,
) -> Result<()> {
    use bidora_runtime::train::{dataset, TrainConfig, Trainer};
    let TrainArgs {
        artifact,
        config,
        output,
        set,
        resume,
        resident,
    } = args;
    let (rank, size) = (comm.rank(), comm.size());
    let lead = rank == 0;
    if size > 1 && lead {
        eprintln!("distributed: {} ranks ({})", size, comm.describe());
    }
    let art = Artifact::open(artifact)?;
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let saved = output.join("config.toml");
    let cfg = if size > 1 && !lead {
        // Rank 0 resolves the config (a resume's is in its run folder, which only rank 0
        // reads); the others take its result.
        let mut bytes = vec![];
        comm.broadcast(&mut bytes)?;
        let text = String::from_utf8(bytes).context("rank 0's config is not UTF-8")?;
        TrainConfig::parse(&text, "rank 0's resolved config", &[])?
    } else if resume && saved.exists() {
        let first = std::fs::read_to_string(&saved)
            .with_context(|| format!("cannot read {}", saved.display()))?;
        let (cfg, changed) = TrainConfig::for_resume(
            &first,
            &saved.display().to_string(),
            &text,
            &config.display().to_string(),
            set,
        )?;
        if !changed.is_empty() {
            eprintln!(
                "warning: --resume continues with {}, the config the run started with; {} \
                 differs from it in {} (not applied)",
                saved.display(),
                config.display(),
                changed.join(", ")
            );
        }
        cfg
    } else {
        TrainConfig::parse(&text, &config.display().to_string(), set)?
    };
    if size > 1 && lead {
        comm.broadcast(&mut cfg.to_toml().into_bytes())?;
    }
    // Before anything is allocated: a batch or rank that cannot fit would abort the process.
    bidora_runtime::train::resources::check(&cfg, &art, bidora_compiler::memory::available())?;
    let (kind, opts) = engine.options()?;
    let engine = backend::select(kind, &opts).context("choosing the backend")?;
    if lead {
        eprintln!("backend: {}", engine.description());
    }
    let spec = dataset::ModelSpec::of(&art)?;
    if cfg.data.format == "e2e" && !spec.inputs.iter().any(|i| i == "labels") {
        eprintln!(
            "warning: the artifact's causal-lm head reads no `labels`, so the E2E prompts are \
             scored as well as the references; compile with `--lm-labels` to score only the \
             references"
        );
    }
    let base = config.parent().unwrap_or(std::path::Path::new("."));
    let data = dataset::load_for(&cfg.data, base, &spec, cfg.val_ratio, cfg.seed)?;
    if lead {
        eprintln!(
            "data: {} training, {} validation{} examples",
            data.train_idx.len(),
            data.val_idx.len(),
            data.test
                .as_ref()
                .map(|t| format!(", {} test", t.len()))
                .unwrap_or_default()
        );
    }
    if size > 1 && resident == Some(true) {
        anyhow::bail!(
            "--resident: data-parallel runs reduce host gradients, so they are not resident \
             yet; drop --resident (with --device cuda they run with --no-resident)"
        );
    }
    let mut trainer = Trainer::new_distributed(cfg, &art, &*engine, data, output, resume, comm)?;
    if size == 1 && resident.unwrap_or(opts.device != backend::Device::Cpu) {
        eprintln!("resident: tensors, gradients and AdamW moments stay in the backend's memory");
        trainer = trainer.resident(&*engine)?;
    }
    let summary = trainer.run_to_end(None)?.expect("runs to the end");
    if !lead {
        return Ok(());
    }
    let show = |s: &Option<bidora_runtime::train::eval::Scores>| {
        s.as_ref()
            .map(|s| {
                s.metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .chain(std::iter::once(format!("loss {:.4}", s.loss)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "-".into())
    };
    let mut out = std::io::stdout();
    writeln!(
        out,
        "finished in {:.1} s: {}",
        summary.seconds,
        output.display()
    )?;
    writeln!(out, "  validation: {}", show(&summary.final_val))?;
    writeln!(out, "  test:       {}", show(&summary.final_test))?;
    writeln!(
        out,
        "  tensors: {}/final.safetensors (best on validation: best.safetensors); curves: {}/curves.svg",
        output.display(),
        output.display()
    )?;
    Ok(())
}

fn memory_cmd(dir: &std::path::Path, batch: usize, seq: usize) -> Result<()> {
    use bidora_compiler::memory::{human, plan};
    let art = Artifact::open(dir)?;
    // Sizes inference could not name (a sum such as `sequence - 1` of the causal LM's shifted
    // labels) are counted at the sequence length: an upper bound for those slices.
    let opaque = std::cell::Cell::new(0usize);
    let bind = |s: &str| -> Option<i64> {
        if s.ends_with("batch") {
            Some(batch as i64)
        } else if s.ends_with("sequence") {
            Some(seq as i64)
        } else if s.starts_with('?') {
            opaque.set(opaque.get() + 1);
            Some(seq as i64)
        } else {
            None
        }
    };
    let trainable: u64 = art.init.iter().map(|(_, a)| 4 * a.len() as u64).sum();
    let mut weights: std::collections::HashMap<String, u64> = Default::default();
    let mut rows = vec![];
    for (key, prog) in &art.manifest.programs {
        let path = art.dir.join(&prog.file);
        let model = bidora_compiler::load_model(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (name, t) in &model.graph.initializers {
            weights.insert(name.clone(), t.raw().map_or(0, |r| r.len() as u64));
        }
        let m = plan(&model, &bind).with_context(|| format!("planning {}", path.display()))?;
        rows.push((*key, m));
    }
    let w: u64 = weights.values().sum();
    let mut out = std::io::stdout();
    writeln!(out, "{}: batch {batch} x sequence {seq}", dir.display())?;
    writeln!(
        out,
        "  constants, each once (frozen weights): {}",
        human(w as f64)
    )?;
    writeln!(
        out,
        "  trainable tensors {} (+ gradients, AdamW m and v: 4 x = {})",
        human(trainable as f64),
        human(4.0 * trainable as f64)
    )?;
    let mut worst = 0u64;
    for (key, m) in &rows {
        worst = worst.max(m.inputs + m.peak_values);
        writeln!(
            out,
            "  {key:<11} inputs {:>10}  peak of live values {:>10}  largest value {:>10}{}",
            human(m.inputs as f64),
            human(m.peak_values as f64),
            human(m.largest_value as f64),
            if m.unknown_values > 0 {
                format!(
                    "  ({} values of unknown size counted as 0, e.g. {})",
                    m.unknown_values,
                    m.unknown_examples.join("; ")
                )
            } else {
                String::new()
            }
        )?;
    }
    writeln!(
        out,
        "  device memory for a run (weights + 4 x trainable + the largest program): {}",
        human((w + 4 * trainable + worst) as f64)
    )?;
    if opaque.get() > 0 {
        writeln!(
            out,
            "  ({} sizes without a name, e.g. sequence - 1, were counted as the sequence length)",
            opaque.get()
        )?;
    }
    Ok(())
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
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{} (from {})",
        dir.display(),
        art.manifest.source_model
    )?;
    writeln!(out, "backend: {}", engine.description())?;
    for (key, prog) in &art.manifest.programs {
        let inputs = art.example_inputs(prog, batch, seq)?;
        let path = art.dir.join(&prog.file);
        let t = std::time::Instant::now();
        let mut program = engine.load(&path)?;
        let outs = program.run(&inputs)?;
        writeln!(
            out,
            "  {key} ({}): ran in {:.3} s",
            prog.file,
            t.elapsed().as_secs_f64()
        )?;
        // What was fed: each independent batch gets its own sizes (see example_inputs).
        for (sig, (_, t)) in prog.inputs.iter().zip(&inputs) {
            if matches!(sig.role, Role::Data | Role::Label) {
                writeln!(out, "    {:<9} {} {:?}", "input", sig.name, t.shape())?;
            }
        }
        for (sig, o) in prog.outputs.iter().zip(&outs) {
            let (shape, first) = match o {
                HostTensor::F32(a) => (a.shape().to_vec(), a.iter().next().map(|v| *v as f64)),
                HostTensor::F64(a) => (a.shape().to_vec(), a.iter().next().copied()),
                HostTensor::I64(a) => (a.shape().to_vec(), a.iter().next().map(|v| *v as f64)),
            };
            let value = if sig.role == Role::Loss {
                format!(" = {:.6}", first.unwrap_or(f64::NAN))
            } else {
                String::new()
            };
            writeln!(
                out,
                "    {:<9} {} {:?}{value}",
                sig.role.name(),
                sig.name,
                shape
            )?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn export_cmd(
    artifact: &std::path::Path,
    tensors: &std::path::Path,
    merged: Option<&std::path::Path>,
    peft: Option<&std::path::Path>,
    model: Option<&std::path::Path>,
    base_model: Option<String>,
    force: bool,
) -> Result<()> {
    use bidora_compiler::export;
    if merged.is_none() && peft.is_none() {
        anyhow::bail!("nothing to export: pass --merged FILE and/or --peft DIR");
    }
    let report = export::run(&export::ExportJob {
        artifact,
        tensors,
        model,
        merged,
        peft,
        peft_options: export::PeftOptions { base_model },
        force,
    })
    .with_context(|| format!("cannot export {}", artifact.display()))?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let mut out = std::io::stdout();
    writeln!(
        out,
        "exported {} adapters{} from {} (model {})",
        report.adapters,
        if report.heads > 0 {
            format!(" and {} head tensors", report.heads)
        } else {
            String::new()
        },
        tensors.display(),
        report.model.display()
    )?;
    if let Some(m) = merged {
        writeln!(out, "  merged model: {}", m.display())?;
    }
    if let Some(p) = peft {
        writeln!(out, "  peft adapter: {}", p.display())?;
    }
    Ok(())
}

struct GenerateArgs {
    tensors: PathBuf,
    tokenizer: PathBuf,
    prompts: Vec<String>,
    opts: bidora_runtime::generate::GenerateOptions,
}

fn generate_cmd(artifact: &std::path::Path, a: GenerateArgs, engine: EngineArgs) -> Result<()> {
    use bidora_runtime::data::tokenize::Encoder;
    use bidora_runtime::generate::{continuations, ProgramLm};
    let art = Artifact::open(artifact)?;
    let sig = art
        .manifest
        .program(ProgramKey::Forward)
        .with_context(|| format!("{} has no forward.onnx", artifact.display()))?;
    if a.prompts.is_empty() {
        anyhow::bail!("no prompt: give --prompt TEXT or --prompts FILE");
    }
    let enc = Encoder::from_spec(
        &a.tokenizer.display().to_string(),
        std::path::Path::new("."),
        usize::MAX,
    )?;
    let eos = enc.eos()?;
    let decoder = enc.decoder([]);
    let tensors = bidora_runtime::train::checkpoint::read_safetensors(&a.tensors)?;
    let (kind, opts) = engine.options()?;
    let engine = backend::select(kind, &opts).context("choosing the backend")?;
    eprintln!("backend: {}", engine.description());
    let mut program = engine.load(&art.dir.join(&sig.file))?;
    let want: Vec<String> = program.input_names().to_vec();
    let fixed: Vec<(String, HostTensor)> = tensors
        .into_iter()
        .filter(|(n, _)| want.contains(n))
        .map(|(n, t)| (n, HostTensor::F32(t)))
        .collect();
    let missing: Vec<&String> = want
        .iter()
        .filter(|n| *n != "input_ids" && *n != "attention_mask")
        .filter(|n| !fixed.iter().any(|(f, _)| f == *n))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "{} lacks tensor(s) {} that forward.onnx reads (a run of another artifact?)",
            a.tensors.display(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let logits = sig.outputs[0].name.clone();
    let mut lm = ProgramLm::new(&mut *program, fixed, &logits, enc.pad())?.pad_to_multiple_of(16);
    let opts = bidora_runtime::generate::GenerateOptions {
        eos: Some(eos),
        ..a.opts
    };
    let ids: Vec<Vec<i64>> = a
        .prompts
        .iter()
        .map(|p| {
            enc.encode_plain(p)
                .map_err(|e| anyhow::anyhow!("prompt '{p}': {e}"))
        })
        .collect::<Result<_>>()?;
    if let Some((p, _)) = a.prompts.iter().zip(&ids).find(|(_, i)| i.is_empty()) {
        anyhow::bail!("prompt '{p}' has no tokens");
    }
    let mut out = std::io::stdout();
    for t in continuations(&mut lm, &ids, &opts, ids.len())? {
        writeln!(out, "{}", decoder.decode(&t).map_err(anyhow::Error::msg)?)?;
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
            engine,
        } => engine
            .options()
            .and_then(|(kind, opts)| check(&artifact, batch, seq, kind, &opts)),
        Cmd::Memory {
            artifact,
            batch,
            seq,
        } => memory_cmd(&artifact, batch, seq),
        Cmd::Analyze {
            sweep,
            artifact,
            tensors,
            model,
            output,
        } => analyze_cmd(
            sweep.as_deref(),
            artifact.as_deref(),
            &tensors,
            model.as_deref(),
            output.as_deref(),
        ),
        Cmd::Sweep {
            file,
            output,
            jobs,
            engine,
        } => sweep_cmd(&file, &output, jobs, engine),
        Cmd::Train {
            artifact,
            config,
            output,
            set,
            resume,
            resident,
            no_resident,
            distributed,
            engine,
        } => (|| {
            use bidora_runtime::distributed::{self, Kind};
            let comm = distributed::connect(distributed.map(|d| match d {
                Distributed::Mpi => Kind::Mpi,
                Distributed::Nccl => Kind::Nccl,
            }))?;
            let args = TrainArgs {
                artifact: &artifact,
                config: &config,
                output: &output,
                set: &set,
                resume,
                resident: match (resident, no_resident) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            let res = train_cmd(args, engine, &*comm);
            if let (Err(e), true) = (&res, comm.size() > 1) {
                // Returning would finalise MPI while the other ranks wait in a collective
                // for this one: end them all instead, after saying why.
                eprintln!("error: rank {} of {}: {e:#}", comm.rank(), comm.size());
                comm.abort(1);
            }
            res
        })(),
        Cmd::Generate {
            artifact,
            tensors,
            tokenizer,
            mut prompt,
            prompts,
            max_new_tokens,
            beam_width,
            length_penalty,
            no_repeat_ngram,
            engine,
        } => (|| {
            if let Some(f) = &prompts {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                prompt.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(String::from),
                );
            }
            generate_cmd(
                &artifact,
                GenerateArgs {
                    tensors,
                    tokenizer,
                    prompts: prompt,
                    opts: bidora_runtime::generate::GenerateOptions {
                        max_new_tokens,
                        eos: None,
                        beam_width,
                        length_penalty,
                        no_repeat_ngram,
                    },
                },
                engine,
            )
        })(),
        Cmd::Export {
            artifact,
            tensors,
            merged,
            peft,
            model,
            base_model,
            force,
        } => export_cmd(
            &artifact,
            &tensors,
            merged.as_deref(),
            peft.as_deref(),
            model.as_deref(),
            base_model,
            force,
        ),
    };
    bidora_compiler::cli_exit::exit_code(res)
}
