//! bidora's runtime: executes the compiler's artifact programs.
//!
//! Today it holds the tract execution path used by the tests and the CLI; the `Backend` trait
//! with the ONNX Runtime implementation and the trainer come with the runtime issue.

pub mod artifact;
pub mod backend;
pub mod optim;
pub mod tract_exec;
pub mod train;
