//! The training loop's one error type, and the conversions into it from the layers below.

use std::path::PathBuf;

use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    #[error("the artifact cannot run this configuration: {0}")]
    Artifact(String),
    #[error("{program}: {message}")]
    Run { program: String, message: String },
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Data(String),
    /// A program the configuration runs is not in the artifact folder, or was not loaded.
    #[error("{file} is missing from {}: {remedy}", dir.display())]
    MissingProgram {
        file: String,
        dir: PathBuf,
        remedy: String,
    },
    /// A collective failed, or the ranks disagree.
    #[error("distributed: {0}")]
    Distributed(String),
    /// Another process writes the run folder.
    #[error(transparent)]
    Locked(#[from] bidora_compiler::lock::LockError),
    #[error(
        "{what} became non-finite at {phase} step {step}; stopped. {}",
        match last_good {
            Some(p) => format!("The last good checkpoint is {}.", p.display()),
            None => "No checkpoint had been written yet.".to_string(),
        }
    )]
    NonFinite {
        what: String,
        phase: String,
        step: usize,
        last_good: Option<PathBuf>,
    },
}

impl From<DataError> for TrainError {
    fn from(e: DataError) -> Self {
        TrainError::Data(e.to_string())
    }
}
