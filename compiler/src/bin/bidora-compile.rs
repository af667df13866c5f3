//! `bidora-compile`: ONNX model in, artifact folder out. See `--help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bidora_compiler::bilevel::Hypergrad;
use bidora_compiler::heads::Task;
use bidora_compiler::pipeline::{self, BilevelOptions, CompileOptions};
use bidora_compiler::regularizer::RegVariant;
use bidora_compiler::rewrite::{AdapterConfig, Method};
use bidora_compiler::targets::{self, TargetSpec};
use bidora_compiler::{artifact, cli_exit, dump, load_model};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum DumpStage {
    /// The model as read.
    Input,
    /// After the rewrite, with composite ai.bidora.DoRA / LoRA nodes.
    Adapted,
    /// The forward program as written (standard ONNX only).
    Forward,
}

/// Compile an ONNX model into BiDoRA programs: rewrite target linear ops into DoRA (or LoRA)
/// nodes and write an artifact folder (forward.onnx, init.safetensors, manifest.json; with
/// --task also train_step.onnx and eval.onnx, and with DoRA BiDoRA's lower.onnx and upper.onnx).
#[derive(Parser, Debug)]
#[command(
    name = "bidora-compile",
    version,
    after_help = "EXAMPLES:
  List the linear ops that can carry adapters:
    bidora-compile model.onnx --list-targets
  DoRA on the attention query and value projections, rank 8:
    bidora-compile model.onnx --target query,value --rank 8 --alpha 16 -o run/artifact
  The same with a classification loss and the training programs:
    bidora-compile model.onnx --target query,value --task seq-cls -o run/artifact
  GPT-2's fused c_attn, adapting only its q and v blocks:
    bidora-compile gpt2.onnx --target c_attn:q,v -o run/gpt2
  Modules chosen by a regular expression over module paths, plain LoRA:
    bidora-compile model.onnx --target-regex '.*layer\\.[01]\\..*(query|value)' --method lora -o out
  Print a graph as text (any ONNX file, or a stage of the rewrite):
    bidora-compile model.onnx --dump
    bidora-compile model.onnx --target query --dump adapted"
)]
struct Cli {
    /// The ONNX model to compile (external data is read from files beside it).
    model: PathBuf,

    /// Modules to adapt, peft-style: a module matches when its path equals a name or ends
    /// with `.name`. Comma-separated, repeatable. `c_attn:q,v` adapts only the q and v column
    /// blocks of a fused projection. Example: `--target query,value`.
    #[arg(long, value_name = "NAMES")]
    target: Vec<String>,

    /// Regular expression that must match a whole module path. Example:
    /// `--target-regex '.*\.attention\.self\.(query|value)'`.
    #[arg(long, value_name = "REGEX")]
    target_regex: Option<String>,

    /// Print every candidate linear op (module path, op, shape, weight layout) and exit.
    /// Example: `bidora-compile model.onnx --list-targets`.
    #[arg(long)]
    list_targets: bool,

    /// Adapter kind. Example: `--method lora`.
    #[arg(long, value_enum, default_value = "dora")]
    method: Method,

    /// LoRA rank r. Example: `--rank 8`.
    #[arg(long, default_value_t = 8)]
    rank: usize,

    /// LoRA alpha; the scaling is alpha/r (alpha/sqrt(r) with --rslora). Example: `--alpha 16`.
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,

    /// Rank-stabilised scaling alpha/sqrt(r). Example: `--rslora`.
    #[arg(long)]
    rslora: bool,

    /// DoRA only: treat the column norm as a constant in the backward pass (DoRA §4.3,
    /// peft's default). Example: `--detach-norm`.
    #[arg(long)]
    detach_norm: bool,

    /// Seed of the random initialisation of the A factors. Example: `--seed 42`.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Attach a loss head and emit the training programs train_step.onnx (loss and the
    /// gradient of every adapter tensor) and eval.onnx. Example: `--task seq-cls`.
    #[arg(long, value_enum)]
    task: Option<Task>,

