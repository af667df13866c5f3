//! The E2E challenge's metric set over raw strings: BLEU and NIST on mteval-v13a tokens
//! (lower-cased, as e2e-metrics runs mteval), ROUGE-L and CIDEr on the coco-caption-style
//! tokens of `tokenize.rs`. METEOR is omitted (see the module doc of `metrics`).

use serde::Serialize;

use super::{
    check_corpus, coco_tokenize, corpus_bleu, corpus_cider, corpus_nist, corpus_rouge_l,
    mteval_tokenize, MetricError,
};

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GenerationScores {
    /// Corpus BLEU-4 in [0, 1].
    pub bleu: f64,
    pub nist: f64,
    /// Mean sentence ROUGE-L F (β = 1.2) in [0, 1].
    pub rouge_l: f64,
    /// coco-caption's CIDEr (CIDEr-D).
    pub cider: f64,
}

/// Scores `hyps[i]` against the references `refs[i]` (each at least one).
pub fn e2e_scores<H: AsRef<str>, R: AsRef<str>>(
    hyps: &[H],
    refs: &[Vec<R>],
) -> Result<GenerationScores, MetricError> {
    check_corpus(hyps, refs)?;
    let tok = |f: &dyn Fn(&str) -> Vec<String>| {
        let h: Vec<Vec<String>> = hyps.iter().map(|s| f(s.as_ref())).collect();
        let r: Vec<Vec<Vec<String>>> = refs
            .iter()
            .map(|rs| rs.iter().map(|s| f(s.as_ref())).collect())
            .collect();
        (h, r)
    };
    let (mh, mr) = tok(&|s| mteval_tokenize(s, true));
    let (ch, cr) = tok(&coco_tokenize);
    Ok(GenerationScores {
        bleu: corpus_bleu(&mh, &mr)?,
        nist: corpus_nist(&mh, &mr)?,
        rouge_l: corpus_rouge_l(&ch, &cr)?,
        cider: corpus_cider(&ch, &cr)?,
    })
}

#[cfg(test)]
pub(super) mod tests {
    //! A fixed corpus: the first 8 meaning representations of the E2E test set
    //! (testset_w_refs.csv) with at least 5 references; segment i keeps the first 1 + i % 4
    //! references and takes the last reference as its hypothesis, every third one cut to its
    //! first half of words. Built, and the expected values computed, once by a script run
    //! with sacrebleu 2.6.0, nltk 3.10.4 and pycocoevalcap 1.2 (no Python in CI):
    //!   BLEU: nltk.translate.bleu_score.corpus_bleu on sacrebleu's 13a tokens of the
    //!     lower-cased text (no smoothing needed: every order has matches). sacrebleu itself
    //!     needs equally many references per segment; padding with "" makes empty references
    //!     that change the brevity penalty (47.35), so it checks the first-reference corpus
    //!     instead, where it agrees with nltk (20.995084109814012 vs 0.20995084109814016).
    //!   NIST (first reference only): nltk.translate.nist_score.corpus_nist(n=5).
    //!   ROUGE-L, CIDEr: pycocoevalcap's Rouge() and Cider() compute_score on the same tokens
    //!     with coco-caption's punctuation tokens removed, joined by spaces.
    use super::*;

    pub const NLTK_BLEU: f64 = 0.35651320074747733;
    pub const SACREBLEU_FIRST_REF: f64 = 20.995084109814012;
    pub const NLTK_NIST_FIRST_REF: f64 = 2.9671945894518794;
    pub const COCO_ROUGE_L: f64 = 0.5411106905352518;
    pub const COCO_CIDER: f64 = 0.8968230197743655;

