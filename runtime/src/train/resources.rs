//! Refusing, before anything is allocated, a run whose memory cannot fit: an allocation
//! failure aborts the process ("memory allocation of N bytes failed") instead of an error.
//!
//! The estimate is a lower bound from the manifest: the trainable tensors held about six
//! times (values, gradients, both AdamW moments, initial values, a checkpoint's copy), and
//! a batch padded to `data.max_len`: its token ids, mask and type ids (8 bytes each), the
//! input and output activations every adapted linear op keeps for the backward pass, and the
//! logits (4 bytes each). The model's other activations come on top, so what passes may
//! still not fit; what is refused cannot.

use super::{TrainConfig, TrainError};
use crate::artifact::Artifact;
use bidora_compiler::memory::human;

/// Lower bounds of a run's memory, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub tensors: f64,
    pub batch: f64,
}

/// Copies of the trainable tensors a run holds (see the module doc).
const TENSOR_COPIES: f64 = 6.0;

pub fn estimate(cfg: &TrainConfig, art: &Artifact) -> Estimate {
    let params: f64 = art.init.iter().map(|(_, a)| a.len() as f64).sum();
    let per_token_adapters: f64 = art
        .manifest
        .adapters
        .iter()
        .map(|a| (a.in_features + a.out_features) as f64)
        .sum();
    let logits_per_token = art
        .manifest
        .program(crate::artifact::ProgramKey::Eval)
        .and_then(|p| {
            let name = &art.manifest.task.as_ref()?.logits;
            let sig = p.outputs.iter().find(|o| &o.name == name)?;
            sig.shape.as_ref()?.last()?.known()
        })
        .unwrap_or(1) as f64;
    let rows = cfg.batch_size.max(cfg.eval_batch_size) as f64;
    let tokens = rows * cfg.data.max_len.max(1) as f64;
    Estimate {
        tensors: TENSOR_COPIES * params * 4.0,
        batch: tokens * (3.0 * 8.0 + 4.0 * (per_token_adapters + logits_per_token)),
    }
}

/// Refuses the run when the estimate exceeds `available` bytes (None: not known, no check).
pub fn check(cfg: &TrainConfig, art: &Artifact, available: Option<u64>) -> Result<(), TrainError> {
    let Some(avail) = available else {
        return Ok(());
    };
    let e = estimate(cfg, art);
    if e.tensors + e.batch <= avail as f64 {
        return Ok(());
    }
    let origin = if e.batch >= e.tensors {
        "batch_size"
    } else {
        "the artifact's rank"
    };
    Err(TrainError::Config {
        origin: origin.into(),
        message: format!(
            "the run needs at least {} ({} for a batch of {} examples padded to data.max_len \
             = {} tokens, {} for the trainable tensors and their optimiser state), more than \
             the {} this machine has available; lower batch_size / eval_batch_size / \
             data.max_len, or compile with a smaller --rank",
            human(e.tensors + e.batch),
            human(e.batch),
            cfg.batch_size.max(cfg.eval_batch_size),
            cfg.data.max_len,
            human(e.tensors),
            human(avail as f64)
        ),
    })
}
