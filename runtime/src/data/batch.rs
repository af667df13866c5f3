//! Encoded examples and their batches: padding to the batch's longest example, rounded up to
//! a multiple, and the label tensor each head reads (`compiler::heads`).

use ndarray::{ArrayD, IxDyn};

use super::{DataError, Examples};
use crate::backend::HostTensor;

/// What an example is labelled with, per head.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// seq-cls: `labels: i64[batch]`.
    Class(i64),
    /// regression: `labels: f32[batch]`.
    Score(f32),
    /// multi-label: `labels: f32[batch, n]`, 0 or 1.
    MultiHot(Vec<f32>),
    /// token-cls and causal-lm: `labels: i64[batch, seq]`, one per token, -100 ignored.
    /// (The causal-lm head shifts `input_ids` itself and reads no labels input today; the
    /// tensor is there for a head that does, and is left out by programs without it.)
    Tokens(Vec<i64>),
}

/// One example: token ids, token type ids, its target and the line it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub line: usize,
    pub ids: Vec<i64>,
    pub types: Vec<i64>,
    pub target: Target,
}

/// Grouped references for data-to-text evaluation: each prompt (E2E: the meaning
/// representation) with all its human references, in order of first appearance, and the
/// group of every example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct References {
    pub groups: Vec<(String, Vec<String>)>,
    pub example_group: Vec<usize>,
}

/// The encoded examples of one file; the loop's [`Examples`].
pub struct EncodedSet {
    pub rows: Vec<Encoded>,
    /// Label names in id order (class, tag or topic names; empty for regression and causal-lm).
    pub labels: Vec<String>,
    pub pad: i64,
    pub token_types: bool,
    /// Batches are padded to a multiple of this (0 or 1: to the longest), never past `max_len`
    /// (unless the longest example is longer).
    pub multiple: usize,
    pub max_len: usize,
    pub references: Option<References>,
    /// Data-to-text sets: how generated ids become text (shared by the training and test
    /// files).
    pub codec: Option<std::sync::Arc<super::tokenize::TextCodec>>,
}

impl EncodedSet {
    /// The padded length of a batch whose longest example has `longest` tokens.
    pub fn padded_len(&self, longest: usize) -> usize {
        let longest = longest.max(1);
        if self.multiple <= 1 {
            return longest;
        }
        longest
            .div_ceil(self.multiple)
            .saturating_mul(self.multiple)
            .min(self.max_len.max(longest))
    }
}

impl Examples for EncodedSet {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn label_names(&self) -> Option<&[String]> {
        (!self.labels.is_empty()).then_some(self.labels.as_slice())
    }

    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, DataError> {
        let rows: Vec<&Encoded> = idx
            .iter()
            .map(|&i| {
                self.rows.get(i).ok_or_else(|| {
                    DataError::Batch(format!("example {i} asked of a set of {}", self.rows.len()))
                })
            })
            .collect::<Result<_, _>>()?;
        let b = rows.len();
        let len = self.padded_len(rows.iter().map(|r| r.ids.len()).max().unwrap_or(1));
        let (mut ids, mut mask, mut types) = (
            vec![self.pad; b * len],
            vec![0i64; b * len],
            vec![0i64; b * len],
        );
        for (k, r) in rows.iter().enumerate() {
            for (j, (&t, &ty)) in r.ids.iter().zip(&r.types).enumerate() {
                ids[k * len + j] = t;
                mask[k * len + j] = 1;
                types[k * len + j] = ty;
            }
        }
        let i64s = |shape: &[usize], v: Vec<i64>| {
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).expect("sized above"))
        };
        let f32s = |shape: &[usize], v: Vec<f32>| {
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("sized above"))
        };
        let mut out = vec![
            ("input_ids".to_string(), i64s(&[b, len], ids)),
            ("attention_mask".to_string(), i64s(&[b, len], mask)),
        ];
        if self.token_types {
            out.push(("token_type_ids".to_string(), i64s(&[b, len], types)));
        }
        let kind = |t: &Target| std::mem::discriminant(t);
        if let Some(first) = rows.first() {
            if rows.iter().any(|r| kind(&r.target) != kind(&first.target)) {
                return Err(DataError::Batch(
                    "a batch mixes label kinds (a bug in the data reader)".into(),
                ));
            }
        }
        let labels = match rows.first().map(|r| &r.target) {
            None | Some(Target::Class(_)) => i64s(
                &[b],
                rows.iter()
                    .map(|r| match r.target {
                        Target::Class(c) => c,
                        _ => 0,
                    })
                    .collect(),
            ),
            Some(Target::Score(_)) => f32s(
                &[b],
                rows.iter()
                    .map(|r| match r.target {
                        Target::Score(s) => s,
                        _ => 0.0,
                    })
                    .collect(),
            ),
            Some(Target::MultiHot(first)) => {
                let n = first.len();
                let mut v = Vec::with_capacity(b * n);
                for r in &rows {
                    match &r.target {
                        Target::MultiHot(h) if h.len() == n => v.extend_from_slice(h),
                        _ => {
                            return Err(DataError::Batch(
                                "multi-hot labels of different widths in one batch".into(),
                            ))
                        }
                    }
                }
                f32s(&[b, n], v)
            }
            Some(Target::Tokens(_)) => {
                let mut v = vec![bidora_compiler::heads::IGNORE_INDEX; b * len];
                for (k, r) in rows.iter().enumerate() {
                    if let Target::Tokens(t) = &r.target {
                        for (j, &y) in t.iter().take(len).enumerate() {
                            v[k * len + j] = y;
                        }
                    }
                }
                i64s(&[b, len], v)
            }
        };
        out.push(("labels".to_string(), labels));
        Ok(out)
    }

    fn references(&self) -> Option<&References> {
        self.references.as_ref()
    }

    fn text_codec(&self) -> Option<&super::tokenize::TextCodec> {
        self.codec.as_deref()
    }

    fn prompt(&self, i: usize) -> Option<Vec<i64>> {
        let r = self.rows.get(i)?;
        let Target::Tokens(labels) = &r.target else {
            return None;
        };
        let ignore = bidora_compiler::heads::IGNORE_INDEX;
        let n = labels.iter().take_while(|&&y| y == ignore).count();
        (n > 0 && n < r.ids.len()).then(|| r.ids[..n].to_vec())
    }
}
