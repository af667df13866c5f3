//! Peptide classification CSVs as bundled with modlAMP (`peptides`): `sequence,label` rows,
//! label 1 = AMP/ACP and 0 = the negative set, after a first line that is not a header but a
//! sklearn-style descriptor `n_samples,n_features,name_class0,name_class1`; some rows have a
//! space after the comma, some files CRLF endings (shared/data/README.md, "Peptides").

use std::path::Path;

use super::csvjson::{field, read_table};
use super::{at, file_error, DataError, Record, Records};

/// The sequences of a file, and the class names its descriptor line gives.
pub struct Peptides {
    pub records: Records,
    /// `[name of class 0, name of class 1]`, e.g. `["UniProt", "AMP"]`.
    pub class_names: Option<[String; 2]>,
    /// Rows dropped as repeats of an earlier (sequence, label) row.
    pub duplicates: usize,
}

/// One-letter amino-acid codes (IUPAC, with the ambiguity codes B, Z, X and U, O).
fn is_residue(c: char) -> bool {
    c.is_ascii_uppercase() && !matches!(c, 'J')
}

/// Reads the first `limit` (0: all) peptides. Residues are joined with `sep` so that a
/// tokenizer splitting on it sees one token per residue (`" "` for word-level protein
/// vocabularies and hashed words; `""` keeps the sequence whole). With `dedup`, repeated
/// (sequence, label) rows are dropped: the README warns that AMPvsUniProt has 203, which
/// would otherwise land on both sides of a split.
pub fn read(path: &Path, sep: &str, dedup: bool, limit: usize) -> Result<Peptides, DataError> {
    let t = read_table(path, false, 0)?;
    let mut rows = t.rows.iter().peekable();
    let mut class_names = None;
    if let Some((_, f)) = rows.peek() {
        if f.len() == 4 && f[0].trim().parse::<u64>().is_ok() {
            class_names = Some([f[2].trim().to_string(), f[3].trim().to_string()]);
            rows.next();
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    let mut duplicates = 0;
    for (line, f) in rows {
        if limit != 0 && out.len() == limit {
            break;
        }
        let seq = field(path, *line, f, 0, "sequence")?;
        let label = field(path, *line, f, 1, "label")?;
        if f.len() > 2 {
            return Err(at(
                path,
                *line,
                format!("{} fields: expected `sequence,label`", f.len()),
            ));
        }
        if seq.is_empty() || !seq.chars().all(is_residue) {
            return Err(at(
                path,
                *line,
                format!("'{seq}' is not a sequence of one-letter amino-acid codes"),
            ));
        }
        if dedup && !seen.insert((seq.clone(), label.clone())) {
            duplicates += 1;
            continue;
        }
        let text = seq.chars().map(String::from).collect::<Vec<_>>().join(sep);
        out.push(Record {
            line: *line,
            text_a: text,
            text_b: None,
            label,
        });
    }
    if out.is_empty() {
        return Err(file_error(path, "no peptides in the file"));
    }
    Ok(Peptides {
        records: Records {
            file: path.to_path_buf(),
            rows: out,
        },
        class_names,
        duplicates,
    })
}
