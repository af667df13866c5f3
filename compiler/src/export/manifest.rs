//! An export reads the artifact's manifest through the compiler's own schema
//! ([`crate::artifact::schema`]), so the two cannot drift apart; this maps its errors to the
//! export's.

use std::path::{Path, PathBuf};

use super::{ExportError, Result};
use crate::artifact::{Manifest, ManifestFile};

/// Reads and checks `ARTIFACT/manifest.json`.
pub fn read(artifact: &Path) -> Result<ManifestFile> {
    Manifest::read(artifact).map_err(|e| ExportError::Manifest {
        path: e.path,
        msg: e.msg,
    })
}

/// The source model: `override_` when given, else the path recorded at compile time.
pub fn model_path(manifest: &Manifest, override_: Option<&Path>) -> Result<PathBuf> {
    manifest
        .model_path(override_)
        .ok_or_else(|| ExportError::NoModelPath {
            name: manifest.source_model.clone(),
        })
}
