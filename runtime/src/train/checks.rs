//! Refusals before a run starts: whether the configuration, the artifact, the data and the
//! number of ranks fit together, and whether a run folder may be started or resumed. Each
//! says what to change, so that nothing fails later in the middle of a run.

use std::path::Path;

use bidora_compiler::heads::Head;

use super::{checkpoint, eval, generation, Method, RunData, TrainConfig, TrainError};
use crate::artifact::{Artifact, ProgramKey};

/// A global batch must give every rank at least one row.
pub(super) fn ranks(cfg: &TrainConfig, size: usize) -> Result<(), TrainError> {
    if size > 1 && cfg.batch_size < size {
        return Err(TrainError::Config {
            origin: "batch_size".into(),
            message: format!(
                "{} is smaller than the {size} ranks: each rank needs at least one example \
                 of every global batch",
                cfg.batch_size
            ),
        });
    }
    Ok(())
}

/// The artifact's head, which only artifacts compiled with `--task` have, checked against the
/// configured metric.
pub(super) fn task<'a>(cfg: &TrainConfig, art: &'a Artifact) -> Result<&'a Head, TrainError> {
    let Some(task) = &art.manifest.task else {
        return Err(TrainError::Artifact(
            "it has no training programs: compile it with --task".into(),
        ));
    };
    eval::check_metric(task.task.name(), cfg.metric.as_deref())?;
    Ok(task)
}

/// The tensors each level trains (lower, upper), once the artifact is known to have the
/// method's programs and adapters.
pub(super) fn groups(
    cfg: &TrainConfig,
    art: &Artifact,
) -> Result<(Vec<String>, Vec<String>), TrainError> {
    let m = &art.manifest;
    let has = |k: ProgramKey| m.programs.contains_key(&k);
    match cfg.method {
        Method::Bidora => {
            let b = m.bilevel.as_ref().filter(|_| has(ProgramKey::Lower) && has(ProgramKey::Upper)).ok_or_else(|| {
                TrainError::Artifact(
                    "method = \"bidora\" needs lower.onnx and upper.onnx: compile a DoRA artifact with --task (without --no-bilevel)".into(),
                )
            })?;
            Ok((b.groups.lower.clone(), b.groups.upper.clone()))
        }
        Method::Dora | Method::Lora => {
            if !has(ProgramKey::TrainStep) {
                return Err(TrainError::Artifact("it has no train_step.onnx".into()));
            }
            let dora = m.adapters.iter().any(|a| a.magnitude.is_some());
            if (cfg.method == Method::Dora) != dora {
                return Err(TrainError::Artifact(format!(
                    "method = \"{:?}\" but the artifact's adapters are {:?}",
                    cfg.method, m.config.method
                )));
            }
            Ok((art.init.iter().map(|(n, _)| n.clone()).collect(), vec![]))
        }
    }
}

/// A metric scored on generated text needs generation to be possible.
pub(super) fn generation_metric(
    cfg: &TrainConfig,
    art: &Artifact,
    data: &RunData,
) -> Result<(), TrainError> {
    let Some(metric) = cfg
        .metric
        .as_deref()
        .filter(|m| generation::is_generation_metric(m))
    else {
        return Ok(());
    };
    let why = if cfg.generation.max_new_tokens == 0 {
        Some("generation.max_new_tokens is 0")
    } else if let Some(why) = generation::unavailable(&*data.data) {
        Some(why)
    } else if !art.manifest.programs.contains_key(&ProgramKey::Forward) {
        Some("the artifact has no forward.onnx")
    } else {
        None
    };
    match why {
        Some(why) => Err(TrainError::Config {
            origin: "metric".into(),
            message: format!("'{metric}' scores generated text, but {why}"),
        }),
        None => Ok(()),
    }
}

/// Every method trains on a non-empty split; BiDoRA's upper level also needs validation.
pub(super) fn splits(cfg: &TrainConfig, data: &RunData) -> Result<(), TrainError> {
    if data.train_idx.is_empty() {
        return Err(TrainError::Data("the training split is empty".into()));
    }
    if cfg.method == Method::Bidora && data.val_idx.is_empty() {
        return Err(TrainError::Data("the validation split is empty".into()));
    }
    Ok(())
}

/// A run folder is continued only on request and never overwritten: `existing` is its newest
/// checkpoint, `resume` whether continuing was asked for (on the writing rank).
pub(super) fn start_or_resume(
    run_dir: &Path,
    existing: Option<&Path>,
    resume: bool,
) -> Result<(), TrainError> {
    match (existing, resume) {
        (None, true) => Err(TrainError::Checkpoint {
            path: checkpoint::dir(run_dir),
            message: "--resume: no checkpoint to resume from".into(),
        }),
        (Some(_), false) => Err(TrainError::Checkpoint {
            path: run_dir.to_path_buf(),
            message: "holds a run already: pass --resume to continue it, or choose another folder"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// A run resumes only on as many ranks as it was trained on (the message says why).
pub(super) fn same_world_size(
    checkpoint: &Path,
    trained_on: usize,
    size: usize,
) -> Result<(), TrainError> {
    if trained_on == size {
        return Ok(());
    }
    Err(TrainError::Checkpoint {
        path: checkpoint.to_path_buf(),
        message: format!(
            "--resume: the run was trained on {trained_on} rank(s), and this job has {size}: \
             resume it with {} (`mpirun -np {trained_on}` …, or without mpirun for 1); each \
             rank's share of the batches, and so the rounding of every sum, depends on the \
             number of ranks",
            if trained_on == 1 {
                "one process".to_string()
            } else {
                format!("{trained_on} ranks")
            },
        ),
    })
}

/// The run folder's record of the artifact it trains (its identity), written at the first
/// start and checked by `--resume`.
pub const ARTIFACT_RECORD: &str = "artifact.json";

/// Refuses to resume a run with an artifact other than the one it started with: other
/// adapter settings, hypergradient mode, head or source weights would continue the run on
/// different programs from tensors that mean something else.
pub(super) fn same_artifact(record: &Path, art: &Artifact) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "warning: {} is missing (a run started by an older bidora), so the artifact is \
                 not checked to be the one the run started with",
                record.display()
            );
            return Ok(());
        }
        Err(e) => {
            return Err(TrainError::Checkpoint {
                path: record.to_path_buf(),
                message: e.to_string(),
            })
        }
    };
    let started: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: record.to_path_buf(),
            message: format!("not the artifact record bidora train writes: {e}"),
        })?;
    let diff = bidora_compiler::provenance::differences(&started, &art.identity);
    if diff.is_empty() {
        return Ok(());
    }
    Err(TrainError::Checkpoint {
        path: record.to_path_buf(),
        message: format!(
            "--resume: the run started with another artifact ({}; the run's vs {}): resume \
             it with the artifact it started with",
            diff.join(", "),
            art.dir.display()
        ),
    })
}
