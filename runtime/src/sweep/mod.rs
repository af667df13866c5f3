//! `bidora sweep`: LoRA vs DoRA vs BiDoRA (and ablations) on one task, over seeds, from one
//! file. The sweep compiles each artifact it needs once, runs every cell as its own
//! `bidora train` process (so a failing cell is reported, not fatal, and each cell's peak RSS
//! is its own), skips finished cells and resumes a killed one on a rerun, and writes
//! `results.jsonl` (one line per cell), `results.md` (means ± standard deviations, the
//! paired BiDoRA − DoRA difference with a 95 % interval, time per method against LoRA) and
//! `results.svg` (test metric against wall-clock per method, like the paper's Figure 4).
//!
//! Equal footing, as the paper compares: every method sees the same training file. BiDoRA
//! splits it 8:2 (direction on one part, magnitudes on the other, then retrains on both);
//! the baselines train on all of it (`val_ratio = 0`). Every method is scored on the test
//! split with its final tensors. `budget = "examples"` (default) gives the baselines as many
//! optimiser steps as BiDoRA's run has batches (search: `steps · (unroll_steps + 1)`, plus
//! the retrain's); `budget = "steps"` as many as BiDoRA's lower level takes
//! (`steps · unroll_steps + retrain_steps`).

pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::train::{Method, TrainConfig};

/// The sweep file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The base training config every cell starts from (relative to the sweep file).
    pub config: PathBuf,
    /// The model to compile (relative to the sweep file).
    pub model: PathBuf,
    /// `--target` patterns. Example: `["query,value"]`.
    pub targets: Vec<String>,
    /// `--task`. Example: `"seq-cls"`.
    pub task: String,
    #[serde(default)]
    pub train_head: bool,
    #[serde(default = "default_rank")]
    pub rank: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// BiDoRA's hypergradient estimator (`--hypergrad`).
    #[serde(default = "default_hypergrad")]
    pub hypergrad: String,
    /// `lora`, `dora`, `bidora`.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// `examples` or `steps` (module docs).
    #[serde(default = "default_budget")]
    pub budget: String,
    /// `--set` overrides for every cell.
    #[serde(default)]
    pub set: Vec<String>,
    /// Extra BiDoRA variants, each run over every seed.
    #[serde(default)]
    pub ablations: Vec<Ablation>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ablation {
    /// The row label. Example: `"bidora xi=0"`.
    pub name: String,
    /// `--set` overrides on top of the BiDoRA cell's. Example: `["xi=0"]`.
    #[serde(default)]
    pub set: Vec<String>,
    /// Another hypergradient estimator (compiles one more artifact).
    pub hypergrad: Option<String>,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f32 {
    16.0
}
fn default_hypergrad() -> String {
    "fd".into()
}
fn default_methods() -> Vec<String> {
    vec!["lora".into(), "dora".into(), "bidora".into()]
}
fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}
fn default_budget() -> String {
    "examples".into()
}

/// One run of the grid.
#[derive(Clone, Debug)]
pub struct Cell {
    /// Row label: the method, or an ablation's name.
    pub label: String,
    pub method: Method,
    pub seed: u64,
    /// Artifact key (see [`Sweep::artifacts`]).
    pub artifact: String,
    pub set: Vec<String>,
}

impl Cell {
    /// The cell's folder name: its label made safe for a path, and the seed.
    pub fn dir_name(&self) -> String {
        let safe: String = self
            .label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{safe}-seed{}", self.seed)
    }
}

/// How the cells run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Cells at once.
    pub jobs: usize,
    /// Threads for all running cells together (split between them).
    pub threads: usize,
    /// `--backend` and friends passed to every `bidora train`.
    pub engine_args: Vec<String>,
    pub progress: bool,
}

pub struct Sweep {
    pub cfg: SweepConfig,
    /// The sweep file's folder: relative paths in it start there.
    pub base: PathBuf,
    pub out: PathBuf,
    /// The base config with the sweep's `set` applied (for the budget arithmetic).
    pub base_train: TrainConfig,
    /// Artifact key → (method, hypergrad).
    pub artifacts: BTreeMap<String, (String, String)>,
    pub cells: Vec<Cell>,
}

