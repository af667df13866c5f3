//! Multi-label scores over 0/1 indicator rows (one row per example, one column per label), as
//! scikit-learn 1.9 computes `f1_score(average='micro'|'macro', zero_division=0)` and
//! `accuracy_score` (subset accuracy: the whole row must match) on indicator matrices.
//!
//! # Panics
//! When the two sides differ in row count or a row pair in width.

use super::f1_counts;

/// Per-column (tp, fp, fn).
fn column_counts(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> Vec<(f64, f64, f64)> {
    assert_eq!(
        pred.len(),
        gold.len(),
        "as many predicted rows as gold rows"
    );
    let width = gold.first().map_or(0, Vec::len);
    let mut c = vec![(0.0, 0.0, 0.0); width];
    for (p, g) in pred.iter().zip(gold) {
        assert!(
            p.len() == width && g.len() == width,
            "rows of {width} labels"
        );
        for (k, (&a, &b)) in p.iter().zip(g).enumerate() {
            match (a, b) {
                (true, true) => c[k].0 += 1.0,
                (true, false) => c[k].1 += 1.0,
                (false, true) => c[k].2 += 1.0,
                _ => {}
            }
        }
    }
    c
}

/// F1 over every (example, label) decision pooled.
pub fn multilabel_f1_micro(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    let (tp, fp, fneg) = column_counts(pred, gold)
        .into_iter()
        .fold((0.0, 0.0, 0.0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    f1_counts(tp, fp, fneg)
}

/// Mean of per-label F1 over all label columns (a label never gold nor predicted counts 0,
/// as sklearn does for indicator input).
pub fn multilabel_f1_macro(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    let c = column_counts(pred, gold);
    if c.is_empty() {
        return 0.0;
    }
    c.iter()
        .map(|&(tp, fp, fneg)| f1_counts(tp, fp, fneg))
        .sum::<f64>()
        / c.len() as f64
}

/// Share of examples whose whole predicted label set is exactly right.
pub fn subset_accuracy(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    assert_eq!(
        pred.len(),
        gold.len(),
        "as many predicted rows as gold rows"
    );
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

#[cfg(test)]
mod tests {
    use super::super::close;
    use super::*;

    fn rows(m: &[[u8; 4]]) -> Vec<Vec<bool>> {
        m.iter()
            .map(|r| r.iter().map(|&v| v == 1).collect())
            .collect()
    }

    #[test]
    fn agrees_with_sklearn() {
        // python3 -c "from sklearn.metrics import *; import numpy as np; \
        //   g=np.array([[1,0,1,0],[0,1,0,0],[1,1,0,0],[0,0,0,0],[1,0,0,1]]); \
        //   p=np.array([[1,0,0,0],[0,1,1,0],[1,1,0,0],[0,0,0,0],[0,0,0,1]]); \
        //   print(f1_score(g,p,average='micro'), f1_score(g,p,average='macro',zero_division=0), \
        //   accuracy_score(g,p))"   (scikit-learn 1.9.1)
        let g = rows(&[
            [1, 0, 1, 0],
            [0, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [1, 0, 0, 1],
        ]);
        let p = rows(&[
            [1, 0, 0, 0],
            [0, 1, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ]);
        assert!(close(
            multilabel_f1_micro(&p, &g),
            0.7692307692307693,
            1e-12
        ));
        assert!(close(multilabel_f1_macro(&p, &g), 0.7, 1e-12));
        assert!(close(subset_accuracy(&p, &g), 0.4, 1e-15));
    }

    #[test]
    fn by_hand() {
        // tp 1, fp 1, fn 1 in one column; the other never occurs (F1 0 by convention).
        let g = vec![vec![true, false], vec![true, false], vec![false, false]];
        let p = vec![vec![true, false], vec![false, false], vec![true, false]];
        assert!(close(multilabel_f1_micro(&p, &g), 0.5, 1e-15));
        assert!(close(multilabel_f1_macro(&p, &g), 0.25, 1e-15));
    }
}
