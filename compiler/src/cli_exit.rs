//! How the command-line tools (`bidora-compile`, `bidora`) end: an error is printed once with
//! its causes; a closed standard output (`bidora-compile m.onnx --dump | head`) is not one.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe returns `BrokenPipe` instead of ending
//! the process the way C tools end; `println!` turns that into a panic (exit 101 and a
//! backtrace). The tools therefore write through `writeln!(out, ..)?` and land here, where a
//! broken pipe ends the run quietly with success: the reader asked for no more output, as
//! with `head`, and nothing was left half-done that it did not ask for.

use std::process::ExitCode;

/// Whether `e` (or any error it wraps) is a write to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The process's exit code for a tool's result, printing the error (each cause once, control
/// characters escaped) to standard error.
pub fn exit_code(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                crate::printable_lines(&crate::error_chain(
                    e.chain().map(|c| c as &dyn std::error::Error)
                ))
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_is_found_behind_context() {
        let io = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e = anyhow::Error::from(io).context("writing the dump");
        assert!(is_broken_pipe(&e));
        let other = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(!is_broken_pipe(&other));
        assert!(!is_broken_pipe(&anyhow::anyhow!("no output folder")));
    }
}
