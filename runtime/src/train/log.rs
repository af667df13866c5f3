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
    /// None: a rank other than 0 of a data-parallel run, which writes nothing.
    file: Option<File>,
}

impl MetricsLog {
    /// Opens `path` for appending after truncating it to `keep` bytes (0 for a new run).
    /// A file shorter than `keep`, or whose first `keep` bytes do not end a line, is not the
    /// log the checkpoint was written with: refused rather than padded or cut mid-line.
    pub fn open(path: &Path, keep: u64) -> Result<MetricsLog, TrainError> {
        let err = |e: std::io::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len < keep {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "is {len} bytes, but the checkpoint was written when it was {keep}: the log \
                     was cut or replaced since"
                ),
            });
        }
        if keep > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            file.seek(SeekFrom::Start(keep - 1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(err)?;
            if last[0] != b'\n' {
                return Err(TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!(
                        "byte {keep}, where the checkpoint says the log ended, is not the end of \
                         a line: the log was changed since"
                    ),
                });
            }
        }
        file.set_len(keep).map_err(err)?;
        let file = OpenOptions::new().append(true).open(path).map_err(err)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// A log that writes nothing, for the ranks that do not write the run folder.
    pub fn discard(path: &Path) -> MetricsLog {
        MetricsLog {
            path: path.to_path_buf(),
            file: None,
        }
    }

    pub fn write(&mut self, v: serde_json::Value) -> Result<(), TrainError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut line = v.to_string();
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
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
        self.file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
