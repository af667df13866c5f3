//! Corpus BLEU-4 as mteval-v13a.pl computes it (its default mode, which the E2E challenge's
//! scripts use): modified n-gram precisions pooled over the corpus, clipped by the largest
//! count in any one reference; brevity penalty `exp(min(0, 1 − r/c))` with r the sum over
//! segments of the reference length closest to the hypothesis length (ties: the shorter);
//! a precision with no matches is smoothed to `1 / (2^k · total)` for its k-th occurrence
//! (mteval's default smoothing; sacrebleu's `exp`), and an order with no hypothesis n-grams at
//! all counts as precision 1 (mteval's rule). Inputs are token lists (see `tokenize.rs`).
//! The result is in [0, 1] (sacrebleu prints it ×100).

use super::{check_corpus, ngrams, MetricError};

pub fn corpus_bleu(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Result<f64, MetricError> {
    check_corpus(hyps, refs)?;
    const N: usize = 4;
    let (mut matches, mut totals) = ([0usize; N], [0usize; N]);
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (h, rs) in hyps.iter().zip(refs) {
        hyp_len += h.len();
        ref_len += closest_length(h.len(), rs);
        for n in 1..=N {
            let max_ref = ngrams::max_over(rs, n);
            matches[n - 1] += ngrams::clipped(h, &max_ref, n)
                .iter()
                .map(|&(_, k)| k)
                .sum::<usize>();
            totals[n - 1] += ngrams::total(h.len(), n);
        }
    }
    if hyp_len == 0 {
        return Ok(0.0);
    }
    let brevity = (1.0 - ref_len as f64 / hyp_len as f64).min(0.0).exp();
    let mut log_sum = 0.0;
    let mut smooth = 1.0;
    for n in 0..N {
        log_sum += if totals[n] == 0 {
            0.0
        } else if matches[n] == 0 {
            smooth *= 2.0;
            (1.0 / (smooth * totals[n] as f64)).ln()
        } else {
            (matches[n] as f64 / totals[n] as f64).ln()
        };
    }
    Ok((log_sum / N as f64).exp() * brevity)
}

/// The reference length nearest `hyp_len`; the shorter on a tie.
fn closest_length(hyp_len: usize, refs: &[Vec<String>]) -> usize {
    refs.iter()
        .map(Vec::len)
        .min_by_key(|&l| (l.abs_diff(hyp_len), l))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::{close, mteval_tokenize, words as t};
    use super::*;

    #[test]
    fn by_hand() {
        // Hypothesis "a b c d e" against one reference "a b c d f g": matches 4/5, 3/4, 2/3,
        // 1/2; c = 5, r = 6: BLEU = (4/5 · 3/4 · 2/3 · 1/2)^(1/4) · e^(1 − 6/5).
        let b = corpus_bleu(&[t("a b c d e")], &[vec![t("a b c d f g")]]).unwrap();
        let want = (0.8f64 * 0.75 * (2.0 / 3.0) * 0.5).powf(0.25) * (1.0f64 - 1.2).exp();
        assert!(close(b, want, 1e-15), "{b} vs {want}");
        // Clipping: "the the the" vs "the cat": unigram precision 1/3, no bigram match
        // (smoothed 1/(2·2)), no trigram match (1/(4·1)), no 4-grams at all (counts 1);
        // closest reference length 2 < 3, no penalty.
        let b = corpus_bleu(&[t("the the the")], &[vec![t("the cat")]]).unwrap();
        let want = ((1.0f64 / 3.0) * 0.25 * 0.25).powf(0.25);
        assert!(close(b, want, 1e-15), "{b} vs {want}");
        assert_eq!(
            closest_length(7, &[t("1 2 3 4 5 6"), t("1 2 3 4 5 6 7 8")]),
            6
        );
        assert!(corpus_bleu(&[t("a")], &[vec![]]).is_err());
        assert!(corpus_bleu(&[t("a")], &[]).is_err());
    }

    #[test]
    fn multi_reference_corpus_agrees_with_nltk() {
        let (hyps, refs) = super::super::generation::tests::corpus();
        let tok = |s: &str| mteval_tokenize(s, true);
        let h: Vec<_> = hyps.iter().map(|s| tok(s)).collect();
        let r: Vec<Vec<_>> = refs
            .iter()
            .map(|rs| rs.iter().map(|s| tok(s)).collect())
            .collect();
        let b = corpus_bleu(&h, &r).unwrap();
        assert!(
            close(b, super::super::generation::tests::NLTK_BLEU, 1e-9),
            "{b}"
        );
    }
}
