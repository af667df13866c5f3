//! ROUGE-L as coco-caption's `Rouge` scorer defines it (what the E2E challenge reports): per
//! segment, P = max over references of LCS / |hyp| and R = max over references of LCS / |ref|
//! (maximised separately, not the F of the best reference), F = (1 + β²)PR / (R + β²P) with
//! β = 1.2; the corpus score is the mean over segments. Inputs are token lists.

use super::{check_corpus, MetricError};

const BETA: f64 = 1.2;

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

/// One segment's ROUGE-L F; 0 for an empty hypothesis.
pub fn rouge_l(hyp: &[String], refs: &[Vec<String>]) -> f64 {
    if hyp.is_empty() {
        return 0.0;
    }
    let (mut p, mut r) = (0.0f64, 0.0f64);
    for reference in refs {
        let l = lcs(reference, hyp) as f64;
        p = p.max(l / hyp.len() as f64);
        if !reference.is_empty() {
            r = r.max(l / reference.len() as f64);
        }
    }
    if p == 0.0 || r == 0.0 {
        return 0.0;
    }
    let b2 = BETA * BETA;
    (1.0 + b2) * p * r / (r + b2 * p)
}

pub fn corpus_rouge_l(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Result<f64, MetricError> {
    check_corpus(hyps, refs)?;
    if hyps.is_empty() {
        return Ok(0.0);
    }
    Ok(hyps
        .iter()
        .zip(refs)
        .map(|(h, r)| rouge_l(h, r))
        .sum::<f64>()
        / hyps.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::super::{close, words as t};
    use super::*;

    #[test]
    fn by_hand() {
        assert_eq!(lcs(&t("a b c d e"), &t("a x c y e")), 3);
        assert_eq!(lcs(&t("a b"), &t("b a")), 1);
        // P and R maximised separately: P = 3/3 from "a b c d e f", R = 2/2 from "a b", so
        // F = 1 although neither reference alone gives 1.
        let f = rouge_l(&t("a b c"), &[t("a b c d e f"), t("a b")]);
        assert!(close(f, 1.0, 1e-15));
        // One reference: LCS 2 of hyp 3, ref 4: P = 2/3, R = 1/2.
        let (p, r) = (2.0 / 3.0, 0.5);
        let want = (1.0 + 1.44) * p * r / (r + 1.44 * p);
        assert!(close(rouge_l(&t("a c z"), &[t("a b c d")]), want, 1e-15));
        assert_eq!(rouge_l(&[], &[t("a")]), 0.0);
    }
}
