//! One writer per folder: an advisory lock (`flock` on Unix, `LockFileEx` on Windows, through
//! `fs4`) held for as long as a process writes a run folder or an artifact folder. A second
//! writer gets [`LockError::Held`] naming the holder's pid instead of interleaving its files
//! with the first one's.
//!
//! The lock file holds the holder's pid and what it is doing, and is removed when the lock is
//! released. Removing it races with a process that opened it just before: that process would
//! lock a file no longer in the folder while a third creates a new one. So an acquired lock
//! is only kept when the path still names the file that was locked; otherwise it is retried.
//! The lock is released by the kernel when the holder dies, so a killed run never leaves its
//! folder locked (only, at worst, a stale lock file that the next writer takes over).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fs4::FileExt;

/// The lock file inside a run folder.
pub const RUN_LOCK: &str = ".bidora.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the folder.
    #[error(
        "{} is in use by another bidora process ({holder}); wait for it to finish, or write to another folder",
        folder.display()
    )]
    Held { folder: PathBuf, holder: String },
    /// The lock file cannot be created or locked.
    #[error("cannot lock {} (lock file {}): {error}", folder.display(), path.display())]
    Io {
        folder: PathBuf,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A held lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct FolderLock {
    path: PathBuf,
    file: File,
}

impl FolderLock {
    /// Locks the run folder `dir` (which must exist) for `what` (e.g. "bidora train").
    pub fn run_folder(dir: &Path, what: &str) -> Result<FolderLock, LockError> {
        FolderLock::acquire(&dir.join(RUN_LOCK), dir, what)
    }

    /// Locks the output folder `dir`, which is replaced by rename and so cannot hold its own
    /// lock: the lock file is its hidden sibling `.NAME.bidora-lock`.
    pub fn output_folder(dir: &Path, what: &str) -> Result<FolderLock, LockError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        FolderLock::acquire(&parent.join(format!(".{name}.bidora-lock")), dir, what)
    }

    /// Takes the lock at `path` for `folder`, without waiting.
    pub fn acquire(path: &Path, folder: &Path, what: &str) -> Result<FolderLock, LockError> {
        let io = |error: std::io::Error| LockError::Io {
            folder: folder.to_path_buf(),
            path: path.to_path_buf(),
            error,
        };
        // A few rounds cover a holder removing the file between our open and our lock.
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io)?;
            match FileExt::try_lock(&file) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let holder = match text.trim() {
                        "" => "pid unknown: it is starting or stopping".to_string(),
                        t => crate::printable(t).into_owned(),
                    };
                    return Err(LockError::Held {
                        folder: folder.to_path_buf(),
                        holder,
                    });
                }
                Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
            }
            if !same_file(&file, path) {
                continue;
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            write!(file, "pid {} ({what})", std::process::id()).map_err(io)?;
            file.flush().map_err(io)?;
            return Ok(FolderLock {
                path: path.to_path_buf(),
                file,
            });
        }
        Err(io(std::io::Error::other(
            "the lock file kept being replaced while locking it",
        )))
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Removed while still locked (see the module doc); the lock goes with the handle.
        let _ = std::fs::remove_file(&self.path);
        let _ = FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_folder_names_the_holder_and_the_first_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::run_folder(dir.path(), "bidora train").unwrap();
        let e = FolderLock::run_folder(dir.path(), "bidora train").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {} (bidora train)", std::process::id()))
                && msg.contains("in use"),
            "{msg}"
        );
        drop(first);
        assert!(!dir.path().join(RUN_LOCK).exists());
        let again = FolderLock::run_folder(dir.path(), "bidora train").unwrap();
        drop(again);
        // A stale lock file (its holder killed) is taken over.
        std::fs::write(dir.path().join(RUN_LOCK), "pid 999999 (bidora train)").unwrap();
        FolderLock::run_folder(dir.path(), "bidora train").unwrap();
    }

    #[test]
    fn output_folders_lock_a_sibling_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("art");
        let held = FolderLock::output_folder(&out, "bidora-compile").unwrap();
        assert!(dir.path().join(".art.bidora-lock").exists());
        assert!(FolderLock::output_folder(&out, "bidora-compile").is_err());
        // Another folder beside it is free.
        FolderLock::output_folder(&dir.path().join("art2"), "bidora-compile").unwrap();
        drop(held);
        assert!(!dir.path().join(".art.bidora-lock").exists());
    }
}
