//! NIST-5 as mteval-v13a.pl computes it. Each n-gram's information weight comes from the
//! references of the whole corpus: `info(w1..wn) = log2(count(w1..wn−1) / count(w1..wn))`,
//! with the total reference word count in place of the empty prefix's count. The score is
//! `Σ_{n≤5} (Σ info of matched n-grams, clipped by the largest count in one reference)
//! / (hypothesis n-grams)` times the length penalty `exp(−β · ln²(min(1, c / r)))`, where c is
//! the hypothesis word count, r the sum over segments of the mean reference length, and β
//! makes the penalty 0.5 at c / r = 2/3.
//!
//! Differences from the script, deliberate: mteval needs every segment to have the same
//! number of references (it averages reference lengths over that count), while here each
//! segment's mean is over its own references; scripts that pad missing references with empty
//! strings to satisfy mteval get shorter mean lengths. Perl's treatment of the token "0" as
//! false in its prefix lookup is not reproduced.

use std::collections::BTreeMap;

use super::{check_corpus, ngrams, MetricError};

const N: usize = 5;

pub fn corpus_nist(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Result<f64, MetricError> {
    check_corpus(hyps, refs)?;
    let mut counts: BTreeMap<&[String], usize> = BTreeMap::new();
    let mut words = 0usize;
    for r in refs.iter().flatten() {
        words += r.len();
        for n in 1..=N {
            for (g, k) in ngrams::count(r, n) {
                *counts.entry(g).or_default() += k;
            }
        }
    }
    let info = |g: &[String]| {
        let prefix = match g.len() {
            1 => words,
            _ => counts[&g[..g.len() - 1]],
        };
        (prefix as f64 / counts[g] as f64).log2()
    };
    let (mut gain, mut totals) = ([0.0f64; N], [0usize; N]);
    let (mut hyp_len, mut ref_len) = (0usize, 0.0f64);
    for (h, rs) in hyps.iter().zip(refs) {
        hyp_len += h.len();
        ref_len += rs.iter().map(Vec::len).sum::<usize>() as f64 / rs.len() as f64;
        for n in 1..=N {
            let max_ref = ngrams::max_over(rs, n);
            for (g, k) in ngrams::clipped(h, &max_ref, n) {
                gain[n - 1] += info(g) * k as f64;
            }
            totals[n - 1] += ngrams::total(h.len(), n);
        }
    }
    let score: f64 = (0..N).map(|n| gain[n] / totals[n].max(1) as f64).sum();
    Ok(score * length_penalty(hyp_len as f64 / ref_len))
}

fn length_penalty(ratio: f64) -> f64 {
    if ratio >= 1.0 {
        return 1.0;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return 0.0;
    }
    let beta = -0.5f64.ln() / 1.5f64.ln().powi(2);
    (-beta * ratio.ln().powi(2)).exp()
}

#[cfg(test)]
mod tests {
    use super::super::{close, words as t};
    use super::*;

    #[test]
    fn by_hand() {
        // References "a b" and "a c": unigram counts a 2, b 1, c 1 of 4 words, so info
        // a = 1, b = c = 2 bits; bigrams "a b", "a c" once each after 2 "a": 1 bit. The
        // hypothesis "a b" matches (1 + 2) / 2 unigram bits and 1 / 1 bigram bits: 2.5.
        let s = corpus_nist(&[t("a b")], &[vec![t("a b"), t("a c")]]).unwrap();
        assert!(close(s, 2.5, 1e-15), "{s}");
        // Length penalty 0.5 at two thirds of the reference length: "a b" vs "a b c" scores
        // log2(3) unigram bits (the bigram carries 0 bits) times 0.5.
        let s = corpus_nist(&[t("a b")], &[vec![t("a b c")]]).unwrap();
        assert!(close(s, 3f64.log2() * 0.5, 1e-15), "{s}");
        assert_eq!(length_penalty(0.0), 0.0);
        assert_eq!(length_penalty(1.3), 1.0);
    }

    #[test]
    fn single_reference_corpus_agrees_with_nltk() {
        // NLTK's corpus_nist keeps only the best single reference per segment, which is
        // mteval's definition when there is one reference; see generation.rs for the corpus.
        use super::super::{generation::tests as g, mteval_tokenize};
        let (hyps, refs) = g::corpus();
        let h: Vec<_> = hyps.iter().map(|s| mteval_tokenize(s, true)).collect();
        let r: Vec<Vec<_>> = refs
            .iter()
            .map(|rs| vec![mteval_tokenize(rs[0], true)])
            .collect();
        let s = corpus_nist(&h, &r).unwrap();
        assert!(close(s, g::NLTK_NIST_FIRST_REF, 1e-9), "{s}");
    }
}