impl Sweep {
    pub fn load(file: &Path, out: &Path) -> Result<Sweep> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let cfg: SweepConfig = toml::from_str(&text)
            .with_context(|| format!("{}: not a valid sweep", file.display()))?;
        let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let cfg_path = base.join(&cfg.config);
        let train_text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read the base config {}", cfg_path.display()))?;
        let base_train = TrainConfig::parse(&train_text, &cfg_path.display().to_string(), &cfg.set)
            .with_context(|| {
                format!("{}: the base config with the sweep's `set`", file.display())
            })?;
        if cfg.seeds.is_empty() {
            bail!("{}: `seeds` is empty", file.display());
        }
        if !["examples", "steps"].contains(&cfg.budget.as_str()) {
            bail!(
                "{}: budget = {:?}: use \"examples\" or \"steps\"",
                file.display(),
                cfg.budget
            );
        }
        let mut artifacts = BTreeMap::new();
        let mut cells = vec![];
        let s = base_train.steps;
        let u = base_train.unroll_steps.max(1);
        let r = base_train.retrain_steps;
        let baseline_steps = match cfg.budget.as_str() {
            "examples" => s * (u + 1) + r,
            _ => s * u + r,
        };
        for m in &cfg.methods {
            let (method, key) = match m.as_str() {
                "lora" => (Method::Lora, "lora".to_string()),
                "dora" => (Method::Dora, format!("dora-{}", cfg.hypergrad)),
                "bidora" => (Method::Bidora, format!("dora-{}", cfg.hypergrad)),
                other => bail!(
                    "{}: method {other:?}: use \"lora\", \"dora\" or \"bidora\"",
                    file.display()
                ),
            };
            let kind = if method == Method::Lora {
                "lora"
            } else {
                "dora"
            };
            artifacts.insert(key.clone(), (kind.to_string(), cfg.hypergrad.clone()));
            for &seed in &cfg.seeds {
                let mut set = cfg.set.clone();
                set.push(format!("method={m}"));
                set.push(format!("seed={seed}"));
                if method != Method::Bidora {
                    set.push(format!("steps={baseline_steps}"));
                    set.push("retrain_steps=0".into());
                    set.push("val_ratio=0".into());
                }
                cells.push(Cell {
                    label: m.clone(),
                    method,
                    seed,
                    artifact: key.clone(),
                    set,
                });
            }
        }
        for a in &cfg.ablations {
            let h = a.hypergrad.clone().unwrap_or_else(|| cfg.hypergrad.clone());
            let key = format!("dora-{h}");
            artifacts.insert(key.clone(), ("dora".into(), h));
            for &seed in &cfg.seeds {
                let mut set = cfg.set.clone();
                set.push("method=bidora".into());
                set.push(format!("seed={seed}"));
                set.extend(a.set.iter().cloned());
                cells.push(Cell {
                    label: a.name.clone(),
                    method: Method::Bidora,
                    seed,
                    artifact: key.clone(),
                    set,
                });
            }
        }
        // Every cell's settings must parse before anything runs.
        for c in &cells {
            TrainConfig::parse(&train_text, &cfg_path.display().to_string(), &c.set)
                .with_context(|| format!("cell {}: its settings", c.dir_name()))?;
        }
        Ok(Sweep {
            cfg,
            base,
            out: out.to_path_buf(),
            base_train,
            artifacts,
            cells,
        })
    }

    fn artifact_dir(&self, key: &str) -> PathBuf {
        self.out.join("artifacts").join(key)
    }

    /// Compiles each artifact the cells need, unless its folder is already complete.
    pub fn compile(&self) -> Result<()> {
        use bidora_compiler::{bilevel, heads, pipeline, regularizer, rewrite, targets};
        let model_path = self.base.join(&self.cfg.model);
        let mut model = None;
        for (key, (kind, hypergrad)) in &self.artifacts {
            let dir = self.artifact_dir(key);
            if dir.join(bidora_compiler::artifact::MANIFEST).is_file() {
                continue;
            }
            let model = match &model {
                Some(m) => m,
                None => model.insert(
                    bidora_compiler::load_model(&model_path)
                        .with_context(|| format!("cannot load {}", model_path.display()))?,
                ),
            };
            let task = match self.cfg.task.as_str() {
                "seq-cls" => heads::Task::SeqCls,
                "regression" => heads::Task::Regression,
                "multi-label" => heads::Task::MultiLabel,
                "token-cls" => heads::Task::TokenCls,
                "causal-lm" => heads::Task::CausalLm,
                other => bail!("task {other:?} is not one of seq-cls, regression, multi-label, token-cls, causal-lm"),
            };
            let method = if kind == "lora" {
                rewrite::Method::Lora
            } else {
                rewrite::Method::Dora
            };
            let bilevel = (method == rewrite::Method::Dora)
                .then(|| {
                    bilevel::Hypergrad::parse(hypergrad)
                        .map(|h| pipeline::BilevelOptions {
                            hypergrad: h,
                            regularizer: regularizer::RegVariant::Paper,
                        })
                        .with_context(|| format!("hypergrad {hypergrad:?} is not a mode"))
                })
                .transpose()?;
            let opts = pipeline::CompileOptions {
                targets: targets::TargetSpec::parse(&self.cfg.targets, None)?,
                adapter: rewrite::AdapterConfig {
                    method,
                    rank: self.cfg.rank,
                    alpha: self.cfg.alpha,
                    rslora: false,
                    detach_norm: false,
                    seed: 0,
                },
                task: Some(task),
                train_head: self.cfg.train_head,
                bilevel,
                lm_labels: false,
            };
            let c = pipeline::compile(model, &opts)
                .with_context(|| format!("compiling {} ({key})", model_path.display()))?;
            let name = model_path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let mut art = pipeline::artifact(&c, &name, &opts);
            // Recorded so that `bidora analyze` and `bidora export` find the weights.
            art.manifest.source_model_path = std::path::absolute(&model_path)
                .ok()
                .map(|p| p.display().to_string());
            let fp = bidora_compiler::provenance::fingerprint(model);
            bidora_compiler::artifact::write_with_fingerprint(&art, &dir, true, Some(&fp))
                .with_context(|| format!("writing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Runs every unfinished cell, `opts.jobs` at a time; returns each cell's record.
    pub fn run(&self, opts: &RunOptions) -> Result<Vec<report::Record>> {
        let cells_dir = self.out.join("cells");
        std::fs::create_dir_all(&cells_dir)
            .with_context(|| format!("cannot create {}", cells_dir.display()))?;
        let exe = std::env::current_exe().context("finding the bidora executable")?;
        let jobs = opts.jobs.max(1);
        let threads = (opts.threads / jobs).max(1);
        let mut records: Vec<Option<report::Record>> = vec![None; self.cells.len()];
        let mut todo = vec![];
        for (k, c) in self.cells.iter().enumerate() {
            let dir = cells_dir.join(c.dir_name());
            match report::Record::finished(c, &dir) {
                Some(r) => records[k] = Some(r),
                None => todo.push(k),
            }
        }
        let bar = if opts.progress {
            indicatif::ProgressBar::new(self.cells.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "cells [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_position((self.cells.len() - todo.len()) as u64);
        let mut running: Vec<(usize, Child, Instant)> = vec![];
        let mut queue = todo.into_iter();
        loop {
            while running.len() < jobs {
                let Some(k) = queue.next() else { break };
                let c = &self.cells[k];
                let dir = cells_dir.join(c.dir_name());
                let child = self.spawn(&exe, c, &dir, threads, &opts.engine_args)?;
                running.push((k, child, Instant::now()));
            }
            if running.is_empty() {
                break;
            }
            let names: Vec<String> = running
                .iter()
                .map(|(k, _, _)| self.cells[*k].dir_name())
                .collect();
            bar.set_message(names.join(", "));
            let mut i = 0;
            while i < running.len() {
                let (k, child, start) = &mut running[i];
                match wait_child(child)? {
                    None => i += 1,
                    Some((ok, rss_kb)) => {
                        let c = &self.cells[*k];
                        let dir = cells_dir.join(c.dir_name());
                        let secs = start.elapsed().as_secs_f64();
                        let rec = report::Record::after_run(c, &dir, ok, secs, rss_kb);
                        std::fs::write(dir.join("cell.json"), serde_json::to_vec_pretty(&rec)?)
                            .with_context(|| format!("writing {}/cell.json", dir.display()))?;
                        if !ok {
                            bar.println(format!(
                                "cell {} failed: see {}",
                                c.dir_name(),
                                dir.join("log.txt").display()
                            ));
                        }
                        records[*k] = Some(rec);
                        bar.inc(1);
                        running.swap_remove(i);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bar.finish_and_clear();
        Ok(records.into_iter().flatten().collect())
    }

    fn spawn(
        &self,
        exe: &Path,
        c: &Cell,
        dir: &Path,
        threads: usize,
        engine_args: &[String],
    ) -> Result<Child> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let run = dir.join("run");
        // A cell killed after its first checkpoint resumes; one killed before starts again.
        let resume = run.join("checkpoints").join("latest").exists();
        if !resume && run.exists() {
            std::fs::remove_dir_all(&run)
                .with_context(|| format!("cannot clear {}", run.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))
            .with_context(|| format!("cannot open {}/log.txt", dir.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("train")
            .arg(self.artifact_dir(&c.artifact))
            .arg("--config")
            .arg(self.base.join(&self.cfg.config))
            .arg("-o")
            .arg(dir.join("run"))
            .arg("--threads")
            .arg(threads.to_string())
            .args(engine_args);
        if resume {
            // The run keeps the settings it started with (config.toml in its folder).
            cmd.arg("--resume");
        } else {
            for s in &c.set {
                cmd.arg("--set").arg(s);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("starting {} for cell {}", exe.display(), c.dir_name()))
    }
}

/// A cell outlives a killed sweep otherwise: it goes on training, holds its run folder's
/// lock, and the rerun's resume of that cell is refused. Linux kills the cell with the sweep
/// (the cell's checkpoints are written atomically, so the rerun resumes from the last one).
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions (called here, in the sweep).
    let sweep = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only prctl,
    // getppid and _exit, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The sweep died between fork and prctl: the signal will never come.
            if libc::getppid() != sweep {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// The child's exit (success, peak RSS in KiB) once it has ended, without blocking.
fn wait_child(child: &mut Child) -> Result<Option<(bool, u64)>> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is a child of this process that has not been reaped (Child::wait is never
    // called on it); status and usage point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    if r == 0 {
        return Ok(None);
    }
    if r < 0 {
        bail!(
            "waiting for cell process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok(Some((ok, usage.ru_maxrss.max(0) as u64)))
}