    /// Also train the classifier head (modules named `classifier` or `score`), as peft's
    /// modules_to_save does; its weights become trainable inputs. Example: `--train-head`.
    #[arg(long)]
    train_head: bool,

    /// With --task causal-lm: read the targets from a `labels` input aligned with input_ids
    /// (-100 ignored, shifted by the loss), so a data-to-text prompt and padding are not
    /// scored; the `e2e` data format provides such labels. Example: `--lm-labels`.
    #[arg(long)]
    lm_labels: bool,

    /// BiDoRA's hypergradient estimator for upper.onnx (emitted with --task and DoRA):
    /// `fd` (the paper's central difference), `fd-forward` (one-sided, reuses the lower
    /// step's magnitude gradient), `exact` (double backward), `first-order` (ξ = 0),
    /// `betty` (the released code's: no virtual step). Example: `--hypergrad exact`.
    #[arg(long, value_enum, default_value = "fd")]
    hypergrad: Hypergrad,

    /// Orthogonality regulariser in lower.onnx: `paper` (squared Frobenius, summed) or
    /// `released` (the released code's unsquared mean). Example: `--regularizer released`.
    #[arg(long, value_enum, default_value = "paper")]
    regularizer: RegVariant,

    /// Emit only the single-level programs (train_step, eval), not BiDoRA's lower/upper.
    /// Example: `--no-bilevel`.
    #[arg(long)]
    no_bilevel: bool,

    /// Output artifact folder; written atomically. Example: `-o run/artifact`.
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,

    /// Compile a model whose weights hold NaN or infinity (refused otherwise: every output
    /// would be NaN). Example: `--allow-non-finite-weights`.
    #[arg(long)]
    allow_non_finite_weights: bool,

    /// Replace the output folder if it exists. Example: `--force`.
    #[arg(long)]
    force: bool,

    /// Print a stage as text instead of writing an artifact: `input` (default), `adapted`
    /// (composite DoRA/LoRA nodes) or `forward` (standard ONNX). Example: `--dump adapted`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "input", value_name = "STAGE")]
    dump: Option<DumpStage>,
}

