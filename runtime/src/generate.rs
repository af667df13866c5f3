//! Decoding for causal language models: greedy search and beam search over any program that
//! maps `input_ids` / `attention_mask` `[b, s]` to logits `[b, s, V]` (an artifact's
//! `forward.onnx`, or `eval.onnx` of a causal-lm head).
//!
//! There is no KV cache: the compiled programs take whole sequences and return no key/value
//! state, so each step re-runs the full prefix (cost quadratic in the length; fine for the
//! short E2E outputs, the thing to change first for long generations). Sequences of a batch are
//! right-padded: with causal attention, padding after a token cannot change that token's
//! logits, and positions of the real tokens stay 0..len, so each sequence reads its logits at
//! its own last position.
//!
//! Beam search follows the usual definition (Hugging Face's `num_beams` without its early
//! stopping heuristics): at each step every live beam is extended by every token, the
//! candidates are ranked by summed log-probability, an end-of-sequence candidate within the
//! top `beam_width` ranks becomes a finished hypothesis, and the best `beam_width` other
//! candidates stay live. Finished hypotheses are ranked by `log p / len^length_penalty`, len
//! counting the generated tokens (end token included). Search stops after `max_new_tokens`
//! (live beams then finish as they are), when no beam is live, or when `beam_width`
//! hypotheses have finished and, for `length_penalty ≥ 0`, no live beam can still beat the
//! worst of them (its log-probability only falls and its length is at most
//! `max_new_tokens`).

use ndarray::{ArrayD, IxDyn};

use crate::backend::{BackendError, HostTensor, Program};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// (Not marked as the error's source: the message already carries it, and reporters
    /// that print the source chain would say it twice.)
    #[error("running the model: {0}")]
    Run(BackendError),
    #[error("the model program: {0}")]
    Program(String),
    #[error("an empty prompt has no position to predict from")]
    EmptyPrompt,
    #[error("beam_width must be at least 1")]
    NoBeams,
}

impl From<BackendError> for GenerateError {
    fn from(e: BackendError) -> Self {
        GenerateError::Run(e)
    }
}

/// Something that predicts the next token after each of several sequences.
pub trait NextToken {
    /// One row of vocabulary logits per sequence: the prediction after its last token.
    fn next_logits(&mut self, seqs: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, GenerateError>;
}

/// A compiled causal-LM program as a [`NextToken`].
pub struct ProgramLm<'a> {
    program: &'a mut dyn Program,
    /// Inputs other than ids and mask (adapter and head tensors), passed on every run.
    fixed: Vec<(String, HostTensor)>,
    logits: usize,
    pad_id: i64,
    /// Sequence lengths are padded up to a multiple of this, so a backend that plans per
    /// input shape (tract) sees few shapes over a generation.
    multiple: usize,
}

impl<'a> ProgramLm<'a> {
    /// `logits`: the name of the logits output; `fixed`: the program's other inputs.
    pub fn new(
        program: &'a mut dyn Program,
        fixed: Vec<(String, HostTensor)>,
        logits: &str,
        pad_id: i64,
    ) -> Result<ProgramLm<'a>, GenerateError> {
        let idx = program
            .output_names()
            .iter()
            .position(|n| n == logits)
            .ok_or_else(|| {
                GenerateError::Program(format!(
                    "no output '{logits}' (outputs: {})",
                    program.output_names().join(", ")
                ))
            })?;
        for need in ["input_ids", "attention_mask"] {
            if !program.input_names().iter().any(|n| n == need) {
                return Err(GenerateError::Program(format!("no input '{need}'")));
            }
        }
        Ok(ProgramLm {
            program,
            fixed,
            logits: idx,
            pad_id,
            multiple: 1,
        })
    }

    /// Pads every batch's length up to a multiple of `m` (right padding: with causal
    /// attention it changes no real position's logits).
    pub fn pad_to_multiple_of(mut self, m: usize) -> Self {
        self.multiple = m.max(1);
        self
    }
}

