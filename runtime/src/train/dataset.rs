//! Turning the `[data]` section of a training config into the loop's [`RunData`]: which
//! reader of `crate::data` reads the files, which labels they map to, and the encoding of
//! every example up front. The formats themselves live in `crate::data`.

use std::path::Path;

use super::config::DataConfig;
use super::{RunData, TrainError};
use crate::data::tokenize::{resolve, Encoder, TextCodec};
use crate::data::{
    at, class_id, conll, csvjson, e2e, glue, label_set, peptides, reuters, DataError, Encoded,
    EncodedSet, Records, Target,
};

/// What the data must fit: the eval program's inputs (whether it reads `token_type_ids`),
/// the head's task, the model's vocabulary size (token ids at or above it are refused) and
/// the head's class count (a label set of another size is refused).
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub inputs: Vec<String>,
    pub task: String,
    pub vocab_size: Option<usize>,
    /// Classes (tags, topics) the head scores: the last dim of the eval program's logits;
    /// `None` when the artifact does not say (a symbolic dim) or the head has no classes.
    pub classes: Option<usize>,
}

impl ModelSpec {
    pub fn of(art: &crate::artifact::Artifact) -> Result<ModelSpec, TrainError> {
        let task = art.manifest.task.as_ref().ok_or_else(|| {
            TrainError::Artifact("it has no training programs: compile it with --task".into())
        })?;
        Ok(ModelSpec {
            inputs: art
                .manifest
                .program(crate::artifact::ProgramKey::Eval)
                .map(|p| p.inputs.iter().map(|i| i.name.clone()).collect())
                .unwrap_or_default(),
            task: task.task.name().to_string(),
            vocab_size: art
                .manifest
                .vocab_size
                .and_then(|v| usize::try_from(v).ok()),
            classes: classes_of(art),
        })
    }
}

/// The class count of a classifying head: the last dim of the eval program's logits.
fn classes_of(art: &crate::artifact::Artifact) -> Option<usize> {
    let task = art.manifest.task.as_ref()?;
    use bidora_compiler::heads::Task;
    if !matches!(task.task, Task::SeqCls | Task::TokenCls | Task::MultiLabel) {
        return None;
    }
    let eval = art.manifest.program(crate::artifact::ProgramKey::Eval)?;
    let logits = eval.outputs.iter().find(|o| o.name == task.logits)?;
    let last = logits.shape.as_ref()?.last()?.known()?;
    usize::try_from(last).ok()
}

/// Where a run's label names come from, for [`fit_head`]'s message.
enum LabelSource<'r> {
    /// `data.labels` in the config.
    Config,
    /// Collected from a file: every label occurrence with its line.
    File(&'r Path, Vec<(&'r str, usize)>),
}

