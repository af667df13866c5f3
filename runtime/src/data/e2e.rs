//! E2E NLG (`e2e`): CSV with a header `mr,ref`, one row per human reference, so a meaning
//! representation (`name[Alimentum], area[city centre], …`) repeats over several rows
//! (shared/data/README.md, "E2E NLG"; Novikova et al. 2017). For the causal-lm head an example
//! is `prompt + separator + reference + eos`, scored only on the reference and eos.

use std::path::Path;

use super::batch::{Encoded, References, Target};
use super::csvjson::{field, read_table};
use super::tokenize::Encoder;
use super::{at, file_error, DataError};

/// One row: the meaning representation and one reference for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub line: usize,
    pub mr: String,
    pub reference: String,
}

/// Reads the first `limit` (0: all) rows. Column names match case-insensitively (the test
/// set without references names its column `MR`).
pub fn read(path: &Path, limit: usize) -> Result<Vec<Pair>, DataError> {
    let t = read_table(path, true, limit)?;
    let col = |name: &str| {
        t.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                file_error(
                    path,
                    format!("no column '{name}' (columns: {})", t.header.join(", ")),
                )
            })
    };
    let (cm, cr) = (col("mr")?, col("ref")?);
    let mut out = vec![];
    for (line, f) in &t.rows {
        let mr = field(path, *line, f, cm, "mr")?;
        let reference = field(path, *line, f, cr, "ref")?;
        if mr.is_empty() || reference.is_empty() {
            return Err(at(path, *line, "an empty mr or ref"));
        }
        out.push(Pair {
            line: *line,
            mr,
            reference,
        });
    }
    if out.is_empty() {
        return Err(file_error(path, "no examples in the file"));
    }
    Ok(out)
}

/// The references of each distinct MR, in order of first appearance.
pub fn references(pairs: &[Pair]) -> References {
    let mut r = References::default();
    let mut index = std::collections::HashMap::new();
    for p in pairs {
        let g = *index.entry(p.mr.clone()).or_insert_with(|| {
            r.groups.push((p.mr.clone(), vec![]));
            r.groups.len() - 1
        });
        r.groups[g].1.push(p.reference.clone());
        r.example_group.push(g);
    }
    r
}

/// One causal-lm example: ids = prompt ids ++ reference ids ++ eos, labels = -100 over the
/// prompt, the ids themselves over the reference and eos (Hugging Face's convention: labels
/// unshifted, the loss shifts). A reference that does not fit is cut and keeps its eos; a
/// prompt that leaves no room for one reference token is an error.
pub fn encode(
    enc: &Encoder,
    path: &Path,
    p: &Pair,
    separator: &str,
    max_len: usize,
) -> Result<Encoded, DataError> {
    let tokenise = |s: &str| {
        enc.encode_plain(s)
            .map_err(|e| at(path, p.line, format!("cannot tokenise: {e}")))
    };
    let prompt = tokenise(&format!("{}{separator}", p.mr))?;
    let mut target = tokenise(&p.reference)?;
    let room = max_len.saturating_sub(prompt.len() + 1);
    if room == 0 {
        return Err(at(
            path,
            p.line,
            format!(
                "the prompt is {} tokens: max_len {max_len} leaves no room for the reference",
                prompt.len()
            ),
        ));
    }
    target.truncate(room);
    target.push(enc.eos()?);
    let ignore = bidora_compiler::heads::IGNORE_INDEX;
    let labels: Vec<i64> = std::iter::repeat_n(ignore, prompt.len())
        .chain(target.iter().copied())
        .collect();
    let ids: Vec<i64> = prompt.into_iter().chain(target).collect();
    Ok(Encoded {
        line: p.line,
        types: vec![0; ids.len()],
        ids,
        target: Target::Tokens(labels),
    })
}
