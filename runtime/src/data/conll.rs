//! CoNLL-2003 (`conll`): one token per line, `word POS chunk NER` separated by spaces (the
//! word is the first field, the tag the last), a blank line between sentences and
//! `-DOCSTART- -X- O O` opening each document (shared/data/README.md, "CoNLL-2003"; Tjong Kim
//! Sang & De Meulder 2003). The English files' tags are IOB1: `B-` appears only where an
//! entity directly follows one of the same type.
//!
//! The same reader takes `token<TAB>tag` files without `-DOCSTART-` lines, and untyped tags
//! `B` / `I` / `O` as BioBERT's NER releases write them (JNLPBA's single-type variants,
//! BC2GM, NCBI-disease, BC5CDR): an untyped entity is one entity type, scored over spans
//! like the typed ones (`metrics::ner` reads a bare `B`/`I` as a chunk of type `_`).

use std::path::Path;

use super::{at, file_error, read_bytes, DataError};

/// One sentence: its words, their tags and the line of each word.
#[derive(Clone, Debug, PartialEq)]
pub struct Sentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
    pub lines: Vec<usize>,
}

/// Which tagging scheme the labels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// As in the file.
    Iob1,
    /// Every entity starts with `B-` (what Hugging Face's `conll2003` and most models use).
    Iob2,
}

impl Scheme {
    pub fn parse(s: &str) -> Result<Scheme, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "iob1" => Ok(Scheme::Iob1),
            "iob2" | "bio" => Ok(Scheme::Iob2),
            other => Err(DataError::Config(format!(
                "tag_scheme '{other}' is not iob1 or iob2"
            ))),
        }
    }
}

/// The entity type of a `B`/`I` tag: `Some("PER")` for `I-PER`, `Some("")` for an untyped
/// `I`, `None` for `O`.
fn kind_of(tag: &str) -> Option<&str> {
    match tag {
        "B" | "I" => Some(""),
        _ => tag.strip_prefix("B-").or_else(|| tag.strip_prefix("I-")),
    }
}

/// IOB1 → IOB2: an `I-X` (or untyped `I`) that does not continue an entity of its type
/// (sentence start, after `O`, after another type) starts one, so becomes `B-X` (`B`). IOB2
/// input comes out unchanged.
pub fn iob1_to_iob2(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for (i, t) in tags.iter().enumerate() {
        let inside = t == "I" || t.starts_with("I-");
        let kind = kind_of(t);
        let continues = i > 0 && kind.is_some() && kind_of(&tags[i - 1]) == kind;
        let converted = match kind {
            Some(k) if inside && !continues => {
                if k.is_empty() {
                    "B".to_string()
                } else {
                    format!("B-{k}")
                }
            }
            _ => t.clone(),
        };
        out.push(converted);
    }
    out
}

fn check_tag(path: &Path, line: usize, tag: &str) -> Result<(), DataError> {
    let typed = (tag.starts_with("B-") || tag.starts_with("I-")) && tag.len() > 2;
    if tag == "O" || tag == "B" || tag == "I" || typed {
        Ok(())
    } else {
        Err(at(
            path,
            line,
            format!("tag '{tag}' is not O, B, I, B-TYPE or I-TYPE"),
        ))
    }
}

/// Reads the first `limit` (0: all) sentences of `path`, tags converted to `scheme`.
pub fn read(path: &Path, scheme: Scheme, limit: usize) -> Result<Vec<Sentence>, DataError> {
    let bytes = read_bytes(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut out = vec![];
    let mut cur = Sentence {
        words: vec![],
        tags: vec![],
        lines: vec![],
    };
    let finish = |cur: &mut Sentence, out: &mut Vec<Sentence>| {
        if !cur.words.is_empty() {
            let mut s = std::mem::replace(
                cur,
                Sentence {
                    words: vec![],
                    tags: vec![],
                    lines: vec![],
                },
            );
            if scheme == Scheme::Iob2 {
                s.tags = iob1_to_iob2(&s.tags);
            }
            out.push(s);
        }
    };
    for (i, l) in text.lines().enumerate() {
        if limit != 0 && out.len() >= limit {
            break;
        }
        let line = i + 1;
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.is_empty() {
            finish(&mut cur, &mut out);
            continue;
        }
        if fields[0] == "-DOCSTART-" {
            finish(&mut cur, &mut out);
            continue;
        }
        if fields.len() < 2 {
            return Err(at(
                path,
                line,
                format!("'{l}' has no tag: expected `word ... tag`"),
            ));
        }
        let tag = fields[fields.len() - 1];
        check_tag(path, line, tag)?;
        cur.words.push(fields[0].to_string());
        cur.tags.push(tag.to_string());
        cur.lines.push(line);
    }
    if limit == 0 || out.len() < limit {
        finish(&mut cur, &mut out);
    }
    if out.is_empty() {
        return Err(file_error(path, "no sentences in the file"));
    }
    Ok(out)
}

/// Token labels for one encoded sentence: the word's tag id on its first sub-word, -100 on
/// the other sub-words and on special tokens (`word_of`: the word of each token).
pub fn first_subword_labels(
    path: &Path,
    s: &Sentence,
    word_of: &[Option<usize>],
    names: &[String],
) -> Result<Vec<i64>, DataError> {
    let mut out = Vec::with_capacity(word_of.len());
    let mut prev = None;
    for &w in word_of {
        let y = match w {
            Some(w) if prev != Some(w) => {
                let (tag, line) = s.tags.get(w).zip(s.lines.get(w)).ok_or_else(|| {
                    file_error(
                        path,
                        format!(
                            "the tokenizer made word {w} of a {}-word sentence",
                            s.words.len()
                        ),
                    )
                })?;
                super::class_id(path, *line, tag, names)?
            }
            _ => bidora_compiler::heads::IGNORE_INDEX,
        };
        out.push(y);
        prev = w;
    }
    Ok(out)
}
