//! CIDEr as coco-caption's `Cider` scorer computes it (the E2E challenge's "CIDEr"). That
//! scorer is in fact CIDEr-D (Vedantam et al. 2015): tf-idf vectors over n-grams n = 1..4 with
//! document frequency counted over the corpus's reference sets (one document per segment) and
//! idf `ln(N) − ln(max(1, df))`; per n, the cosine-like similarity with the hypothesis weights
//! clipped by the reference's, `Σ min(h, r) · r / (‖h‖ ‖r‖)`, times the Gaussian length penalty
//! `exp(−δ² / (2σ²))`, σ = 6; averaged over n and references, times 10; the corpus score is the
//! mean over segments. As in coco-caption, δ is the difference of the two sentences' *bigram*
//! counts (its length counter sits under `n == 1`, the bigram index), which equals the word
//! count difference whenever both sentences have a word. Inputs are token lists.

use std::collections::{BTreeMap, HashSet};

use super::{check_corpus, ngrams, MetricError};

const N: usize = 4;
const SIGMA: f64 = 6.0;

struct Vector {
    weights: [BTreeMap<Vec<String>, f64>; N],
    norms: [f64; N],
    length: f64,
}

fn grams(tokens: &[String]) -> [ngrams::Counts<'_>; N] {
    std::array::from_fn(|n| ngrams::count(tokens, n + 1))
}

fn vector(tokens: &[String], df: &BTreeMap<&[String], f64>, log_docs: f64) -> Vector {
    let mut v = Vector {
        weights: Default::default(),
        norms: [0.0; N],
        length: ngrams::total(tokens.len(), 2) as f64,
    };
    for (n, counts) in grams(tokens).into_iter().enumerate() {
        for (g, tf) in counts {
            let w = tf as f64 * (log_docs - df.get(g).copied().unwrap_or(0.0).max(1.0).ln());
            v.norms[n] += w * w;
            v.weights[n].insert(g.to_vec(), w);
        }
        v.norms[n] = v.norms[n].sqrt();
    }
    v
}

fn similarity(h: &Vector, r: &Vector) -> [f64; N] {
    let delta = h.length - r.length;
    let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
    std::array::from_fn(|n| {
        let mut val: f64 = h.weights[n]
            .iter()
            .map(|(g, &hw)| {
                let rw = r.weights[n].get(g).copied().unwrap_or(0.0);
                hw.min(rw) * rw
            })
            .sum();
        if h.norms[n] != 0.0 && r.norms[n] != 0.0 {
            val /= h.norms[n] * r.norms[n];
        }
        val * penalty
    })
}

/// Per-segment CIDEr-D scores (coco-caption's `Cider`), in segment order.
pub fn segment_cider(
    hyps: &[Vec<String>],
    refs: &[Vec<Vec<String>>],
) -> Result<Vec<f64>, MetricError> {
    check_corpus(hyps, refs)?;
    let mut df: BTreeMap<&[String], f64> = BTreeMap::new();
    for rs in refs {
        let seen: HashSet<&[String]> = rs
            .iter()
            .flat_map(|r| (1..=N).flat_map(move |n| r.windows(n)))
            .collect();
        for g in seen {
            *df.entry(g).or_default() += 1.0;
        }
    }
    let log_docs = (refs.len() as f64).ln();
    Ok(hyps
        .iter()
        .zip(refs)
        .map(|(h, rs)| {
            let hv = vector(h, &df, log_docs);
            let mut sum = [0.0; N];
            for r in rs {
                let s = similarity(&hv, &vector(r, &df, log_docs));
                for n in 0..N {
                    sum[n] += s[n];
                }
            }
            sum.iter().sum::<f64>() / N as f64 / rs.len() as f64 * 10.0
        })
        .collect())
}

/// Corpus CIDEr-D: the mean of [`segment_cider`].
pub fn corpus_cider(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Result<f64, MetricError> {
    let s = segment_cider(hyps, refs)?;
    Ok(if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    })
}

#[cfg(test)]
mod tests {
    use super::super::{close, words as t};
    use super::*;

    #[test]
    fn by_hand() {
        // Two segments, one reference each, hypotheses equal to their references and of equal
        // length: every n-gram occurring in only one document has idf ln 2, "x" (in both) 0.
        // Segment 1 "x a": unigrams x (0), a (ln 2): cos 1; bigram "x a": cos 1; no 3-, 4-grams
        // (both norms 0, similarity 0). Score = (1 + 1 + 0 + 0) / 4 · 10 = 5.
        let h = [t("x a"), t("x b")];
        let r = [vec![t("x a")], vec![t("x b")]];
        let s = segment_cider(&h, &r).unwrap();
        assert!(close(s[0], 5.0, 1e-12) && close(s[1], 5.0, 1e-12), "{s:?}");
        // The length penalty: one extra word (δ = 1) scales each term by exp(−1/72); the
        // extra unigram "c" (idf ln 2) and bigram "a c" lower the cosines to 1/√2.
        let s = segment_cider(&[t("x a c"), t("x b")], &r).unwrap();
        let want = (2.0 / 2f64.sqrt()) / 4.0 * 10.0 * (-1.0f64 / 72.0).exp();
        assert!(close(s[0], want, 1e-12), "{} vs {want}", s[0]);
    }
}
