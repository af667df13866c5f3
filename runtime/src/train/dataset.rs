//! Turning the `[data]` section of a training config into the loop's [`RunData`]: reading
//! the files, mapping labels to ids, encoding text to token ids once up front, and padding
//! each batch to its longest example.
//!
//! Formats here: GLUE-style TSV (`glue-tsv`: tab-separated, quoting off, optional header,
//! columns by name or 0-based index) for single sentences and pairs, for the seq-cls and
//! regression heads. Every error names the file and the line.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use super::config::DataConfig;
use super::{Examples, RunData, TrainError};
use crate::backend::HostTensor;

/// How text becomes token ids.
pub enum Encoder {
    /// A Hugging Face `tokenizer.json` (special tokens, pairs, truncation).
    Tokenizer {
        tok: Box<tokenizers::Tokenizer>,
        pad: i64,
    },
    /// Whitespace words hashed (FNV-1a) into `3..vocab`, after a begin id 0, padded with 1:
    /// for models without a tokenizer, such as the random test fixtures (`hash:VOCAB`).
    Hash { vocab: u64 },
}

impl Encoder {
    pub fn from_spec(spec: &str, base: &Path) -> Result<Encoder, TrainError> {
        if let Some(v) = spec.strip_prefix("hash:") {
            let vocab: u64 = v.parse().ok().filter(|&n| n > 3).ok_or_else(|| {
                TrainError::Data(format!(
                    "data.tokenizer '{spec}': hash:VOCAB needs a vocabulary size above 3"
                ))
            })?;
            return Ok(Encoder::Hash { vocab });
        }
        if spec.is_empty() {
            return Err(TrainError::Data(
                "data.tokenizer is not set: a tokenizer.json path, or hash:VOCAB".into(),
            ));
        }
        let path = resolve(base, spec);
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            TrainError::Data(format!(
                "{}: not a usable tokenizer.json: {e}",
                path.display()
            ))
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
        Ok(Encoder::Tokenizer {
            tok: Box::new(tok),
            pad,
        })
    }

    fn pad(&self) -> i64 {
        match self {
            Encoder::Tokenizer { pad, .. } => *pad,
            Encoder::Hash { .. } => 1,
        }
    }

    /// (ids, token type ids), at most `max_len` long.
    fn encode(
        &self,
        a: &str,
        b: Option<&str>,
        max_len: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), String> {
        match self {
            Encoder::Hash { vocab } => {
                let mut ids = vec![0i64];
                let words = a
                    .split_whitespace()
                    .chain(b.into_iter().flat_map(|s| s.split_whitespace()));
                for w in words.take(max_len.saturating_sub(1)) {
                    let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
                        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
                    });
                    ids.push(3 + (h % (vocab - 3)) as i64);
                }
                let n = ids.len();
                Ok((ids, vec![0; n]))
            }
            Encoder::Tokenizer { tok, .. } => {
                let enc = match b {
                    None => tok.encode(a, true),
                    Some(b) => tok.encode((a, b), true),
                }
                .map_err(|e| e.to_string())?;
                let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
                let mut types: Vec<i64> = enc.get_type_ids().iter().map(|&i| i as i64).collect();
                if ids.len() > max_len {
                    // Keep the final special token (e.g. [SEP]) when cutting.
                    let last = ids[ids.len() - 1];
                    ids.truncate(max_len);
                    types.truncate(max_len);
                    ids[max_len - 1] = last;
                }
                Ok((ids, types))
            }
        }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[derive(Clone, Debug)]
enum Label {
    Class(i64),
    Score(f32),
}

struct Row {
    ids: Vec<i64>,
    types: Vec<i64>,
    label: Label,
}

/// Encoded examples of one file.
pub struct TextExamples {
    rows: Vec<Row>,
    pad: i64,
    token_types: bool,
    multiple: usize,
}

impl Examples for TextExamples {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, TrainError> {
        let b = idx.len();
        let len = idx
            .iter()
            .map(|&i| self.rows[i].ids.len())
            .max()
            .unwrap_or(1)
            .max(1)
            // Few distinct lengths: the backends build one plan per input shape.
            .next_multiple_of(self.multiple.max(1));
        let (mut ids, mut mask, mut types) = (
            vec![self.pad; b * len],
            vec![0i64; b * len],
            vec![0i64; b * len],
        );
        let (mut classes, mut scores) = (vec![], vec![]);
        for (k, &i) in idx.iter().enumerate() {
            let r = &self.rows[i];
            for (j, (&t, &ty)) in r.ids.iter().zip(&r.types).enumerate() {
                ids[k * len + j] = t;
                mask[k * len + j] = 1;
                types[k * len + j] = ty;
            }
            match r.label {
                Label::Class(c) => classes.push(c),
                Label::Score(s) => scores.push(s),
            }
        }
        let t = |v: Vec<i64>| HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b, len]), v).unwrap());
        let mut out = vec![
            ("input_ids".to_string(), t(ids)),
            ("attention_mask".to_string(), t(mask)),
        ];
        if self.token_types {
            out.push(("token_type_ids".to_string(), t(types)));
        }
        if scores.is_empty() {
            out.push((
                "labels".into(),
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b]), classes).unwrap()),
            ));
        } else {
            out.push((
                "labels".into(),
                HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[b]), scores).unwrap()),
            ));
        }
        Ok(out)
    }
}

