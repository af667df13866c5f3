//! Evaluation metrics, one family per file, each defined as the reference implementation the
//! paper's numbers come from defines it (named in each file and in the table).
//!
//! | family | file | definitions follow |
//! |---|---|---|
//! | accuracy, F1 (binary, micro, macro), Matthews (binary, Gorodkin's R_K) | `classification.rs` | scikit-learn 1.9 |
//! | Pearson, Spearman (average ranks), MSE | `regression.rs` | scipy.stats |
//! | multi-label micro/macro F1, subset accuracy | `multilabel.rs` | scikit-learn 1.9 |
//! | entity precision/recall/F1 (IOB1, IOB2) | `ner.rs` | conlleval / seqeval's default mode |
//! | tokenisation for generation metrics | `tokenize.rs` | mteval-v13a.pl |
//! | corpus BLEU-4 | `bleu.rs` | mteval-v13a.pl (what the E2E challenge scripts run) |
//! | NIST-5 | `nist.rs` | mteval-v13a.pl |
//! | ROUGE-L | `rouge.rs` | coco-caption's `Rouge` (β = 1.2) |
//! | CIDEr (coco-caption's, which is CIDEr-D) | `cider.rs` | coco-caption's `Cider` |
//!
//! METEOR is not implemented: the E2E challenge's METEOR is METEOR 1.5 (a Java program with
//! stem, WordNet-synonym and paraphrase matching and language-tuned weights); an exact-match
//! approximation would report numbers not comparable to any published table.
//!
//! Undefined values (a constant side for a correlation, no positives for an F1) are 0, as
//! scikit-learn's `zero_division=0` and its MCC do, so a metric is always a number the trainer
//! can compare.

mod bleu;
mod cider;
mod classification;
mod generation;
mod multilabel;
mod ner;
mod ngrams;
mod nist;
mod regression;
mod rouge;
mod tokenize;

pub use bleu::corpus_bleu;
pub use cider::corpus_cider;
pub use classification::{accuracy, f1_binary, f1_macro, f1_micro, matthews};
pub use generation::{e2e_scores, GenerationScores};
pub use multilabel::{multilabel_f1_macro, multilabel_f1_micro, subset_accuracy};
pub use ner::{entities, entity_scores, Entity, EntityScores};
pub use nist::corpus_nist;
pub use regression::{mse, pearson, ranks, spearman};
pub use rouge::{corpus_rouge_l, rouge_l};
pub use tokenize::{coco_tokenize, mteval_tokenize};

/// Inputs a corpus metric cannot score.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    #[error("{hyps} hypotheses but {refs} reference sets")]
    Count { hyps: usize, refs: usize },
    #[error("segment {0} has no references")]
    NoReference(usize),
    #[error("sentence {sentence}: {gold} gold tags but {pred} predicted")]
    TagCount {
        sentence: usize,
        gold: usize,
        pred: usize,
    },
}

/// One hypothesis per reference set, every set non-empty.
fn check_corpus<H, R>(hyps: &[H], refs: &[Vec<R>]) -> Result<(), MetricError> {
    if hyps.len() != refs.len() {
        return Err(MetricError::Count {
            hyps: hyps.len(),
            refs: refs.len(),
        });
    }
    match refs.iter().position(|r| r.is_empty()) {
        Some(i) => Err(MetricError::NoReference(i)),
        None => Ok(()),
    }
}

/// F1 from counts; 0 when there is nothing to be right about (sklearn's `zero_division=0`).
fn f1_counts(tp: f64, fp: f64, fneg: f64) -> f64 {
    let d = 2.0 * tp + fp + fneg;
    if d == 0.0 {
        0.0
    } else {
        2.0 * tp / d
    }
}

#[cfg(test)]
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// A sentence already tokenised by spaces, for hand-worked cases.
#[cfg(test)]
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}
