//! n-gram counting shared by the generation metrics; n-grams borrow the tokens.

use std::collections::BTreeMap;

/// Ordered, so that scores summed over n-grams (CIDEr, NIST) add in one order and a text
/// scores the same bits every time (a HashMap's random order changed the last bit).
pub type Counts<'a> = BTreeMap<&'a [String], usize>;

/// Counts of the n-grams of exactly length `n`.
pub fn count(tokens: &[String], n: usize) -> Counts<'_> {
    let mut c = Counts::new();
    if n > 0 {
        for g in tokens.windows(n) {
            *c.entry(g).or_default() += 1;
        }
    }
    c
}

/// Per n-gram, the largest count in any one reference (BLEU's and NIST's clipping).
pub fn max_over<'a>(refs: &'a [Vec<String>], n: usize) -> Counts<'a> {
    let mut m = Counts::new();
    for r in refs {
        for (g, k) in count(r, n) {
            let e = m.entry(g).or_default();
            *e = (*e).max(k);
        }
    }
    m
}

/// Matches of `hyp`'s n-grams clipped by `max_ref`, as (n-gram, clipped count).
pub fn clipped<'a>(
    hyp: &'a [String],
    max_ref: &Counts<'_>,
    n: usize,
) -> Vec<(&'a [String], usize)> {
    count(hyp, n)
        .into_iter()
        .filter_map(|(g, k)| max_ref.get(g).map(|&r| (g, k.min(r))))
        .filter(|&(_, k)| k > 0)
        .collect()
}

/// Number of n-grams of length `n` in a sentence of `len` tokens.
pub fn total(len: usize, n: usize) -> usize {
    (len + 1).saturating_sub(n)
}
