//! Single-label classification, as scikit-learn 1.9 defines it: the label set is the union of
//! gold and predicted labels (`unique_labels`), and an undefined F1 is 0.
//!
//! # Panics
//! Every function here panics when `pred` and `gold` differ in length (a caller bug: they come
//! from the same batches).

use std::collections::BTreeMap;

use super::f1_counts;

fn check(pred: &[i64], gold: &[i64]) {
    assert_eq!(pred.len(), gold.len(), "as many predictions as gold labels");
}

pub fn accuracy(pred: &[i64], gold: &[i64]) -> f64 {
    check(pred, gold);
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// (tp, fp, fn) of one class against the rest.
fn one_vs_rest(pred: &[i64], gold: &[i64], c: i64) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut fneg) = (0.0, 0.0, 0.0);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == c, g == c) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fneg += 1.0,
            _ => {}
        }
    }
    (tp, fp, fneg)
}

/// F1 of the class `positive` (sklearn `average='binary'`).
pub fn f1_binary(pred: &[i64], gold: &[i64], positive: i64) -> f64 {
    check(pred, gold);
    let (tp, fp, fneg) = one_vs_rest(pred, gold, positive);
    f1_counts(tp, fp, fneg)
}

fn labels(pred: &[i64], gold: &[i64]) -> Vec<i64> {
    let mut l: Vec<i64> = pred.iter().chain(gold).copied().collect();
    l.sort_unstable();
    l.dedup();
    l
}

/// Counts pooled over classes; for single-label data this equals accuracy.
pub fn f1_micro(pred: &[i64], gold: &[i64]) -> f64 {
    check(pred, gold);
    let (mut tp, mut fp, mut fneg) = (0.0, 0.0, 0.0);
    for c in labels(pred, gold) {
        let (a, b, d) = one_vs_rest(pred, gold, c);
        tp += a;
        fp += b;
        fneg += d;
    }
    f1_counts(tp, fp, fneg)
}

/// Unweighted mean of per-class F1 over the classes seen in gold or predictions.
pub fn f1_macro(pred: &[i64], gold: &[i64]) -> f64 {
    check(pred, gold);
    let l = labels(pred, gold);
    if l.is_empty() {
        return 0.0;
    }
    l.iter().map(|&c| f1_binary(pred, gold, c)).sum::<f64>() / l.len() as f64
}

/// Matthews correlation; for more than two classes Gorodkin's (2004) R_K from the confusion
/// matrix C (sklearn's formula): `(c·s − t·p) / sqrt((s² − p·p)(s² − t·t))` with c the trace,
/// s the sample count, t and p the per-class gold and predicted totals. 0 when undefined.
/// For two classes it is the familiar `(tp·tn − fp·fn) / sqrt(...)`.
pub fn matthews(pred: &[i64], gold: &[i64]) -> f64 {
    check(pred, gold);
    let mut t: BTreeMap<i64, f64> = BTreeMap::new();
    let mut p: BTreeMap<i64, f64> = BTreeMap::new();
    let mut correct = 0.0;
    for (&a, &b) in pred.iter().zip(gold) {
        *p.entry(a).or_default() += 1.0;
        *t.entry(b).or_default() += 1.0;
        if a == b {
            correct += 1.0;
        }
    }
    let s = gold.len() as f64;
    let tp: f64 = t
        .iter()
        .map(|(c, n)| n * p.get(c).copied().unwrap_or(0.0))
        .sum();
    let tt: f64 = t.values().map(|n| n * n).sum();
    let pp: f64 = p.values().map(|n| n * n).sum();
    let cov_tp = correct * s - tp;
    let cov_pp = s * s - pp;
    let cov_tt = s * s - tt;
    if cov_pp * cov_tt == 0.0 {
        0.0
    } else {
        cov_tp / (cov_pp * cov_tt).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::super::close;
    use super::*;

    // A fixed 3-class case; expected values from scikit-learn 1.9.1:
    // python3 -c "from sklearn.metrics import *; g=[0,1,2,2,1,0,2,1,1,0,2,2]; \
    //   p=[0,2,2,2,1,1,2,0,1,0,1,2]; print(repr(accuracy_score(g,p)), \
    //   repr(f1_score(g,p,average='macro')), repr(matthews_corrcoef(g,p)))"
    const G3: [i64; 12] = [0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2];
    const P3: [i64; 12] = [0, 2, 2, 2, 1, 1, 2, 0, 1, 0, 1, 2];

    #[test]
    fn multiclass_agrees_with_sklearn() {
        assert!(close(accuracy(&P3, &G3), 8.0 / 12.0, 1e-12));
        assert!(close(f1_micro(&P3, &G3), 8.0 / 12.0, 1e-12));
        assert!(
            close(f1_macro(&P3, &G3), SK_MACRO, 1e-12),
            "{}",
            f1_macro(&P3, &G3)
        );
        assert!(
            close(matthews(&P3, &G3), SK_MCC3, 1e-12),
            "{}",
            matthews(&P3, &G3)
        );
    }
    const SK_MACRO: f64 = 0.6555555555555556;
    const SK_MCC3: f64 = 0.48936170212765956;

    #[test]
    fn binary_by_hand() {
        // tp = 3, fp = 1, fn = 2, tn = 4.
        let g = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
        let p = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0];
        assert!(close(f1_binary(&p, &g, 1), 6.0 / 9.0, 1e-15));
        assert!(close(f1_binary(&p, &g, 0), 8.0 / 11.0, 1e-15));
        let mcc = (3.0 * 4.0 - 1.0 * 2.0) / (4.0f64 * 5.0 * 5.0 * 6.0).sqrt();
        assert!(close(matthews(&p, &g), mcc, 1e-15));
        // The macro average includes a class only predicted, never gold (sklearn's union).
        let f = f1_macro(&[0, 1, 2], &[0, 1, 1]);
        assert!(close(f, (1.0 + 2.0 / 3.0 + 0.0) / 3.0, 1e-15), "{f}");
    }

    #[test]
    fn degenerate_cases_are_zero_not_nan() {
        assert_eq!(matthews(&[1, 1, 1], &[1, 0, 1]), 0.0);
        assert_eq!(f1_binary(&[0, 0], &[0, 0], 1), 0.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
        assert_eq!(matthews(&[1, 0, 1], &[1, 0, 1]), 1.0);
        assert_eq!(matthews(&[0, 1, 0], &[1, 0, 1]), -1.0);
    }
}