fn run(cli: Cli) -> Result<()> {
    if !(cli.alpha.is_finite() && cli.alpha > 0.0) {
        anyhow::bail!(
            "--alpha {} is not allowed: the scaling alpha/rank needs a finite number > 0 \
             (peft's default is 2 x rank)",
            cli.alpha
        );
    }
    // Before the (slow) compile: an output folder over the input would delete the model.
    if let Some(out) = cli.output.as_deref().filter(|_| cli.model.exists()) {
        bidora_compiler::provenance::refuse_overlap("-o", out, &[("input model", &cli.model)])
            .map_err(anyhow::Error::msg)?;
    }
    let model =
        load_model(&cli.model).with_context(|| format!("cannot load {}", cli.model.display()))?;
    // Only when writing an artifact: listing or dumping such a model is how one finds out.
    if !cli.allow_non_finite_weights && cli.output.is_some() {
        if let Some((name, index, value)) = bidora_compiler::provenance::non_finite_weight(&model) {
            anyhow::bail!(
                "{}: weight '{}' holds {value} at index {index}; a model with non-finite \
                 weights trains and predicts NaN (pass --allow-non-finite-weights to compile \
                 it anyway)",
                cli.model.display(),
                bidora_compiler::printable(&name)
            );
        }
    }
    if cli.list_targets {
        let cands = targets::candidates(&model.graph);
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{} candidate linear ops in {}:",
            cands.len(),
            cli.model.display()
        )?;
        write!(
            out,
            "{}",
            bidora_compiler::printable_lines(&targets::format_candidates(&cands))
        )?;
        out.flush()?;
        return Ok(());
    }
    if cli.dump == Some(DumpStage::Input) {
        print_all(&dump::model(&model))?;
        return Ok(());
    }
    let opts = CompileOptions {
        targets: TargetSpec::parse(&cli.target, cli.target_regex.as_deref())?,
        adapter: AdapterConfig {
            method: cli.method,
            rank: cli.rank,
            alpha: cli.alpha,
            rslora: cli.rslora,
            detach_norm: cli.detach_norm,
            seed: cli.seed,
        },
        task: cli.task,
        train_head: cli.train_head,
        lm_labels: cli.lm_labels,
        bilevel: (cli.task.is_some() && cli.method == Method::Dora && !cli.no_bilevel).then_some(
            BilevelOptions {
                hypergrad: cli.hypergrad,
                regularizer: cli.regularizer,
            },
        ),
    };
    check_rank_fits(&model, &opts)?;
    let compiled = pipeline::compile(&model, &opts)
        .with_context(|| format!("cannot compile {}", cli.model.display()))?;
    match cli.dump {
        Some(DumpStage::Adapted) => {
            print_all(&dump::model(&compiled.adapted))?;
            return Ok(());
        }
        Some(DumpStage::Forward) => {
            print_all(&dump::model(&compiled.forward))?;
            return Ok(());
        }
        _ => {}
    }
    let out = cli
        .output
        .context("no output folder: pass -o DIR (or --list-targets / --dump to inspect)")?;
    let source = cli
        .model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut art = pipeline::artifact(&compiled, &source, &opts);
    // Recorded so that `bidora export` finds the model without `--model` on this machine.
    art.manifest.source_model_path = std::fs::canonicalize(&cli.model)
        .ok()
        .map(|p| p.to_string_lossy().to_string());
    let fingerprint = bidora_compiler::provenance::fingerprint(&model);
    artifact::write_with_fingerprint(&art, &out, cli.force, Some(&fingerprint))?;
    let files: Vec<&str> = art.programs.iter().map(|(f, _)| f.as_str()).collect();
    eprintln!(
        "wrote {} ({} adapters, {:?}, rank {}) to {}",
        files.join(", "),
        compiled.adapters.len(),
        opts.adapter.method,
        opts.adapter.rank,
        out.display()
    );
    Ok(())
}

/// Writes `text` to standard output; a closed pipe comes back as an error for
/// [`cli_exit::exit_code`] rather than a panic in `print!`.
fn print_all(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Refuses a rank whose adapter tensors cannot be held while compiling (about three copies:
/// the values, their serialised form and the init file's), before allocating any of them.
fn check_rank_fits(model: &bidora_compiler::ir::Model, opts: &CompileOptions) -> Result<()> {
    // A selection error is reported by the compile itself, with its listing.
    let Ok(selected) = targets::select(&model.graph, &opts.targets) else {
        return Ok(());
    };
    let per_rank: f64 = selected
        .iter()
        .map(|s| {
            let c = &s.candidate;
            match &s.blocks {
                Some(b) => b.len() as f64 * (c.in_features + c.out_features / 3) as f64,
                None => (c.in_features + c.out_features) as f64,
            }
        })
        .sum();
    let bytes = opts.adapter.rank as f64 * per_rank * 4.0;
    if let Some(avail) = bidora_compiler::memory::available() {
        if 3.0 * bytes > avail as f64 {
            let useful = selected
                .iter()
                .map(|s| s.candidate.in_features.min(s.candidate.out_features))
                .min()
                .unwrap_or(0);
            anyhow::bail!(
                "--rank {}: the adapters of the {} targets take {} (rank x sum of in + out \
                 features x 4 bytes), and compiling holds about 3 copies ({}), more than the \
                 {} this machine has available; lower --rank (above {useful}, the smallest \
                 target's min(in, out), a rank adds nothing)",
                opts.adapter.rank,
                selected.len(),
                bidora_compiler::memory::human(bytes),
                bidora_compiler::memory::human(3.0 * bytes),
                bidora_compiler::memory::human(avail as f64)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    cli_exit::exit_code(run(Cli::parse()))
}
