//! Entity-level precision, recall and F1 for tagged sequences, the conlleval way (seqeval's
//! default, non-strict mode): an entity is a maximal chunk read with conlleval's chunk
//! start/end rules, so IOB1 (`I-X` may open a chunk; `B-X` only separates two adjacent chunks
//! of one type) and IOB2 (`B-X` opens every chunk) are both read correctly, and stray `I-X`
//! after `O` or after another type opens a new chunk. Only exact (type, start, end) matches
//! count. Tags are `O` or `P-TYPE` with P one of B, I, E, S.

use std::collections::HashSet;

use super::{f1_counts, MetricError};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entity {
    pub kind: String,
    /// First and last token (inclusive).
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EntityScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub gold: usize,
    pub predicted: usize,
    pub correct: usize,
}

/// (prefix, type) of a tag; `O` has type `_` as in seqeval so that `O` never continues a chunk.
fn split(tag: &str) -> (char, &str) {
    let prefix = tag.chars().next().unwrap_or('O');
    let rest = &tag[prefix.len_utf8().min(tag.len())..];
    let kind = rest.split_once('-').map_or(rest, |(_, k)| k);
    (prefix, if kind.is_empty() { "_" } else { kind })
}

// conlleval's endOfChunk / startOfChunk rules.
fn ends(prev: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(prev, 'E' | 'S')
        || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev != 'O' && prev != '.' && prev_kind != kind)
}

fn starts(prev: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_kind != kind)
}

/// The chunks of one sentence.
pub fn entities<S: AsRef<str>>(tags: &[S]) -> Vec<Entity> {
    let mut out = vec![];
    let (mut prev, mut prev_kind, mut begin) = ('O', "_", 0);
    // A trailing `O` closes the last chunk.
    for (i, t) in tags.iter().map(AsRef::as_ref).chain(["O"]).enumerate() {
        let (tag, kind) = split(t);
        if ends(prev, tag, prev_kind, kind) {
            out.push(Entity {
                kind: prev_kind.to_string(),
                start: begin,
                end: i - 1,
            });
        }
        if starts(prev, tag, prev_kind, kind) {
            begin = i;
        }
        (prev, prev_kind) = (tag, kind);
    }
    out
}

/// Micro-averaged over all entities of all sentences (conlleval's overall line).
pub fn entity_scores<S: AsRef<str>>(
    gold: &[Vec<S>],
    pred: &[Vec<S>],
) -> Result<EntityScores, MetricError> {
    if gold.len() != pred.len() {
        return Err(MetricError::Count {
            hyps: pred.len(),
            refs: gold.len(),
        });
    }
    let (mut g_all, mut p_all) = (HashSet::new(), HashSet::new());
    for (s, (g, p)) in gold.iter().zip(pred).enumerate() {
        if g.len() != p.len() {
            return Err(MetricError::TagCount {
                sentence: s,
                gold: g.len(),
                pred: p.len(),
            });
        }
        g_all.extend(entities(g).into_iter().map(|e| (s, e)));
        p_all.extend(entities(p).into_iter().map(|e| (s, e)));
    }
    let correct = g_all.intersection(&p_all).count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (c, g, p) = (correct as f64, g_all.len() as f64, p_all.len() as f64);
    Ok(EntityScores {
        precision: ratio(correct, p_all.len()),
        recall: ratio(correct, g_all.len()),
        f1: f1_counts(c, p - c, g - c),
        gold: g_all.len(),
        predicted: p_all.len(),
        correct,
    })
}

#[cfg(test)]
mod tests {
    use super::super::close;
    use super::*;

    fn e(kind: &str, start: usize, end: usize) -> Entity {
        Entity {
            kind: kind.into(),
            start,
            end,
        }
    }

    fn s(tags: &str) -> Vec<&str> {
        tags.split_whitespace().collect()
    }

    #[test]
    fn chunks_match_seqeval() {
        // seqeval 1.2.2 `get_entities` on each line (type, start, end).
        assert_eq!(
            entities(&s("B-PER I-PER O B-LOC I-LOC I-LOC O")),
            [e("PER", 0, 1), e("LOC", 3, 5)]
        );
        // IOB1: B only between two same-type chunks.
        assert_eq!(
            entities(&s("I-ORG I-ORG B-ORG O I-MISC O")),
            [e("ORG", 0, 1), e("ORG", 2, 2), e("MISC", 4, 4)]
        );
        assert_eq!(
            entities(&s("O B-PER B-PER I-PER O I-LOC I-PER")),
            [
                e("PER", 1, 1),
                e("PER", 2, 3),
                e("LOC", 5, 5),
                e("PER", 6, 6)
            ]
        );
        assert_eq!(
            entities(&s("I-PER I-LOC B-LOC E-LOC O I-X")),
            [e("PER", 0, 0), e("LOC", 1, 1), e("LOC", 2, 3), e("X", 5, 5)]
        );
    }

    #[test]
    fn scores_match_seqeval() {
        // python -c "from seqeval.metrics import *; gold=[...]; pred=[...]; \
        //   print(precision_score(gold,pred), recall_score(gold,pred), f1_score(gold,pred))"
        // with the sentences below (seqeval 1.2.2): 0.3333333333333333 0.2222222222222222
        // 0.26666666666666666.
        let gold = vec![
            s("B-PER I-PER O B-LOC I-LOC I-LOC O"),
            s("I-ORG I-ORG B-ORG O I-MISC O"),
            s("O B-PER B-PER I-PER O I-LOC I-PER"),
        ];
        let pred = vec![
            s("B-PER I-PER O B-LOC I-LOC O O"),
            s("I-ORG I-ORG I-ORG O I-MISC O"),
            s("O B-PER I-PER I-PER O B-LOC I-LOC"),
        ];
        let r = entity_scores(&gold, &pred).unwrap();
        assert_eq!((r.gold, r.predicted, r.correct), (9, 6, 2));
        assert!(close(r.precision, 0.3333333333333333, 1e-15));
        assert!(close(r.recall, 0.2222222222222222, 1e-15));
        assert!(close(r.f1, 0.26666666666666666, 1e-15));
        let bad = entity_scores(&gold, &[s("O")]);
        assert!(matches!(bad, Err(MetricError::Count { .. })));
    }

    #[test]
    fn a_partial_span_or_wrong_type_earns_nothing() {
        let g = vec![s("B-PER I-PER I-PER")];
        for p in ["B-PER I-PER O", "B-LOC I-LOC I-LOC", "O B-PER I-PER"] {
            let r = entity_scores(&g, &[s(p)]).unwrap();
            assert_eq!(r.correct, 0, "{p}");
            assert_eq!(r.f1, 0.0);
        }
        assert_eq!(entity_scores(&g, &g).unwrap().f1, 1.0);
    }
}