impl NextToken for ProgramLm<'_> {
    fn next_logits(&mut self, seqs: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, GenerateError> {
        let b = seqs.len();
        let s = seqs
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .next_multiple_of(self.multiple);
        if seqs.iter().any(Vec::is_empty) {
            return Err(GenerateError::EmptyPrompt);
        }
        let (mut ids, mut mask) = (Vec::with_capacity(b * s), Vec::with_capacity(b * s));
        for q in seqs {
            ids.extend(
                q.iter()
                    .copied()
                    .chain(std::iter::repeat_n(self.pad_id, s - q.len())),
            );
            mask.extend((0..s).map(|k| i64::from(k < q.len())));
        }
        let t = |v: Vec<i64>| HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b, s]), v).unwrap());
        let mut inputs = vec![
            ("input_ids".to_string(), t(ids)),
            ("attention_mask".to_string(), t(mask)),
        ];
        inputs.extend(self.fixed.iter().cloned());
        let out = self.program.run(&inputs)?;
        let logits = match out.get(self.logits) {
            Some(HostTensor::F32(a)) if a.ndim() == 3 && a.shape()[..2] == [b, s] => a,
            other => {
                return Err(GenerateError::Program(format!(
                    "logits should be f32 [{b}, {s}, V], got {:?}",
                    other.map(|t| (t.dtype(), t.shape().to_vec()))
                )))
            }
        };
        Ok(seqs
            .iter()
            .enumerate()
            .map(|(i, q)| logits.slice(ndarray::s![i, q.len() - 1, ..]).to_vec())
            .collect())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation of a sequence ends after this token.
    pub eos: Option<i64>,
    pub beam_width: usize,
    /// Exponent of the length normalisation (0: raw log-probability; 1: per-token mean).
    pub length_penalty: f64,
    /// No n-gram of this length occurs twice in a sequence (prompt included): a token that
    /// would repeat one is never chosen (Hugging Face's `no_repeat_ngram_size`; 0: off).
    pub no_repeat_ngram: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            eos: None,
            beam_width: 4,
            length_penalty: 1.0,
            no_repeat_ngram: 0,
        }
    }
}

/// A [`NextToken`] whose predictions never repeat an n-gram of the sequence so far: the
/// tokens that would complete an n-gram already present get −∞.
pub struct NoRepeat<'a> {
    pub inner: &'a mut dyn NextToken,
    pub n: usize,
}

