//! Generation at evaluation time for causal-lm heads on data-to-text sets (E2E): one prompt
//! per meaning representation of the split, decoded with the model's `forward.onnx` and the
//! current adapter tensors (greedy, or beam search), then scored against all of that
//! representation's references with the E2E metrics.
//!
//! The split is by meaning representation (`dataset::load_for`), so a representation's
//! references all lie in the split being scored, as in the E2E challenge's evaluation.

use serde::Serialize;

use super::config::GenerationConfig;
use super::{Examples, TrainError};
use crate::backend::{HostTensor, Program};
use crate::generate::{continuations, GenerateOptions, ProgramLm};
use crate::metrics::{e2e_scores, GenerationScores};

/// One generated text with what it was generated from and scored against.
#[derive(Clone, Debug, Serialize)]
pub struct Generated {
    pub mr: String,
    pub generated: String,
    pub references: Vec<String>,
}

/// The metric names generation adds to a causal-lm head's scores (`eval.rs`).
pub const METRICS: [&str; 4] = ["bleu", "nist", "rouge_l", "cider"];

pub fn is_generation_metric(name: &str) -> bool {
    METRICS.contains(&name)
}

/// Why `set` cannot be scored by generation (None: it can).
pub fn unavailable(set: &dyn Examples) -> Option<&'static str> {
    if set.references().is_none() {
        Some("the data has no references (only the e2e format has)")
    } else if set.text_codec().is_none() {
        Some("the data has no decoder for generated ids")
    } else {
        None
    }
}

/// The program that generates: the artifact's `forward.onnx`, as loaded.
pub struct Model<'a> {
    pub program: &'a mut dyn Program,
    /// Its file, for errors.
    pub file: &'a str,
    /// Its logits output.
    pub logits: &'a str,
    /// Its inputs besides ids and mask: the current trainable tensors.
    pub fixed: Vec<(String, HostTensor)>,
    /// Sequences are padded up to a multiple of this (few shapes for tract's plans).
    pub pad_to_multiple_of: usize,
}

/// Generates for the split `idx` of `set` and scores the texts.
pub fn generate_and_score(
    model: Model<'_>,
    set: &dyn Examples,
    idx: &[usize],
    cfg: &GenerationConfig,
    batch_size: usize,
) -> Result<(GenerationScores, Vec<Generated>), TrainError> {
    let data = |m: String| TrainError::Data(format!("generation: {m}"));
    let (Some(refs), Some(codec)) = (set.references(), set.text_codec()) else {
        return Err(data(unavailable(set).unwrap_or_default().to_string()));
    };
    // The first example of each meaning representation in the split gives its prompt.
    let mut seen = vec![false; refs.groups.len()];
    let mut prompts: Vec<(usize, Vec<i64>)> = vec![];
    for &i in idx {
        let g = *refs
            .example_group
            .get(i)
            .ok_or_else(|| data(format!("example {i} has no reference group")))?;
        if std::mem::replace(&mut seen[g], true) {
            continue;
        }
        let p = set
            .prompt(i)
            .ok_or_else(|| data(format!("example {i} has no prompt")))?;
        prompts.push((g, p));
        if cfg.max_prompts > 0 && prompts.len() == cfg.max_prompts {
            break;
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: cfg.max_new_tokens,
        eos: Some(codec.eos),
        beam_width: cfg.beam_width,
        length_penalty: cfg.length_penalty,
        no_repeat_ngram: cfg.no_repeat_ngram,
    };
    let run = |e: crate::generate::GenerateError| TrainError::Run {
        program: format!("{} (generating)", model.file),
        message: e.to_string(),
    };
    let mut lm = ProgramLm::new(model.program, model.fixed, model.logits, codec.pad)
        .map_err(run)?
        .pad_to_multiple_of(model.pad_to_multiple_of);
    let ids: Vec<Vec<i64>> = prompts.iter().map(|(_, p)| p.clone()).collect();
    let tokens = continuations(&mut lm, &ids, &opts, batch_size).map_err(run)?;
    let mut out = Vec::with_capacity(prompts.len());
    for ((g, _), t) in prompts.iter().zip(tokens) {
        let (mr, references) = &refs.groups[*g];
        out.push(Generated {
            mr: mr.clone(),
            generated: codec.decoder.decode(&t).map_err(data)?,
            references: references.clone(),
        });
    }
    let hyps: Vec<&str> = out.iter().map(|g| g.generated.as_str()).collect();
    let rs: Vec<Vec<&str>> = out
        .iter()
        .map(|g| g.references.iter().map(String::as_str).collect())
        .collect();
    let scores = e2e_scores(&hyps, &rs).map_err(|e| data(e.to_string()))?;
    Ok((scores, out))
}
