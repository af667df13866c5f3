//! The training configuration: a TOML file, overridden from the command line with
//! `--set section.key=value`, saved resolved into the run folder.
//!
//! Defaults follow the paper (appendix B) and the released code where the paper is silent
//! (docs/design.md, "Schedule and optimiser"): AdamW betas 0.9/0.98, eps 1e-6, linear warmup over 6% then linear decay,
//! an 8:2 train/validation split, one lower step per upper step.

use serde::{Deserialize, Serialize};

use super::TrainError;

/// What the loop trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Two levels: A, B (+ head) on the training split, magnitudes on the validation split
    /// through the hypergradient, then a retrain phase. Needs an artifact with lower/upper.
    Bidora,
    /// Single level: every trainable tensor (magnitudes included) on the training split.
    Dora,
    /// Single level on a LoRA artifact.
    Lora,
}

/// Where the retrain phase starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetrainFrom {
    /// A, B and the head re-initialised to the artifact's initial values (the paper).
    Init,
    /// A, B and the head as the search phase left them.
    Search,
}

/// One level's optimiser and schedule.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LevelConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Fraction of the level's steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
}

impl Default for LevelConfig {
    fn default() -> Self {
        LevelConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.0,
            warmup_ratio: 0.06,
        }
    }
}

impl LevelConfig {
    pub fn adamw(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// Where the examples come from and how they become token ids.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `glue-tsv`, `csv`, `jsonl`, `peptides`, `conll`, `reuters-sgml`, `e2e` (README.md,
    /// "Training data"; readers in `crate::data`).
    pub format: String,
    /// The training file (split 8:2 into train and validation). `reuters-sgml`: an `.sgm`
    /// file or a folder of them, whose `split` training part this is.
    pub train: String,
    /// An optional held-out file evaluated alongside (reported, never trained on).
    pub test: Option<String>,
    /// Columns (by name, or by 0-based index written as a number).
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: String,
    /// Label names in id order; by default the sorted set of the training file's labels.
    pub labels: Option<Vec<String>>,
    /// Whether the file starts with a header line (GLUE TSV: yes).
    pub header: bool,
    /// `tokenizer.json` to encode with; `hash` hashes whitespace words into the model's
    /// vocabulary (for models without a tokenizer, such as the random test fixtures).
    pub tokenizer: String,
    pub max_len: usize,
    /// Pad each batch's length up to a multiple of this (0: to its longest example). Every
    /// distinct shape costs tract a plan optimisation, so few lengths run faster there;
    /// `pad_to_multiple_of = max_len` gives one shape.
    pub pad_to_multiple_of: usize,
    /// Use only the first N examples of the training file (0: all).
    pub limit: usize,
    /// Use only the first N examples of the test file (0: all).
    pub test_limit: usize,
    /// `conll`: the tag scheme labels use: `iob2` (IOB1 files converted) or `iob1` (as read).
    pub tag_scheme: String,
    /// `reuters-sgml`: `modapte`, `modlewis` or `modhayes`.
    pub split: String,
    /// `peptides`: what goes between residues (`" "`: one word per residue).
    pub residue_sep: String,
    /// `peptides`: drop repeated (sequence, label) rows.
    pub dedup: bool,
    /// `e2e`: what goes between the meaning representation and the reference.
    pub prompt_sep: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            format: "glue-tsv".into(),
            train: String::new(),
            test: None,
            text_a: "sentence".into(),
            text_b: None,
            label: "label".into(),
            labels: None,
            header: true,
            tokenizer: "hash".into(),
            max_len: 128,
            pad_to_multiple_of: 32,
            limit: 0,
            test_limit: 0,
            tag_scheme: "iob2".into(),
            split: "modapte".into(),
            residue_sep: " ".into(),
            dedup: true,
            prompt_sep: " || ".into(),
        }
    }
}

