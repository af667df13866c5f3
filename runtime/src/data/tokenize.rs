//! Text → token ids: a Hugging Face `tokenizer.json` (the `tokenizers` crate), or hashed
//! whitespace words for models without a tokenizer (the random test fixtures).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::{TruncationParams, TruncationStrategy};

use super::DataError;

/// One encoded input: ids, token type ids and, for pre-tokenised input, the word each token
/// belongs to (`None`: a special token).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Piece {
    pub ids: Vec<i64>,
    pub types: Vec<i64>,
    pub words: Vec<Option<usize>>,
}

/// How text becomes token ids.
pub enum Encoder {
    /// A Hugging Face `tokenizer.json` (special tokens, pairs, truncation).
    Tokenizer {
        /// Truncating to `max_len`, pairs longest first.
        tok: Box<tokenizers::Tokenizer>,
        /// The same without truncation, for text the caller joins and cuts itself.
        plain: Box<tokenizers::Tokenizer>,
        pad: i64,
        eos: Option<i64>,
    },
    /// Whitespace words hashed (FNV-1a) into `3..vocab`, after a begin id 0, padded with 1,
    /// 2 ending a generated text: for models without a tokenizer (`hash:VOCAB`).
    Hash { vocab: u64, max_len: usize },
}

/// Why `path` did not load as a tokenizer: the tokenizers crate's serde message for a JSON
/// file of another kind points at a column of the file ("expected `,` or `}`"), which tells
/// the user nothing; say which of the two it is instead.
fn not_a_tokenizer(path: &Path, error: &str) -> String {
    let json = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    match json {
        Some(v) if v.get("model").is_none() => format!(
            "is JSON but not a tokenizer.json (it has no \"model\" key{}): give the model's \
             tokenizer.json (Hugging Face tokenizers format), or hash:VOCAB",
            match v.as_object() {
                Some(o) if !o.is_empty() => format!(
                    "; its keys: {}",
                    o.keys()
                        .take(8)
                        .map(|k| bidora_compiler::printable(k).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => String::new(),
            }
        ),
        Some(_) => format!("a tokenizer.json this version cannot read: {error}"),
        None => format!("not a usable tokenizer.json (not valid JSON): {error}"),
    }
}

pub(crate) fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// A word's id under `hash:VOCAB`: FNV-1a into `3..vocab`.
fn hash(vocab: u64, w: &str) -> i64 {
    let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    });
    3 + (h % (vocab - 3)) as i64
}