/// Refuses a label set that does not fit the head: a configured list with empty or repeated
/// names, and any list whose length is not the head's class count (ids past the head would
/// add nothing to the loss, and a missing label would shift every id after it).
fn fit_head(names: &[String], source: LabelSource, spec: &ModelSpec) -> Result<(), DataError> {
    if matches!(source, LabelSource::Config) {
        if let Some(i) = names.iter().position(|n| n.trim().is_empty()) {
            return Err(DataError::Config(format!(
                "data.labels: name {} is empty; list the label names in id order",
                i + 1
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(DataError::Config(format!(
                "data.labels names '{}' twice; each label needs one id",
                crate::data::printable(d)
            )));
        }
    }
    let Some(classes) = spec.classes else {
        return Ok(());
    };
    if names.len() == classes {
        return Ok(());
    }
    match source {
        LabelSource::Config => Err(DataError::Config(format!(
            "data.labels names {} labels but the artifact's {} head has {classes} classes (the \
             last dim of eval.onnx's logits): list exactly {classes} names in id order, or \
             compile the model for {} classes",
            names.len(),
            spec.task,
            names.len()
        ))),
        LabelSource::File(file, seen) => {
            // Rarest first: a typo or a stray value is usually a label seen once.
            let mut census: Vec<(&str, usize, usize)> = vec![];
            for (label, line) in seen {
                match census.iter_mut().find(|c| c.0 == label) {
                    Some(c) => c.1 += 1,
                    None => census.push((label, 1, line)),
                }
            }
            census.sort_by_key(|c| (c.1, c.2));
            let shown: Vec<String> = census
                .iter()
                .take(12)
                .map(|(l, n, line)| {
                    format!(
                        "'{}' ({n} {}, first at line {line})",
                        crate::data::printable(l),
                        if *n == 1 { "time" } else { "times" }
                    )
                })
                .collect();
            Err(crate::data::file_error(
                file,
                format!(
                    "{} distinct labels but the artifact's {} head has {classes} classes: {}{}; \
                     fix the rows whose label does not belong, or set data.labels to the \
                     {classes} label names in id order",
                    census.len(),
                    spec.task,
                    shown.join(", "),
                    if census.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            ))
        }
    }
}

/// Refuses an empty label cell: it would become a class of its own (or, sorted first, shift
/// every other label's id).
fn no_empty_labels(recs: &Records) -> Result<(), DataError> {
    match recs.rows.iter().find(|r| r.label.trim().is_empty()) {
        Some(r) => Err(at(
            &recs.file,
            r.line,
            "the label is empty: every row needs a label",
        )),
        None => Ok(()),
    }
}

/// The encoded training file (before the train/validation split) and test file.
pub struct Loaded {
    pub data: EncodedSet,
    pub test: Option<EncodedSet>,
}

/// The heads each format feeds.
fn heads_of(format: &str) -> Result<&'static [&'static str], DataError> {
    Ok(match format {
        "glue-tsv" | "csv" | "jsonl" => &["seq-cls", "regression"],
        "peptides" => &["seq-cls"],
        "conll" => &["token-cls"],
        "reuters-sgml" => &["multi-label"],
        "e2e" => &["causal-lm"],
        other => {
            return Err(DataError::Config(format!(
                "format '{other}' is not one of glue-tsv, csv, jsonl, peptides, conll, reuters-sgml, e2e"
            )))
        }
    })
}

/// Reads and encodes the training and test files of `cfg` for `spec`'s model.
pub fn read(cfg: &DataConfig, base: &Path, spec: &ModelSpec) -> Result<Loaded, TrainError> {
    let heads = heads_of(&cfg.format)?;
    if !heads.contains(&spec.task.as_str()) {
        return Err(DataError::Config(format!(
            "format '{}' feeds the {} head, but the artifact's head is {}",
            cfg.format,
            heads.join(" or "),
            spec.task
        ))
        .into());
    }
    let enc = Encoder::from_spec(&cfg.tokenizer, base, cfg.max_len)?;
    let r = Reader {
        cfg,
        base,
        spec,
        enc: &enc,
    };
    Ok(match cfg.format.as_str() {
        "conll" => r.conll()?,
        "reuters-sgml" => r.reuters()?,
        "e2e" => r.e2e()?,
        _ => r.sentences()?,
    })
}

/// Builds the run's data: the training file split by `val_ratio` with `seed`, and the test
/// file. `base` resolves relative paths (the config file's folder); `model_inputs` are the
/// eval program's inputs; `task` the head's task. No vocabulary check: see [`load_for`].
pub fn load(
    cfg: &DataConfig,
    base: &Path,
    model_inputs: &[String],
    task: &str,
    val_ratio: f64,
    seed: u64,
) -> Result<RunData, TrainError> {
    let spec = ModelSpec {
        inputs: model_inputs.to_vec(),
        task: task.to_string(),
        vocab_size: None,
        classes: None,
    };
    load_for(cfg, base, &spec, val_ratio, seed)
}

/// [`load`] for a model described by `spec` (see [`ModelSpec::of`]). Data-to-text sets are
/// split by prompt, so no meaning representation is on both sides.
pub fn load_for(
    cfg: &DataConfig,
    base: &Path,
    spec: &ModelSpec,
    val_ratio: f64,
    seed: u64,
) -> Result<RunData, TrainError> {
    let Loaded { data, test } = read(cfg, base, spec)?;
    let (train_idx, val_idx) = match &data.references {
        Some(r) => {
            let (_, gv) = super::split(r.groups.len(), val_ratio, seed);
            let mut in_val = vec![false; r.groups.len()];
            for g in gv {
                in_val[g] = true;
            }
            let (mut t, mut v) = (vec![], vec![]);
            for (i, &g) in r.example_group.iter().enumerate() {
                if in_val[g] {
                    v.push(i)
                } else {
                    t.push(i)
                }
            }
            (t, v)
        }
        None => super::split(data.rows.len(), val_ratio, seed),
    };
    Ok(RunData {
        data: Box::new(data),
        train_idx,
        val_idx,
        test: test.map(|t| Box::new(t) as Box<dyn super::Examples>),
    })
}

/// A regression target: a finite number (NaN or infinity would poison every loss after it).
fn score(file: &Path, line: usize, raw: &str) -> Result<f32, DataError> {
    match raw.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(at(
            file,
            line,
            format!(
                "label '{}' is not a finite number (regression targets must be finite)",
                crate::data::printable(raw)
            ),
        )),
        Err(_) => Err(at(
            file,
            line,
            format!("label '{}' is not a number", crate::data::printable(raw)),
        )),
    }
}

struct Reader<'a> {
    cfg: &'a DataConfig,
    base: &'a Path,
    spec: &'a ModelSpec,
    enc: &'a Encoder,
}

impl Reader<'_> {
    fn set(&self, rows: Vec<Encoded>, labels: Vec<String>) -> EncodedSet {
        EncodedSet {
            rows,
            labels,
            pad: self.enc.pad(),
            token_types: self.spec.inputs.iter().any(|n| n == "token_type_ids"),
            multiple: self.cfg.pad_to_multiple_of,
            max_len: self.cfg.max_len,
            references: None,
            codec: None,
        }
    }

    fn test_path(&self) -> Option<std::path::PathBuf> {
        self.cfg.test.as_deref().map(|p| resolve(self.base, p))
    }

    fn vocab(&self, file: &Path, line: usize, ids: &[i64]) -> Result<(), DataError> {
        self.enc
            .check_vocab(ids, self.spec.vocab_size)
            .map_err(|m| at(file, line, m))
    }

    /// glue-tsv, csv, jsonl, peptides: one text (or pair) and one label per record.
    fn records(&self, path: &Path, limit: usize) -> Result<Records, DataError> {
        let c = self.cfg;
        let cols = glue::Columns {
            text_a: &c.text_a,
            text_b: c.text_b.as_deref(),
            label: &c.label,
        };
        match c.format.as_str() {
            "glue-tsv" => glue::read(path, c.header, &cols, limit),
            "csv" => csvjson::read_csv(path, c.header, &cols, limit),
            "jsonl" => csvjson::read_jsonl(path, &cols, limit),
            _ => Ok(peptides::read(path, &c.residue_sep, c.dedup, limit)?.records),
        }
    }

    fn encode_records(
        &self,
        recs: &Records,
        labels: Option<&[String]>,
    ) -> Result<Vec<Encoded>, DataError> {
        let f = &recs.file;
        recs.rows
            .iter()
            .map(|r| {
                let target = match labels {
                    Some(names) => Target::Class(class_id(f, r.line, &r.label, names)?),
                    None => Target::Score(score(f, r.line, &r.label)?),
                };
                let p = self
                    .enc
                    .encode(&r.text_a, r.text_b.as_deref())
                    .map_err(|e| at(f, r.line, format!("cannot tokenise: {e}")))?;
                self.vocab(f, r.line, &p.ids)?;
                Ok(Encoded {
                    line: r.line,
                    ids: p.ids,
                    types: p.types,
                    target,
                })
            })
            .collect()
    }

    fn sentences(&self) -> Result<Loaded, DataError> {
        let c = self.cfg;
        let train = self.records(&resolve(self.base, &c.train), c.limit)?;
        no_empty_labels(&train)?;
        let labels: Option<Vec<String>> = match (self.spec.task == "seq-cls", &c.labels) {
            (false, _) => None,
            (true, Some(names)) => {
                fit_head(names, LabelSource::Config, self.spec)?;
                Some(names.clone())
            }
            (true, None) if c.format == "peptides" => {
                // The files are binary by construction (the descriptor names two
                // classes); a slice of only positives must still mean class 1.
                let names = vec!["0".to_string(), "1".to_string()];
                fit_head(&names, LabelSource::Config, self.spec)?;
                Some(names)
            }
            (true, None) => {
                let names = label_set(train.rows.iter().map(|r| r.label.as_str()));
                let seen = train
                    .rows
                    .iter()
                    .map(|r| (r.label.as_str(), r.line))
                    .collect();
                fit_head(&names, LabelSource::File(&train.file, seen), self.spec)?;
                Some(names)
            }
        };
        let data = self.set(
            self.encode_records(&train, labels.as_deref())?,
            labels.clone().unwrap_or_default(),
        );
        let test = match self.test_path() {
            Some(p) => {
                let recs = self.records(&p, c.test_limit)?;
                no_empty_labels(&recs)?;
                Some(self.set(
                    self.encode_records(&recs, labels.as_deref())?,
                    labels.unwrap_or_default(),
                ))
            }
            None => None,
        };
        Ok(Loaded { data, test })
    }

    fn conll(&self) -> Result<Loaded, DataError> {
        let c = self.cfg;
        let scheme = conll::Scheme::parse(&c.tag_scheme)?;
        let train_path = resolve(self.base, &c.train);
        let train = conll::read(&train_path, scheme, c.limit)?;
        let labels = match &c.labels {
            Some(names) => {
                fit_head(names, LabelSource::Config, self.spec)?;
                names.clone()
            }
            None => {
                let names = label_set(train.iter().flat_map(|s| s.tags.iter().map(String::as_str)));
                let seen = train
                    .iter()
                    .flat_map(|s| {
                        s.tags
                            .iter()
                            .map(String::as_str)
                            .zip(s.lines.iter().copied())
                    })
                    .collect();
                fit_head(&names, LabelSource::File(&train_path, seen), self.spec)?;
                names
            }
        };
        let encode = |path: &Path, sents: &[conll::Sentence]| -> Result<Vec<Encoded>, DataError> {
            sents
                .iter()
                .map(|s| {
                    let line = s.lines.first().copied().unwrap_or(0);
                    let p = self
                        .enc
                        .encode_words(&s.words)
                        .map_err(|e| at(path, line, format!("cannot tokenise: {e}")))?;
                    self.vocab(path, line, &p.ids)?;
                    let y = conll::first_subword_labels(path, s, &p.words, &labels)?;
                    Ok(Encoded {
                        line,
                        ids: p.ids,
                        types: p.types,
                        target: Target::Tokens(y),
                    })
                })
                .collect()
        };
        let data = self.set(encode(&train_path, &train)?, labels.clone());
        let test = match self.test_path() {
            Some(p) => {
                let sents = conll::read(&p, scheme, c.test_limit)?;
                Some(self.set(encode(&p, &sents)?, labels.clone()))
            }
            None => None,
        };
        Ok(Loaded { data, test })
    }

    fn reuters(&self) -> Result<Loaded, DataError> {
        let c = self.cfg;
        let split = reuters::Split::parse(&c.split)?;
        let take = |docs: Vec<reuters::Doc>, part, limit: usize| -> Vec<reuters::Doc> {
            docs.into_iter()
                .filter(|d| d.part(split) == Some(part))
                .take(if limit == 0 { usize::MAX } else { limit })
                .collect()
        };
        let train_path = resolve(self.base, &c.train);
        let all = reuters::read(&train_path)?;
        let test_docs = match self.test_path() {
            Some(p) => reuters::read(&p)?,
            None => all.clone(),
        };
        let train = take(all, reuters::Part::Train, c.limit);
        if train.is_empty() {
            return Err(DataError::File {
                file: train_path,
                message: format!("no documents in the {} training part", c.split),
            });
        }
        let test = take(test_docs, reuters::Part::Test, c.test_limit);
        let labels = c.labels.clone().unwrap_or_else(|| {
            label_set(
                train
                    .iter()
                    .flat_map(|d| d.topics.iter().map(String::as_str)),
            )
        });
        if labels.is_empty() {
            return Err(DataError::Config(format!(
                "no topics in the {} training part to learn",
                c.split
            )));
        }
        let source = match c.labels {
            Some(_) => LabelSource::Config,
            None => LabelSource::File(
                &train_path,
                train
                    .iter()
                    .flat_map(|d| d.topics.iter().map(|t| (t.as_str(), d.line)))
                    .collect(),
            ),
        };
        fit_head(&labels, source, self.spec)?;
        let encode = |docs: &[reuters::Doc]| -> Result<Vec<Encoded>, DataError> {
            docs.iter()
                .map(|d| {
                    let p = self
                        .enc
                        .encode(&d.text(), None)
                        .map_err(|e| at(&d.file, d.line, format!("cannot tokenise: {e}")))?;
                    self.vocab(&d.file, d.line, &p.ids)?;
                    Ok(Encoded {
                        line: d.line,
                        ids: p.ids,
                        types: p.types,
                        target: Target::MultiHot(reuters::multi_hot(&d.topics, &labels)),
                    })
                })
                .collect()
        };
        let data = self.set(encode(&train)?, labels.clone());
        let test = (!test.is_empty())
            .then(|| encode(&test))
            .transpose()?
            .map(|rows| self.set(rows, labels.clone()));
        Ok(Loaded { data, test })
    }

    fn e2e(&self) -> Result<Loaded, DataError> {
        let c = self.cfg;
        let train_path = resolve(self.base, &c.train);
        let train = e2e::read(&train_path, c.limit)?;
        let test = self
            .test_path()
            .map(|p| e2e::read(&p, c.test_limit).map(|pairs| (p, pairs)))
            .transpose()?;
        let texts = train
            .iter()
            .chain(test.iter().flat_map(|(_, t)| t))
            .flat_map(|p| [p.mr.as_str(), p.reference.as_str()]);
        let codec = std::sync::Arc::new(TextCodec {
            decoder: self.enc.decoder(texts),
            eos: self.enc.eos()?,
            pad: self.enc.pad(),
        });
        let set = |path: &Path, pairs: &[e2e::Pair]| -> Result<EncodedSet, DataError> {
            let rows = pairs
                .iter()
                .map(|p| {
                    let e = e2e::encode(self.enc, path, p, &c.prompt_sep, c.max_len)?;
                    self.vocab(path, p.line, &e.ids)?;
                    Ok(e)
                })
                .collect::<Result<Vec<_>, DataError>>()?;
            let mut set = self.set(rows, vec![]);
            set.references = Some(e2e::references(pairs));
            set.codec = Some(codec.clone());
            Ok(set)
        };
        Ok(Loaded {
            data: set(&train_path, &train)?,
            test: test.map(|(p, pairs)| set(&p, &pairs)).transpose()?,
        })
    }
}