/// A parsed TSV: the header's column names (or indices) and (line number, fields) rows.
struct Table {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

fn read_tsv(path: &Path, header: bool, limit: usize) -> Result<Table, TrainError> {
    let bytes =
        std::fs::read(path).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let columns: Vec<String> = if header {
        let (_, h) = lines
            .next()
            .ok_or_else(|| TrainError::Data(format!("{}: the file is empty", path.display())))?;
        h.trim_start_matches('\u{feff}')
            .split('\t')
            .map(|c| c.trim().to_string())
            .collect()
    } else {
        vec![]
    };
    let rows: Vec<(usize, Vec<String>)> = lines
        .take(if limit == 0 { usize::MAX } else { limit })
        .map(|(i, l)| (i + 1, l.split('\t').map(|f| f.to_string()).collect()))
        .collect();
    if rows.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no examples in the file",
            path.display()
        )));
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

impl Table {
    fn column(&self, spec: &str) -> Result<usize, TrainError> {
        if let Some(i) = self.columns.iter().position(|c| c == spec) {
            return Ok(i);
        }
        if let Ok(i) = spec.parse::<usize>() {
            return Ok(i);
        }
        Err(TrainError::Data(format!(
            "{}: no column '{spec}' (columns: {})",
            self.path.display(),
            if self.columns.is_empty() {
                "none named: the file has no header, give 0-based indices".to_string()
            } else {
                self.columns.join(", ")
            }
        )))
    }

    fn field<'t>(
        &'t self,
        line: usize,
        row: &'t [String],
        col: usize,
        name: &str,
    ) -> Result<&'t str, TrainError> {
        row.get(col).map(|s| s.trim()).ok_or_else(|| {
            TrainError::Data(format!(
                "{}:{line}: the row has {} fields, column '{name}' is field {}",
                self.path.display(),
                row.len(),
                col + 1
            ))
        })
    }
}

/// Reads and encodes one file. `labels` maps label strings to class ids (`None` for
/// regression, whose labels are numbers).
fn encode_file(
    cfg: &DataConfig,
    path: &Path,
    limit: usize,
    enc: &Encoder,
    labels: Option<&[String]>,
    token_types: bool,
) -> Result<TextExamples, TrainError> {
    if cfg.format != "glue-tsv" {
        return Err(TrainError::Data(format!(
            "data.format '{}' is not supported here (supported: glue-tsv)",
            cfg.format
        )));
    }
    let t = read_tsv(path, cfg.header, limit)?;
    let (ca, cl) = (t.column(&cfg.text_a)?, t.column(&cfg.label)?);
    let cb = cfg.text_b.as_deref().map(|b| t.column(b)).transpose()?;
    let mut rows = Vec::with_capacity(t.rows.len());
    for (line, r) in &t.rows {
        let a = t.field(*line, r, ca, &cfg.text_a)?;
        let b = match (cb, &cfg.text_b) {
            (Some(c), Some(n)) => Some(t.field(*line, r, c, n)?),
            _ => None,
        };
        let raw = t.field(*line, r, cl, &cfg.label)?;
        let label = match labels {
            Some(names) => Label::Class(names.iter().position(|n| n == raw).ok_or_else(|| {
                TrainError::Data(format!(
                    "{}:{line}: unknown label '{raw}' (labels: {})",
                    t.path.display(),
                    names.join(", ")
                ))
            })? as i64),
            None => Label::Score(raw.parse().map_err(|_| {
                TrainError::Data(format!(
                    "{}:{line}: label '{raw}' is not a number",
                    t.path.display()
                ))
            })?),
        };
        let (ids, types) = enc.encode(a, b, cfg.max_len).map_err(|e| {
            TrainError::Data(format!("{}:{line}: cannot tokenise: {e}", t.path.display()))
        })?;
        rows.push(Row { ids, types, label });
    }
    Ok(TextExamples {
        rows,
        pad: enc.pad(),
        token_types,
        multiple: cfg.pad_to_multiple_of.min(cfg.max_len.max(1)),
    })
}

/// Builds the run's data: the training file split by `val_ratio` with `seed`, and the test
/// file. `base` resolves relative paths (the config file's folder); `model_inputs` are the
/// eval program's inputs (whether it reads `token_type_ids`); `task` the head's task.
pub fn load(
    cfg: &DataConfig,
    base: &Path,
    model_inputs: &[String],
    task: &str,
    val_ratio: f64,
    seed: u64,
) -> Result<RunData, TrainError> {
    let enc = Encoder::from_spec(&cfg.tokenizer, base)?;
    let token_types = model_inputs.iter().any(|n| n == "token_type_ids");
    let train_path = resolve(base, &cfg.train);
    let labels: Option<Vec<String>> = match task {
        "seq-cls" => Some(match &cfg.labels {
            Some(l) => l.clone(),
            None => {
                let t = read_tsv(&train_path, cfg.header, cfg.limit)?;
                let c = t.column(&cfg.label)?;
                let mut set: Vec<String> = t
                    .rows
                    .iter()
                    .map(|(line, r)| t.field(*line, r, c, &cfg.label).map(str::to_string))
                    .collect::<Result<_, _>>()?;
                set.sort();
                set.dedup();
                set
            }
        }),
        "regression" => None,
        other => {
            return Err(TrainError::Data(format!(
                "the {other} head needs a data format not supported here yet (supported: glue-tsv for seq-cls and regression)"
            )))
        }
    };
    let data = encode_file(
        cfg,
        &train_path,
        cfg.limit,
        &enc,
        labels.as_deref(),
        token_types,
    )?;
    let test = cfg
        .test
        .as_ref()
        .map(|p| {
            encode_file(
                cfg,
                &resolve(base, p),
                cfg.test_limit,
                &enc,
                labels.as_deref(),
                token_types,
            )
        })
        .transpose()?;
    let (train_idx, val_idx) = super::split(data.len(), val_ratio, seed);
    Ok(RunData {
        data: Box::new(data),
        train_idx,
        val_idx,
        test: test.map(|t| Box::new(t) as Box<dyn Examples>),
    })
}