/// Generating text at evaluation (causal-lm heads on data-to-text sets such as E2E): each
/// split's prompts are decoded and scored against their references with the E2E metrics
/// (BLEU, NIST, ROUGE-L, CIDEr; `crate::metrics::generation`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Tokens generated per prompt at most; 0 turns generation off.
    pub max_new_tokens: usize,
    /// 1: greedy decoding; more: beam search with this many beams. (The paper does not
    /// state its decoding; LoRA's released E2E script, which DoRA's follows, decodes with 10
    /// beams, length penalty 0.8 and no repeated 4-grams.)
    pub beam_width: usize,
    /// Exponent of beam search's length normalisation.
    pub length_penalty: f64,
    /// No n-gram of this length repeats within a sequence, prompt included (0: off).
    pub no_repeat_ngram: usize,
    /// Score only the first N prompts of a split (0: all).
    pub max_prompts: usize,
    /// Generate at every evaluation; otherwise only at the end of each phase (and always
    /// when `metric` is a generation metric, which selects the best checkpoint).
    pub every_eval: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            beam_width: 1,
            length_penalty: 1.0,
            no_repeat_ngram: 0,
            max_prompts: 0,
            every_eval: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub method: Method,
    pub seed: u64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Lower-level steps of the search phase (single-level methods: all their steps).
    pub steps: usize,
    /// Lower steps per upper step.
    pub unroll_steps: usize,
    /// Steps of the retrain phase on train ∪ validation with the magnitudes frozen
    /// (0 skips it). BiDoRA only.
    pub retrain_steps: usize,
    pub retrain_from: RetrainFrom,
    /// Share of the training file held out as the validation split.
    pub val_ratio: f64,
    /// Evaluate every N steps (and at the end of each phase); 0: only at the ends.
    pub eval_every: usize,
    /// Write a checkpoint every N steps (and at the end of each phase); 0: only at the ends.
    pub checkpoint_every: usize,
    /// Orthogonality regulariser weight γ (default: the manifest's, 1e-5).
    pub gamma: Option<f64>,
    /// Virtual-step size ξ (default: the lower learning rate; 0 is the first-order ablation).
    pub xi: Option<f64>,
    /// Finite-difference radius α_fd (default: the manifest's, 0.01).
    pub alpha_fd: Option<f64>,
    /// The evaluation metric that picks the best checkpoint (default: the task head's first,
    /// see `eval.rs`): the paper's GLUE choices are `mcc` for CoLA and `f1` for MRPC.
    pub metric: Option<String>,
    pub lower: LevelConfig,
    pub upper: LevelConfig,
    pub data: DataConfig,
    pub generation: GenerationConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Bidora,
            seed: 42,
            batch_size: 16,
            eval_batch_size: 32,
            steps: 1000,
            unroll_steps: 1,
            retrain_steps: 0,
            retrain_from: RetrainFrom::Init,
            val_ratio: 0.2,
            eval_every: 0,
            checkpoint_every: 0,
            gamma: None,
            xi: None,
            alpha_fd: None,
            metric: None,
            lower: LevelConfig::default(),
            upper: LevelConfig::default(),
            data: DataConfig::default(),
            generation: GenerationConfig::default(),
        }
    }
}

/// `--set` keys a resumed run may change: they decide when checkpoints are written, which
/// changes neither the tensors nor the metrics (a resumed run equals the uninterrupted one).
pub const RESUME_SETTABLE: &[&str] = &["checkpoint_every"];

/// The dotted keys whose values differ between two configs.
fn differing_keys(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let name = format!("{prefix}{k}");
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                differing_keys(x, y, &format!("{name}."), out)
            }
            (x, y) if x != y => out.push(name),
            _ => {}
        }
    }
}

impl TrainConfig {
    /// Reads `text` (TOML; empty for all defaults) and applies `overrides` (`a.b=value`, the
    /// value parsed as TOML, or taken as a string when it does not parse).
    pub fn parse(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<TrainConfig, TrainError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| TrainError::Config {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        for o in overrides {
            let (path, raw) = o.split_once('=').ok_or_else(|| TrainError::Config {
                origin: "--set".into(),
                message: format!("'{o}' is not key=value (example: --set lower.lr=5e-4)"),
            })?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let keys: Vec<&str> = path.trim().split('.').collect();
            let mut table = &mut value;
            for k in &keys[..keys.len() - 1] {
                table = table
                    .entry(k.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| TrainError::Config {
                        origin: "--set".into(),
                        message: format!("'{k}' in '{path}' is not a section"),
                    })?;
            }
            table.insert(keys[keys.len() - 1].to_string(), parsed);
        }
        let file_alone: Result<TrainConfig, _> = toml::from_str(text);
        if let Err(e) = &file_alone {
            return Err(TrainError::Config {
                origin: origin.to_string(),
                message: e.to_string(),
            });
        }
        // With the file fine alone, what fails now comes from an override.
        let blame = if overrides.is_empty() {
            origin
        } else {
            "--set"
        };
        let cfg: TrainConfig =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| TrainError::Config {
                    origin: blame.to_string(),
                    message: e.to_string(),
                })?;
        cfg.validate().map_err(|message| {
            let file_ok = file_alone
                .as_ref()
                .is_ok_and(|f| f.validate().as_ref() != Err(&message));
            TrainError::Config {
                origin: if file_ok { blame } else { origin }.to_string(),
                message,
            }
        })?;
        Ok(cfg)
    }

