//! Finding the ONNX Runtime shared library: nothing is linked at build time (`load-dynamic`),
//! so the library comes from the machine.
//!
//! Order: an explicit path (`--ort-lib`), then `ORT_DYLIB_PATH`, then the `capi/` folder of an
//! installed `onnxruntime` Python package (`onnxruntime-gpu` installs the same module name).
//! An explicit path or a set variable that does not lead to a file is an error naming it,
//! not a reason to look elsewhere: the user asked for that library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::BackendError;

/// Where the library was found, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    /// `--ort-lib`, `ORT_DYLIB_PATH` or `python package onnxruntime 1.32.0`.
    pub via: String,
}

/// The environment variable `ort` itself documents for the library path.
pub const ENV_VAR: &str = "ORT_DYLIB_PATH";

pub fn find_ort(explicit: Option<&Path>) -> Result<Located, BackendError> {
    if let Some(p) = explicit {
        return existing(p, "--ort-lib");
    }
    let mut tried = vec![];
    match std::env::var_os(ENV_VAR) {
        Some(v) if !v.is_empty() => return existing(Path::new(&v), ENV_VAR),
        _ => tried.push(format!("{ENV_VAR} is not set")),
    }
    match python_package() {
        Ok(found) => return Ok(found.clone()),
        Err(why) => tried.push(why.clone()),
    }
    Err(BackendError::OrtNotFound { tried })
}

fn existing(p: &Path, via: &str) -> Result<Located, BackendError> {
    if p.is_file() {
        // Absolute, because ort resolves a relative path against the executable's folder.
        let path = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Ok(Located {
            path,
            via: via.to_string(),
        })
    } else {
        Err(BackendError::OrtLoad {
            path: p.to_path_buf(),
            message: format!("no such file (given by {via})"),
        })
    }
}

/// The library inside the installed `onnxruntime` package, asked of `python3` once per process
/// (importing the package takes a good fraction of a second).
fn python_package() -> &'static Result<Located, String> {
    static FOUND: OnceLock<Result<Located, String>> = OnceLock::new();
    FOUND.get_or_init(|| {
        let script = "import os, onnxruntime as m; \
                      print(m.__version__); print(os.path.join(os.path.dirname(m.__file__), 'capi'))";
        let out = Command::new("python3")
            .args(["-c", script])
            .output()
            .map_err(|e| format!("python3 could not be run ({e})"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").trim();
            return Err(format!("python3 has no onnxruntime package ({last})"));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let (version, capi) = (lines.next().unwrap_or("?"), lines.next().unwrap_or(""));
        let lib = library_in(Path::new(capi)).ok_or_else(|| {
            format!("the onnxruntime {version} package has no ONNX Runtime library in {capi}")
        })?;
        Ok(Located {
            path: lib,
            via: format!("python package onnxruntime {version}"),
        })
    })
}

/// The main library in a wheel's `capi/` folder (not its `providers_*` plug-ins).
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().to_string());
            name.starts_with("libonnxruntime.so")
                || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib"))
                || name == "onnxruntime.dll"
        })
        .collect();
    // The versioned file is the real one; prefer it over a plain `libonnxruntime.so` link.
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_path_that_is_missing_is_named() {
        let e = find_ort(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/libonnxruntime.so") && msg.contains("--ort-lib"),
            "{msg}"
        );
    }

    #[test]
    fn the_versioned_library_is_preferred_and_plugins_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "libonnxruntime.so",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let lib = library_in(dir.path()).unwrap();
        assert_eq!(lib.file_name().unwrap(), "libonnxruntime.so.1.32.0");
        assert_eq!(library_in(&dir.path().join("missing")), None);
    }
}
