//! The run's machine-readable log: one JSON object per line in `metrics.jsonl`.
//!
//! A resumed run truncates the file to the length recorded in its checkpoint, so the log
//! of a killed-and-resumed run equals the uninterrupted run's.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::TrainError;

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending after truncating it to `keep` bytes (0 for a new run).
    pub fn open(path: &Path, keep: u64) -> Result<MetricsLog, TrainError> {
        let err = |e: std::io::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        file.set_len(keep).map_err(err)?;
        let file = OpenOptions::new().append(true).open(path).map_err(err)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, v: serde_json::Value) -> Result<(), TrainError> {
        let mut line = v.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Checkpoint {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Bytes written so far (recorded in checkpoints).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
