//! Regression scores as scipy.stats defines them (`pearsonr`, `spearmanr` with average ranks
//! for ties), except that a constant side gives 0 instead of NaN so runs stay comparable.
//!
//! # Panics
//! When `pred` and `gold` differ in length.

fn check(pred: &[f64], gold: &[f64]) {
    assert_eq!(pred.len(), gold.len(), "as many predictions as gold values");
}

pub fn pearson(pred: &[f64], gold: &[f64]) -> f64 {
    check(pred, gold);
    let n = pred.len() as f64;
    if pred.is_empty() {
        return 0.0;
    }
    let (mp, mg) = (pred.iter().sum::<f64>() / n, gold.iter().sum::<f64>() / n);
    let (mut cov, mut vp, mut vg) = (0.0, 0.0, 0.0);
    for (p, g) in pred.iter().zip(gold) {
        let (dp, dg) = (p - mp, g - mg);
        cov += dp * dg;
        vp += dp * dp;
        vg += dg * dg;
    }
    if vp == 0.0 || vg == 0.0 {
        return 0.0;
    }
    // Rounding can push |r| a hair past 1; scipy clips too.
    (cov / (vp.sqrt() * vg.sqrt())).clamp(-1.0, 1.0)
}

/// 1-based ranks, tied values sharing the mean of the ranks they span (scipy's `average`).
/// NaN sorts last (total order), so it never panics.
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

pub fn spearman(pred: &[f64], gold: &[f64]) -> f64 {
    check(pred, gold);
    pearson(&ranks(pred), &ranks(gold))
}

pub fn mse(pred: &[f64], gold: &[f64]) -> f64 {
    check(pred, gold);
    if pred.is_empty() {
        return 0.0;
    }
    pred.iter()
        .zip(gold)
        .map(|(p, g)| (p - g).powi(2))
        .sum::<f64>()
        / pred.len() as f64
}

#[cfg(test)]
mod tests {
    use super::super::close;
    use super::*;

    // Ties on both sides. Expected from scipy 1.17.1:
    // python3 -c "from scipy.stats import *; a=[0.5,2,3.5,2,4,1,2,5,3.5,0]; \
    //   b=[1,1.5,3,2.5,4.5,0.5,2,4,3,1]; print(pearsonr(a,b)[0], spearmanr(a,b)[0], rankdata(a))"
    const A: [f64; 10] = [0.5, 2.0, 3.5, 2.0, 4.0, 1.0, 2.0, 5.0, 3.5, 0.0];
    const B: [f64; 10] = [1.0, 1.5, 3.0, 2.5, 4.5, 0.5, 2.0, 4.0, 3.0, 1.0];

    #[test]
    fn agrees_with_scipy() {
        assert!(close(pearson(&A, &B), 0.9223307730010533, 1e-12));
        assert!(close(spearman(&A, &B), 0.9350248512166071, 1e-12));
        assert_eq!(
            ranks(&A),
            [2.0, 5.0, 7.5, 5.0, 9.0, 3.0, 5.0, 10.0, 7.5, 1.0]
        );
        assert!(close(mse(&A, &B), 0.375, 1e-15));
    }

    #[test]
    fn hand_cases() {
        // A monotone but non-linear relation: Spearman 1, Pearson below 1.
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [1.0, 4.0, 9.0, 100.0];
        assert!(close(spearman(&x, &y), 1.0, 1e-15));
        assert!(pearson(&x, &y) < 0.9);
        assert!(close(pearson(&x, &[-2.0, -4.0, -6.0, -8.0]), -1.0, 1e-15));
        assert_eq!(pearson(&x, &[3.0; 4]), 0.0);
    }
}