impl Encoder {
    /// `spec` is `hash:VOCAB` or a `tokenizer.json` path (relative to `base`); every
    /// encoding is cut to `max_len` tokens.
    pub fn from_spec(spec: &str, base: &Path, max_len: usize) -> Result<Encoder, DataError> {
        if max_len < 2 {
            return Err(DataError::Config(format!(
                "max_len {max_len} leaves no room for text"
            )));
        }
        if let Some(v) = spec.strip_prefix("hash:") {
            let vocab: u64 = v.parse().ok().filter(|&n| n > 3).ok_or_else(|| {
                DataError::Config(format!(
                    "tokenizer '{spec}': hash:VOCAB needs a vocabulary size above 3"
                ))
            })?;
            return Ok(Encoder::Hash { vocab, max_len });
        }
        if spec.is_empty() || spec == "hash" {
            return Err(DataError::Config(format!(
                "tokenizer '{spec}': give a tokenizer.json path, or hash:VOCAB"
            )));
        }
        let path = resolve(base, spec);
        let mut tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::File {
            file: path.clone(),
            message: not_a_tokenizer(&path, &e.to_string()),
        })?;
        let pad = tok
            .get_padding()
            .map(|p| p.pad_id as i64)
            .or_else(|| {
                ["[PAD]", "<pad>"]
                    .iter()
                    .find_map(|t| tok.token_to_id(t))
                    .map(|i| i as i64)
            })
            .unwrap_or(0);
        let eos = ["<|endoftext|>", "</s>", "<eos>", "[SEP]"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .map(|i| i as i64);
        // Files often carry fixed padding (all-MiniLM's: 128) and their own truncation;
        // batches are padded here, and truncation follows the config.
        tok.with_padding(None);
        let mut plain = tok.clone();
        plain
            .with_truncation(None)
            .map_err(|e| DataError::Config(format!("{}: truncation: {e}", path.display())))?;
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        }))
        .map_err(|e| DataError::Config(format!("{}: truncation: {e}", path.display())))?;
        Ok(Encoder::Tokenizer {
            tok: Box::new(tok),
            plain: Box::new(plain),
            pad,
            eos,
        })
    }

    pub fn pad(&self) -> i64 {
        match self {
            Encoder::Tokenizer { pad, .. } => *pad,
            Encoder::Hash { .. } => 1,
        }
    }

    /// The id ending a generated text.
    pub fn eos(&self) -> Result<i64, DataError> {
        match self {
            Encoder::Tokenizer { eos, .. } => eos.ok_or_else(|| {
                DataError::Config(
                    "the tokenizer has none of <|endoftext|>, </s>, <eos>, [SEP] to end a text"
                        .into(),
                )
            }),
            Encoder::Hash { .. } => Ok(2),
        }
    }

    /// A sentence or a pair, with the tokenizer's special tokens, at most `max_len` long
    /// (pairs cut longest first).
    pub fn encode(&self, a: &str, b: Option<&str>) -> Result<Piece, String> {
        match self {
            Encoder::Hash { vocab, max_len } => {
                let mut ids = vec![0i64];
                let words = a
                    .split_whitespace()
                    .chain(b.into_iter().flat_map(|s| s.split_whitespace()));
                ids.extend(words.take(max_len - 1).map(|w| hash(*vocab, w)));
                let n = ids.len();
                Ok(Piece {
                    ids,
                    types: vec![0; n],
                    words: vec![],
                })
            }
            Encoder::Tokenizer { tok, .. } => {
                let enc = match b {
                    None => tok.encode(a, true),
                    Some(b) => tok.encode((a, b), true),
                }
                .map_err(|e| e.to_string())?;
                Ok(Piece {
                    ids: enc.get_ids().iter().map(|&i| i as i64).collect(),
                    types: enc.get_type_ids().iter().map(|&i| i as i64).collect(),
                    words: vec![],
                })
            }
        }
    }

    /// Pre-tokenised words (CoNLL), with special tokens; `words` maps each token to its word.
    /// Words past `max_len` are dropped.
    pub fn encode_words(&self, words: &[String]) -> Result<Piece, String> {
        match self {
            Encoder::Hash { vocab, max_len } => {
                let mut p = Piece {
                    ids: vec![0],
                    types: vec![0],
                    words: vec![None],
                };
                for (i, w) in words.iter().take(max_len - 1).enumerate() {
                    p.ids.push(hash(*vocab, w));
                    p.types.push(0);
                    p.words.push(Some(i));
                }
                Ok(p)
            }
            Encoder::Tokenizer { tok, .. } => {
                let enc = tok.encode(words, true).map_err(|e| e.to_string())?;
                Ok(Piece {
                    ids: enc.get_ids().iter().map(|&i| i as i64).collect(),
                    types: enc.get_type_ids().iter().map(|&i| i as i64).collect(),
                    words: enc
                        .get_word_ids()
                        .iter()
                        .map(|w| w.map(|w| w as usize))
                        .collect(),
                })
            }
        }
    }

    /// Text without special tokens and without truncation (prompts and continuations that
    /// the caller joins and cuts).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>, String> {
        match self {
            Encoder::Hash { vocab, .. } => {
                Ok(text.split_whitespace().map(|w| hash(*vocab, w)).collect())
            }
            Encoder::Tokenizer { plain, .. } => {
                let enc = plain.encode(text, false).map_err(|e| e.to_string())?;
                Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
            }
        }
    }

    /// What turns this encoder's ids back into text. A tokenizer decodes any id; hashing
    /// cannot be inverted, so `hash:VOCAB` decodes through the words of `texts` (the data's
    /// prompts and references: every word a model trained on them can have learnt), the first
    /// word on a collision and `<id>` for an id no word hashes to.
    pub fn decoder<'t>(&self, texts: impl IntoIterator<Item = &'t str>) -> Decoder {
        match self {
            Encoder::Tokenizer { plain, .. } => Decoder::Tokenizer(plain.clone()),
            Encoder::Hash { vocab, .. } => {
                let mut words = HashMap::new();
                for w in texts.into_iter().flat_map(str::split_whitespace) {
                    words
                        .entry(hash(*vocab, w))
                        .or_insert_with(|| w.to_string());
                }
                Decoder::Words(words)
            }
        }
    }

    /// Refuses ids the model has no embedding row for: the tokenizer is not the model's.
    pub fn check_vocab(&self, ids: &[i64], vocab: Option<usize>) -> Result<(), String> {
        let Some(v) = vocab else { return Ok(()) };
        match ids.iter().find(|&&i| i < 0 || i as u64 >= v as u64) {
            None => Ok(()),
            Some(i) => Err(format!(
                "token id {i} is outside the model's vocabulary of {v}: the tokenizer does not belong to this model{}",
                match self {
                    Encoder::Tokenizer { tok, .. } =>
                        format!(" (it has {} tokens)", tok.get_vocab_size(true)),
                    Encoder::Hash { vocab, .. } => format!(" (hash:{vocab})"),
                }
            )),
        }
    }
}

/// Token ids back to text (see [`Encoder::decoder`]).
pub enum Decoder {
    Tokenizer(Box<tokenizers::Tokenizer>),
    Words(HashMap<i64, String>),
}

impl Decoder {
    /// The text of `ids`, special tokens dropped.
    pub fn decode(&self, ids: &[i64]) -> Result<String, String> {
        match self {
            Decoder::Tokenizer(tok) => {
                let ids: Vec<u32> = ids
                    .iter()
                    .map(|&i| u32::try_from(i).map_err(|_| format!("token id {i} is negative")))
                    .collect::<Result<_, _>>()?;
                tok.decode(&ids, true).map_err(|e| e.to_string())
            }
            Decoder::Words(words) => Ok(ids
                .iter()
                .map(|i| words.get(i).cloned().unwrap_or_else(|| format!("<{i}>")))
                .collect::<Vec<_>>()
                .join(" ")),
        }
    }
}

/// What generating text from a set needs besides the model: ids back to text, the id that
/// ends a text, and an id to pad sequences with.
pub struct TextCodec {
    pub decoder: Decoder,
    pub eos: i64,
    pub pad: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_words_decode_through_the_words_of_the_data() {
        let enc = Encoder::from_spec("hash:1000", Path::new("."), 64).unwrap();
        let text = "name[Alimentum] is in the city centre .";
        let dec = enc.decoder([text, "another text"]);
        let ids = enc.encode_plain(text).unwrap();
        assert_eq!(dec.decode(&ids).unwrap(), text);
        // An id no word of the data hashes to is shown, not dropped.
        let seen: Vec<i64> = "name[Alimentum] is in the city centre . another text"
            .split_whitespace()
            .map(|w| hash(1000, w))
            .collect();
        let unseen = (3..1000).find(|i| !seen.contains(i)).unwrap();
        assert_eq!(
            dec.decode(&[ids[0], unseen]).unwrap(),
            format!("name[Alimentum] <{unseen}>")
        );
    }
}