    /// The config of a resumed run: the one it started with (`saved`, the run folder's
    /// `config.toml`), with only [`RESUME_SETTABLE`] keys overridable, so the whole run keeps
    /// one config and its saved config tells the truth. Returns the config and the keys in
    /// which the config file given now (`given`) differs from the saved one, for a warning.
    pub fn for_resume(
        saved: &str,
        saved_origin: &str,
        given: &str,
        given_origin: &str,
        overrides: &[String],
    ) -> Result<(TrainConfig, Vec<String>), TrainError> {
        for o in overrides {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
            if !RESUME_SETTABLE.contains(&key) {
                return Err(TrainError::Config {
                    origin: "--set".into(),
                    message: format!(
                        "'{key}' cannot change on --resume: the run continues with the config it \
                         started with ({saved_origin}), so that every step of it ran under one \
                         config; only {} can change (it decides when checkpoints are written, \
                         not the results). To change '{key}', start a new run in another folder",
                        RESUME_SETTABLE.join(", ")
                    ),
                });
            }
        }
        let cfg = TrainConfig::parse(saved, saved_origin, overrides)?;
        let first = TrainConfig::parse(saved, saved_origin, &[])?;
        let now = TrainConfig::parse(given, given_origin, &[])?;
        let mut diff = vec![];
        differing_keys(
            &toml::Table::try_from(&first).expect("the config serialises"),
            &toml::Table::try_from(&now).expect("the config serialises"),
            "",
            &mut diff,
        );
        Ok((cfg, diff))
    }