    pub const HYPS: [&str; 8] = [
        "Near Burger King is the Blue Spice",
        "Near Burger King is the Blue Spice pub.  It has average customer ratings.",
        "Blue Spice is a pub located in the city centre. It has Chinese food and is not family friendly and is located near Rainbow Vegetarian Café.",
        "Blue Spice is a family friendly pub located in the city",
        "Blue Spice is a pub providing Chinese food It is located in the riverside. It is near Rainbow Vegetarian Café.",
        "Blue Spice is a family-oriented pub near the Rainbow Vegetarian Café in the riverside area. Chinese food is served at Blue Spice.",
        "The Blue Spice sells English food and is not a",
        "Blue Spice pub, located in the city centre near the Rainbow Vegetarian Café, offers a family-friendly environment and serves English dishes.",
    ];
    pub const REFS: [&[&str]; 8] = [
        &[
            "Burger King is near the coffee shop Blue Spice which has an average customer rating.",
        ],
        &[
            "Burger King is near the pub Blue Spice which has an average customer rating.",
            "The Blue Spice pub near Burger King has good customer ratings with excellent food and service, with a lovely atmosphere.",
        ],
        &[
            "Blue Spice, located near Rainbow Vegetarian Café in the city centre, is a pub that also sells Chinese food.  Children should not visit.",
            "A pub named Blue Spice is located in the city centre. It is for adults and is close to Rainbow Vegetarian Café. They offer Chinese food.",
            "The Blue Spice is a pub that also serves Chinese food, it's located in the city center. The pub isn't very family friendly, but the proximity to the Rainbow Vegetarian Café makes up for it.",
        ],
        &[
            "Blue Spice is a pub providing Chinese food It is located in the city centre. It is near Rainbow Vegetarian Café.",
            "In the city centre near the Rainbow Vegetarian Café there is a family friendly pub called Blue Spice. They serve Chinese food.",
            "Blue Spice is a pub providing Chinese food It is located in the city centre. It is near Rainbow Vegetarian Café.",
            "For Chinese, head to Blue Spice. It's a family friendly pub located in the City Centre near the Rainbow Vegetarian Café.",
        ],
        &[
            "There is a non-family friendly pub along the riverside and near Rainbow Vegetarian Café. Its name is Blue Spice and serves Chinese food.",
        ],
        &[
            "Blue Spice is a family friendly Chinese pub in Riverside near the Rainbow Vegetarian Café.",
            "Blue Spice, a kid-friendly pub near the Rainbow Vegetarian Café in the riverside area, is a place where one can order Chinese food.",
        ],
        &[
            "Blue Spice is a pub that serves English food.  It is located near Rainbow Vegetarian Café is the city centre area.  It is also a pub.  It is not family-friendly.",
            "The pub Blue Spice is not conducive for families.  They serve English food and located in the city centre  near the Rainbow Vegetarian Café.",
            "Blue Spice is a pub that serves English food.  It is located near Rainbow Vegetarian Café is the city centre area.  It is also a pub.  It is not family-friendly.",
        ],
        &[
            "Near the Rainbow Vegetarian Café in the city centre, you will find the family-friendly pub Blue Spice, serving an English food menu.",
            "There is a pub called Blue Spice near the Rainbow Vegetarian Café in the city centre. It serves English cuisine and is family-friendly.",
            "Blue Spice is a family-friendly pub that serves English cuisine. It is located in the city centre near Rainbow Vegetarian Café.",
            "A family-friendly English pub near Rainbow Vegetarian Café in the city centre is The Blue Spice.",
        ],
    ];

    pub fn corpus() -> (Vec<&'static str>, Vec<Vec<&'static str>>) {
        (HYPS.to_vec(), REFS.iter().map(|r| r.to_vec()).collect())
    }

    #[test]
    fn e2e_corpus_agrees_with_the_reference_implementations() {
        let (h, r) = corpus();
        let s = e2e_scores(&h, &r).unwrap();
        let tol = 1e-9;
        assert!((s.bleu - NLTK_BLEU).abs() < tol, "BLEU {}", s.bleu);
        assert!(
            (s.rouge_l - COCO_ROUGE_L).abs() < tol,
            "ROUGE-L {}",
            s.rouge_l
        );
        assert!((s.cider - COCO_CIDER).abs() < tol, "CIDEr {}", s.cider);
        let first: Vec<Vec<&str>> = r.iter().map(|x| x[..1].to_vec()).collect();
        let s1 = e2e_scores(&h, &first).unwrap();
        assert!(
            (s1.bleu * 100.0 - SACREBLEU_FIRST_REF).abs() < 1e-7,
            "{}",
            s1.bleu
        );
        assert!(
            (s1.nist - NLTK_NIST_FIRST_REF).abs() < tol,
            "NIST {}",
            s1.nist
        );
        assert!(e2e_scores(&h[..2], &r).is_err());
    }
}