impl NextToken for NoRepeat<'_> {
    fn next_logits(&mut self, seqs: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, GenerateError> {
        let mut rows = self.inner.next_logits(seqs)?;
        let n = self.n;
        for (q, row) in seqs.iter().zip(rows.iter_mut()) {
            if n == 0 || q.len() + 1 < n {
                continue;
            }
            let prefix = &q[q.len() + 1 - n..];
            for w in q.windows(n) {
                if w[..n - 1] == *prefix {
                    if let Some(x) = usize::try_from(w[n - 1]).ok().and_then(|t| row.get_mut(t)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(rows)
    }
}

/// Index of the largest logit (the first on ties).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// log-softmax in f64 (the logits are f32; summing log-probabilities over many steps wants
/// the wider type).
pub fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|&x| x as f64 - z).collect()
}

/// Greedy decoding of several prompts at once; returns each one's generated tokens (its end
/// token included when it produced one).
pub fn greedy(
    lm: &mut dyn NextToken,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>, GenerateError> {
    with_no_repeat(lm, opts, |lm, opts| greedy_plain(lm, prompts, opts))
}

/// Runs `f` on `lm`, wrapped in [`NoRepeat`] when `opts` asks for it (the options `f` gets
/// then no longer do, so the wrapper is applied once).
fn with_no_repeat<T>(
    lm: &mut dyn NextToken,
    opts: &GenerateOptions,
    f: impl FnOnce(&mut dyn NextToken, &GenerateOptions) -> T,
) -> T {
    if opts.no_repeat_ngram == 0 {
        return f(lm, opts);
    }
    let mut wrapped = NoRepeat {
        inner: lm,
        n: opts.no_repeat_ngram,
    };
    f(
        &mut wrapped,
        &GenerateOptions {
            no_repeat_ngram: 0,
            ..*opts
        },
    )
}

fn greedy_plain(
    lm: &mut dyn NextToken,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>, GenerateError> {
    let mut seqs: Vec<Vec<i64>> = prompts.to_vec();
    let mut out = vec![vec![]; prompts.len()];
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    for _ in 0..opts.max_new_tokens {
        if live.is_empty() {
            break;
        }
        let batch: Vec<Vec<i64>> = live.iter().map(|&i| seqs[i].clone()).collect();
        let logits = lm.next_logits(&batch)?;
        let mut still = vec![];
        for (&i, row) in live.iter().zip(&logits) {
            let tok = argmax(row) as i64;
            seqs[i].push(tok);
            out[i].push(tok);
            if Some(tok) != opts.eos {
                still.push(i);
            }
        }
        live = still;
    }
    Ok(out)
}

/// The continuation of each prompt, end token removed: greedy decoding in batches of
/// `batch_size` prompts when `opts.beam_width` is 1, else the best beam-search hypothesis
/// of each prompt.
pub fn continuations(
    lm: &mut dyn NextToken,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    batch_size: usize,
) -> Result<Vec<Vec<i64>>, GenerateError> {
    let mut out = Vec::with_capacity(prompts.len());
    if opts.beam_width <= 1 {
        for chunk in prompts.chunks(batch_size.max(1)) {
            out.extend(greedy(lm, chunk, opts)?);
        }
    } else {
        for p in prompts {
            let best = beam_search(lm, p, opts)?.into_iter().next();
            out.push(best.map(|h| h.tokens).unwrap_or_default());
        }
    }
    for t in &mut out {
        if t.last().is_some_and(|&x| Some(x) == opts.eos) {
            t.pop();
        }
    }
    Ok(out)
}

/// One finished beam-search hypothesis.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// The generated tokens (without the prompt).
    pub tokens: Vec<i64>,
    /// Summed log-probability of the tokens.
    pub log_prob: f64,
    /// `log_prob / tokens.len()^length_penalty`, what hypotheses are ranked by.
    pub score: f64,
}

fn normalised(log_prob: f64, len: usize, length_penalty: f64) -> f64 {
    log_prob / (len.max(1) as f64).powf(length_penalty)
}

/// Beam search from one prompt; up to `beam_width` hypotheses, best first.
pub fn beam_search(
    lm: &mut dyn NextToken,
    prompt: &[i64],
    opts: &GenerateOptions,
) -> Result<Vec<Hypothesis>, GenerateError> {
    with_no_repeat(lm, opts, |lm, opts| beam_plain(lm, prompt, opts))
}

fn beam_plain(
    lm: &mut dyn NextToken,
    prompt: &[i64],
    opts: &GenerateOptions,
) -> Result<Vec<Hypothesis>, GenerateError> {
    let k = opts.beam_width;
    if k == 0 {
        return Err(GenerateError::NoBeams);
    }
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let hyp = |tokens: Vec<i64>, log_prob: f64| Hypothesis {
        score: normalised(log_prob, tokens.len(), opts.length_penalty),
        tokens,
        log_prob,
    };
    let mut live: Vec<(Vec<i64>, f64)> = vec![(vec![], 0.0)];
    let mut done: Vec<Hypothesis> = vec![];
    for step in 0..opts.max_new_tokens {
        let seqs: Vec<Vec<i64>> = live
            .iter()
            .map(|(t, _)| prompt.iter().chain(t).copied().collect())
            .collect();
        let logits = lm.next_logits(&seqs)?;
        let mut cand: Vec<(f64, usize, i64)> = vec![];
        for (b, row) in logits.iter().enumerate() {
            for (tok, lp) in log_softmax(row).into_iter().enumerate() {
                cand.push((live[b].1 + lp, b, tok as i64));
            }
        }
        // Highest log-probability first; ties by beam, then token, so runs are reproducible.
        cand.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut next = vec![];
        for (rank, &(lp, b, tok)) in cand.iter().enumerate() {
            let mut tokens = live[b].0.clone();
            tokens.push(tok);
            if Some(tok) == opts.eos {
                if rank < k {
                    done.push(hyp(tokens, lp));
                }
            } else {
                next.push((tokens, lp));
                if next.len() == k {
                    break;
                }
            }
        }
        live = next;
        if live.is_empty() || cannot_improve(&done, &live, k, step + 1, opts) {
            live.clear();
            break;
        }
    }
    done.extend(live.into_iter().map(|(t, lp)| hyp(t, lp)));
    done.sort_by(|a, b| b.score.total_cmp(&a.score));
    done.truncate(k);
    Ok(done)
}

/// Whether `k` finished hypotheses all beat anything a live beam could still become.
fn cannot_improve(
    done: &[Hypothesis],
    live: &[(Vec<i64>, f64)],
    k: usize,
    len: usize,
    opts: &GenerateOptions,
) -> bool {
    if done.len() < k || opts.length_penalty < 0.0 {
        return false;
    }
    let mut scores: Vec<f64> = done.iter().map(|h| h.score).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    let worst_kept = scores[k - 1];
    // A live beam's log-probability (≤ 0) only falls; dividing it by the largest length
    // it can reach bounds its normalised score from above.
    let longest = opts.max_new_tokens.max(len) as f64;
    live.iter()
        .all(|(_, lp)| lp / longest.powf(opts.length_penalty) <= worst_kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Markov chain over a small vocabulary: the next-token logits depend on the last token.
    struct Chain(Vec<Vec<f32>>);

    impl NextToken for Chain {
        fn next_logits(&mut self, seqs: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, GenerateError> {
            Ok(seqs
                .iter()
                .map(|q| self.0[*q.last().unwrap() as usize].clone())
                .collect())
        }
    }

    /// Every sequence the search space holds, scored the same way: those that end with eos
    /// within the limit, and those that reach the limit.
    fn exhaustive(
        lm: &mut dyn NextToken,
        v: i64,
        prompt: &[i64],
        opts: &GenerateOptions,
    ) -> (Vec<i64>, f64) {
        let mut best = (vec![], f64::NEG_INFINITY);
        let mut stack = vec![(vec![], 0.0)];
        while let Some((t, lp)) = stack.pop() {
            let t: Vec<i64> = t;
            let ended = t.last().is_some_and(|&x| Some(x) == opts.eos);
            if ended || t.len() == opts.max_new_tokens {
                let s = normalised(lp, t.len(), opts.length_penalty);
                if s > best.1 {
                    best = (t, s);
                }
                continue;
            }
            let seq: Vec<i64> = prompt.iter().chain(&t).copied().collect();
            let row = log_softmax(&lm.next_logits(&[seq]).unwrap()[0]);
            for tok in 0..v {
                let mut u = t.clone();
                u.push(tok);
                stack.push((u, lp + row[tok as usize]));
            }
        }
        best
    }

    fn chain() -> Chain {
        // Token 0 is eos. From 1, greedy takes 2 (0.5) but 3 leads to a near-certain path.
        Chain(vec![
            vec![0.0, 0.0, 0.0, 0.0],
            vec![-3.0, 0.3, 0.2, -1.0],
            vec![0.1, 0.0, 0.0, 0.2],
            vec![0.0, -5.0, -5.0, 4.0],
        ])
    }

    #[test]
    fn width_one_is_greedy_and_greedy_is_argmax() {
        let mut lm = chain();
        let opts = GenerateOptions {
            max_new_tokens: 5,
            eos: Some(0),
            beam_width: 1,
            length_penalty: 0.0,
            no_repeat_ngram: 0,
        };
        let g = greedy(&mut lm, &[vec![1], vec![3], vec![2]], &opts).unwrap();
        // By hand from the table: argmax after 1 is 1 (0.3), after 3 is 3, after 2 is 3.
        assert_eq!(g, [vec![1, 1, 1, 1, 1], vec![3; 5], vec![3; 5]]);
        for p in [1, 2, 3] {
            let b = beam_search(&mut lm, &[p], &opts).unwrap();
            assert_eq!(b[0].tokens, g[p as usize - 1]);
        }
    }

    #[test]
    fn wide_beams_find_the_exhaustive_optimum() {
        let mut lm = chain();
        for lp in [0.0, 1.0, 0.5] {
            for max_new_tokens in 1..=4 {
                let opts = GenerateOptions {
                    max_new_tokens,
                    eos: Some(0),
                    // ≥ every partial sequence of the search space: beam search is exhaustive.
                    beam_width: 64,
                    length_penalty: lp,
                    no_repeat_ngram: 0,
                };
                for prompt in [vec![1], vec![2, 3]] {
                    let (want, score) = exhaustive(&mut lm, 4, &prompt, &opts);
                    let got = &beam_search(&mut lm, &prompt, &opts).unwrap()[0];
                    assert_eq!(
                        got.tokens, want,
                        "lp {lp}, max {max_new_tokens}, {prompt:?}"
                    );
                    assert!((got.score - score).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn three_beams_beat_greedy_where_greedy_is_myopic() {
        // From 1, log-probabilities: 1 → 1 −0.795 each step (greedy's path, −2.385 over three
        // tokens); 1 → 3 −2.095, then 3 → 3 −0.018: "3 3 3" −2.131 is the optimum. Two beams
        // drop "3" at the first step (third-ranked); three keep it.
        let mut lm = chain();
        let opts = GenerateOptions {
            max_new_tokens: 3,
            eos: Some(0),
            beam_width: 3,
            length_penalty: 0.0,
            no_repeat_ngram: 0,
        };
        let (want, _) = exhaustive(&mut lm, 4, &[1], &opts);
        let g = greedy(&mut lm, &[vec![1]], &opts).unwrap();
        let b = beam_search(&mut lm, &[1], &opts).unwrap();
        assert_eq!(want, [3, 3, 3]);
        assert_eq!(b[0].tokens, want);
        assert_ne!(g[0], want, "the case should defeat greedy");
        let two = beam_search(
            &mut lm,
            &[1],
            &GenerateOptions {
                beam_width: 2,
                ..opts
            },
        )
        .unwrap();
        assert_ne!(two[0].tokens, want);
    }

    #[test]
    fn no_repeat_ngram_bans_repeats_in_greedy_and_beam_search() {
        let mut lm = chain();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            eos: Some(0),
            beam_width: 1,
            length_penalty: 0.0,
            no_repeat_ngram: 2,
        };
        // By hand from the table: after 1 comes 1 (the bigram "1 1" is new), then "1 1" is
        // banned so 2, then 3, 3 ("3 3" new), then "3 3" is banned so eos.
        let g = greedy(&mut lm, &[vec![1]], &opts).unwrap();
        assert_eq!(g, [vec![1, 2, 3, 3, 0]]);
        // Wide beams equal the exhaustive search over the same banned predictions.
        for n in [1, 2, 3] {
            let o = GenerateOptions {
                max_new_tokens: 4,
                beam_width: 64,
                no_repeat_ngram: n,
                ..opts
            };
            let plain = GenerateOptions {
                no_repeat_ngram: 0,
                ..o
            };
            let (want, score) = exhaustive(&mut NoRepeat { inner: &mut lm, n }, 4, &[1], &plain);
            let got = &beam_search(&mut lm, &[1], &o).unwrap()[0];
            assert_eq!(got.tokens, want, "n = {n}");
            assert!((got.score - score).abs() < 1e-12);
            let seq: Vec<i64> = [1].iter().chain(&got.tokens).copied().collect();
            let grams: Vec<&[i64]> = seq.windows(n).collect();
            for (i, a) in grams.iter().enumerate() {
                assert!(
                    !grams[i + 1..].contains(a),
                    "n = {n}: {seq:?} repeats {a:?}"
                );
            }
        }
    }
}