    fn validate(&self) -> Result<(), String> {
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err("batch sizes must be at least 1".into());
        }
        if self.unroll_steps == 0 {
            return Err("unroll_steps must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.val_ratio) {
            return Err(format!("val_ratio {} is not in [0, 1)", self.val_ratio));
        }
        if self.method == Method::Bidora && self.val_ratio == 0.0 {
            return Err("BiDoRA needs a validation split: val_ratio > 0".into());
        }
        for (name, l) in [("lower", &self.lower), ("upper", &self.upper)] {
            if !(l.lr.is_finite() && l.lr >= 0.0) {
                return Err(format!(
                    "{name}.lr = {} is not allowed: a finite number >= 0",
                    l.lr
                ));
            }
            if !(0.0..=1.0).contains(&l.warmup_ratio) {
                return Err(format!(
                    "{name}.warmup_ratio = {} is not in [0, 1]",
                    l.warmup_ratio
                ));
            }
            // AdamW's moment decays: 1 or more never forgets (and divides by 1 - beta^t = 0).
            for (key, v) in [("beta1", l.beta1), ("beta2", l.beta2)] {
                if !(0.0..1.0).contains(&v) {
                    return Err(format!("{name}.{key} = {v} is not in [0, 1)"));
                }
            }
            if !(l.eps.is_finite() && l.eps > 0.0) {
                return Err(format!(
                    "{name}.eps = {} is not allowed: a finite number > 0",
                    l.eps
                ));
            }
            if !(l.weight_decay.is_finite() && l.weight_decay >= 0.0) {
                return Err(format!(
                    "{name}.weight_decay = {} is not allowed: a finite number >= 0",
                    l.weight_decay
                ));
            }
        }
        for (key, v, zero_ok) in [
            ("gamma", self.gamma, true),
            ("xi", self.xi, true),
            ("alpha_fd", self.alpha_fd, false),
        ] {
            if let Some(v) = v {
                let ok = v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0));
                if !ok {
                    return Err(format!(
                        "{key} = {v} is not allowed: a finite number {}",
                        if zero_ok { ">= 0" } else { "> 0" }
                    ));
                }
            }
        }
        if !self.generation.length_penalty.is_finite() {
            return Err(format!(
                "generation.length_penalty = {} is not a finite number",
                self.generation.length_penalty
            ));
        }
        if self.generation.beam_width == 0 {
            return Err("generation.beam_width must be at least 1".into());
        }
        if self.data.train.is_empty() {
            return Err("data.train (the training file) is not set".into());
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_with_types_and_unknown_keys_are_errors() {
        let c = TrainConfig::parse(
            "steps = 10\n[data]\ntrain = 'a.tsv'\n",
            "t.toml",
            &[
                "lower.lr=5e-4".into(),
                "method=dora".into(),
                "data.text_b=s2".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.steps, 10);
        assert_eq!(c.lower.lr, 5e-4);
        assert_eq!(c.method, Method::Dora);
        assert_eq!(c.data.text_b.as_deref(), Some("s2"));
        let e = TrainConfig::parse("stepz = 3\n[data]\ntrain='a'\n", "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml") && e.contains("stepz"), "{e}");
        let e = TrainConfig::parse("[data]\ntrain='a'\n", "t.toml", &["lower.lr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn the_saved_config_reads_back_identically() {
        let c = TrainConfig::parse("[data]\ntrain = 'x.tsv'\n", "t", &[]).unwrap();
        let again = TrainConfig::parse(&c.to_toml(), "saved", &[]).unwrap();
        assert_eq!(c.to_toml(), again.to_toml());
    }

    #[test]
    fn set_errors_are_blamed_on_set_and_file_errors_on_the_file() {
        let file = "[data]\ntrain = 'a'\n";
        let e = TrainConfig::parse(file, "t.toml", &["steps=abc".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--set:") && !e.contains("t.toml"), "{e}");
        let e = TrainConfig::parse(file, "t.toml", &["batch_size=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--set:") && e.contains("batch sizes"), "{e}");
        let e = TrainConfig::parse("steps = 'x'\n", "t.toml", &["seed=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:"), "{e}");
    }

    #[test]
    fn a_resume_keeps_the_saved_config_and_only_checkpoint_every_may_change() {
        let saved = TrainConfig::parse("steps = 10\n[data]\ntrain = 'a'\n", "s", &[])
            .unwrap()
            .to_toml();
        let given = "steps = 20\n[data]\ntrain = 'a'\n";
        let (cfg, changed) =
            TrainConfig::for_resume(&saved, "run/config.toml", given, "t.toml", &[]).unwrap();
        assert_eq!((cfg.steps, changed), (10, vec!["steps".to_string()]));
        let (cfg, _) = TrainConfig::for_resume(
            &saved,
            "run/config.toml",
            given,
            "t.toml",
            &["checkpoint_every=5".into()],
        )
        .unwrap();
        assert_eq!(cfg.checkpoint_every, 5);
        let e = TrainConfig::for_resume(&saved, "r", given, "t", &["lower.lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'lower.lr' cannot change on --resume"), "{e}");
    }

    #[test]
    fn numeric_settings_outside_their_range_are_refused_with_the_range() {
        let file = "[data]\ntrain = 'a'\n";
        for (set, range) in [
            ("lower.beta1=-3", "[0, 1)"),
            ("upper.beta2=2", "[0, 1)"),
            ("lower.beta2=1", "[0, 1)"),
            ("lower.weight_decay=-100", ">= 0"),
            ("lower.eps=0", "> 0"),
            ("gamma=-1", ">= 0"),
            ("xi=-0.5", ">= 0"),
            ("alpha_fd=0", "> 0"),
            ("gamma=nan", ">= 0"),
            ("lower.lr=inf", ">= 0"),
        ] {
            let e = TrainConfig::parse(file, "t.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            let key = set.split('=').next().unwrap();
            assert!(e.contains(key) && e.contains(range), "{set}: {e}");
        }
        TrainConfig::parse(file, "t.toml", &["gamma=0".into(), "xi=0".into()]).unwrap();
    }
}
