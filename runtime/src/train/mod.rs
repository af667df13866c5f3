//! The training loop: BiDoRA's schedule (search phase with lower and upper steps, then the
//! retrain phase) and the single-level baselines (DoRA, LoRA), over the artifact's programs.
//!
//! One iteration of the search phase (docs/design.md, "The two levels"):
//! 1. `unroll_steps` lower steps: `lower.onnx` on a training batch gives `g = ∇_V(L_tr + γR)`
//!    (and `∇_M L_tr`); AdamW moves V.
//! 2. Before the last lower step's update, `upper.onnx` takes that step's training batch, a
//!    validation batch and the same `g` (so the virtual step starts where the lower step
//!    does, and g is computed once), and gives the hypergradient of every magnitude; AdamW
//!    moves M.
//!
//! The retrain phase re-initialises A, B and the head (or keeps them, `retrain_from =
//! "search"`), freezes M and trains on train ∪ validation with the regulariser.
//!
//! Everything the loop does is a function of the config, the artifact and the data, so a run
//! is reproducible bit for bit on the same backend, and a resumed run (from any checkpoint)
//! equals the uninterrupted one: the checkpoint holds the tensors, both optimisers' moments,
//! the data streams' positions, the step counters and the metrics log's length.
//!
//! Data parallelism ([`Trainer::new_distributed`], `shard.rs`): every rank draws the same
//! global batches, runs the programs on its rows of them and the ranks sum their weighted
//! gradients before either optimiser steps, so every rank applies the same update to the
//! same tensors: the single process's run on the global batch, up to the order of the sums.
//! The upper level runs as its two phases (`upper_val`, reduce `h` and `v`, `upper_mixed`,
//! reduce `H·v`) because ε needs the global `v`. Every rank evaluates (so the best-tensor
//! choice is the same everywhere); only rank 0 writes the run folder.

mod bind;
pub mod checkpoint;
mod checks;
pub mod config;
pub mod dataset;
mod error;
pub mod eval;
mod evaluate;
mod exec;
pub mod generation;
pub mod log;
pub mod plot;
pub mod resident;
pub mod resources;
pub mod schedule;
pub mod shard;
mod state;
mod step;
pub mod stream;
mod trainer;

use std::path::PathBuf;

use serde::Serialize;

pub use checks::ARTIFACT_RECORD;
pub use config::{Method, RetrainFrom, TrainConfig};
pub use error::TrainError;
pub use state::{Best, Phase, RunState};
pub use trainer::Trainer;
// Datasets implement it in `data`; the loop's users have always found it here.
pub use crate::data::Examples;

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub method: Method,
    pub metric_name: String,
    pub final_val: Option<eval::Scores>,
    pub final_test: Option<eval::Scores>,
    pub best: Option<Best>,
    pub seconds: f64,
    pub run_dir: PathBuf,
}

/// The data a run needs, already split: indices into `data` for the two splits.
pub struct RunData {
    pub data: Box<dyn Examples>,
    pub train_idx: Vec<usize>,
    pub val_idx: Vec<usize>,
    pub test: Option<Box<dyn Examples>>,
}

/// A seeded split of `n` examples into (train, validation) with `val_ratio` held out.
pub fn split(n: usize, val_ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((n as f64) * val_ratio).round() as usize;
    let val = idx.split_off(n - n_val.min(n));
    (idx, val)
}
