//! The part of an artifact's `manifest.json` an export needs, read back with the compiler's
//! own record types so the two cannot drift apart.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ExportError, Result};
use crate::heads::Task;
use crate::rewrite::{AdapterConfig, AdapterRecord, Method};

#[derive(Debug, Deserialize)]
pub struct TaskInfo {
    pub task: Task,
}

#[derive(Debug, Deserialize)]
pub struct ExportManifest {
    pub format: String,
    pub format_version: u32,
    pub source_model: String,
    #[serde(default)]
    pub source_model_path: Option<String>,
    pub config: AdapterConfig,
    #[serde(default)]
    pub head_params: Vec<String>,
    #[serde(default)]
    pub task: Option<TaskInfo>,
    #[serde(default)]
    pub adapters: Vec<AdapterRecord>,
    /// The source model's weights when compiled (absent from older compilers' manifests).
    #[serde(default)]
    pub source_fingerprint: Option<crate::provenance::Fingerprint>,
    /// The manifest file, for messages.
    #[serde(skip)]
    pub path: PathBuf,
    /// The manifest as JSON, for [`crate::provenance::identity`].
    #[serde(skip)]
    pub json: serde_json::Value,
}

impl ExportManifest {
    /// Reads `ARTIFACT/manifest.json`.
    pub fn read(artifact: &Path) -> Result<ExportManifest> {
        let path = artifact.join(crate::artifact::MANIFEST);
        let err = |msg: String| ExportError::Manifest {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("cannot read the artifact's manifest: {e}")))?;
        let mut m: ExportManifest =
            serde_json::from_str(&text).map_err(|e| err(format!("not a bidora manifest: {e}")))?;
        if m.format != "bidora-artifact" || m.format_version != 1 {
            return Err(err(format!(
                "unsupported artifact format {} v{}",
                m.format, m.format_version
            )));
        }
        for a in &m.adapters {
            if (m.config.method == Method::Dora) != a.magnitude.is_some() {
                return Err(err(format!(
                    "adapter '{}' has {} magnitude but the method is {:?}",
                    a.module,
                    if a.magnitude.is_some() { "a" } else { "no" },
                    m.config.method
                )));
            }
            if a.block.is_some() != a.fused_weight.is_some() {
                return Err(err(format!(
                    "adapter '{}' adapts a block of a fused projection but does not name the \
                     fused weight (compiled by an older bidora-compile: compile it again)",
                    a.module
                )));
            }
        }
        m.path = path;
        m.json = serde_json::from_str(&text).unwrap_or_default();
        Ok(m)
    }

    /// The source model: `override_` when given, else the path recorded at compile time.
    pub fn model_path(&self, override_: Option<&Path>) -> Result<PathBuf> {
        match (override_, &self.source_model_path) {
            (Some(p), _) => Ok(p.to_path_buf()),
            (None, Some(p)) => Ok(PathBuf::from(p)),
            (None, None) => Err(ExportError::NoModelPath {
                name: self.source_model.clone(),
            }),
        }
    }

    /// Every trainable tensor of the artifact: adapters (A, B, m) then head parameters.
    pub fn trainable_names(&self) -> Vec<String> {
        let mut v = vec![];
        for a in &self.adapters {
            v.push(a.lora_a.clone());
            v.push(a.lora_b.clone());
            v.extend(a.magnitude.clone());
        }
        v.extend(self.head_params.iter().cloned());
        v
    }
}
