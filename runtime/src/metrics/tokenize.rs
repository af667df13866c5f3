//! Tokenisation for the generation metrics.
//!
//! [`mteval_tokenize`] is the default ("13a") normalisation of NIST's mteval-v13a.pl, which
//! the E2E challenge's scripts (e2e-metrics) run for BLEU and NIST; sacrebleu's `13a`
//! tokeniser is the same rules. The regular expressions below are that script's, applied in
//! its order (Perl's `s///g` and `Regex::replace_all` both substitute leftmost,
//! non-overlapping matches).
//!
//! [`coco_tokenize`] stands in for coco-caption's PTB tokeniser (Stanford CoreNLP, Java),
//! which e2e-metrics runs before ROUGE-L and CIDEr: lower-cased mteval tokens with
//! coco-caption's punctuation tokens removed. The two tokenisers differ in details (PTB
//! splits clitics, "it's" → "it 's"; mteval keeps "it's"), so ROUGE-L and CIDEr here are
//! coco-caption's formulas on an approximation of its tokens.

use std::sync::LazyLock;

use regex::Regex;

static PUNCT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([{-~\[-` -&(-+:-@/])").expect("valid"));
static PERIOD_COMMA_AFTER_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([^0-9])([.,])").expect("valid"));
static PERIOD_COMMA_BEFORE_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([.,])([^0-9])").expect("valid"));
static DASH_AFTER_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([0-9])(-)").expect("valid"));

/// mteval-v13a's `tokenization` (not `--international-tokenization`). `lowercase`: ASCII
/// letters only, like the script's `tr/[A-Z]/[a-z]/`; mteval lower-cases unless run with
/// `-c`, and e2e-metrics does not pass `-c`.
pub fn mteval_tokenize(text: &str, lowercase: bool) -> Vec<String> {
    let mut s = text
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    s = format!(" {s} ");
    if lowercase {
        s.make_ascii_lowercase();
    }
    let s = PUNCT.replace_all(&s, " $1 ");
    let s = PERIOD_COMMA_AFTER_NON_DIGIT.replace_all(&s, "$1 $2 ");
    let s = PERIOD_COMMA_BEFORE_NON_DIGIT.replace_all(&s, " $1 $2");
    let s = DASH_AFTER_DIGIT.replace_all(&s, "$1 $2 ");
    s.split_whitespace().map(str::to_string).collect()
}

/// coco-caption's `PUNCTUATIONS`, dropped after tokenising.
const COCO_PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Lower-cased mteval tokens without coco-caption's punctuation tokens (see the module doc).
pub fn coco_tokenize(text: &str) -> Vec<String> {
    mteval_tokenize(text, true)
        .into_iter()
        .filter(|t| !COCO_PUNCTUATION.contains(&t.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sacrebleu_13a() {
        // python -c "from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a as T; \
        //   print(T()(s.lower()))" for each s below (sacrebleu 2.6.0).
        let cases = [
            (
                "The Eagle is a 3-star, family-friendly coffee shop; prices £20-25.",
                "the eagle is a 3 - star , family-friendly coffee shop ; prices £20 - 25 .",
            ),
            (
                "It's \"cheap\" (really) at 1,000.50 & near A.B.C./Café",
                "it's \" cheap \" ( really ) at 1,000.50 & near a . b . c . / café",
            ),
            ("x..y, 5.a z&amp;w", "x . . y , 5 . a z & w"),
        ];
        for (text, want) in cases {
            assert_eq!(mteval_tokenize(text, true).join(" "), want, "{text}");
        }
        assert_eq!(mteval_tokenize("Ab.", false), ["Ab", "."]);
    }

    #[test]
    fn coco_drops_punctuation() {
        assert_eq!(
            coco_tokenize("Near the river, it's cheap - really!"),
            ["near", "the", "river", "it's", "cheap", "really"]
        );
    }
}
