//! The tract execution path under its original name: [`TractProgram::load`] optimises for the
//! example's shapes, [`TractProgram::run`] runs by input name. The code lives in
//! [`crate::backend::tract`]; new code should go through [`crate::backend::Backend`].

use std::path::Path;

pub use crate::backend::tract::TractProgram;
pub use crate::backend::HostTensor;

/// Loads and runs a program once.
pub fn run_once(
    path: &Path,
    inputs: &[(String, HostTensor)],
) -> Result<Vec<HostTensor>, crate::backend::BackendError> {
    TractProgram::load(path, inputs)?.run(inputs)
}
