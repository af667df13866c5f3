//! bidora's runtime: executes the compiler's artifact programs.
//!
//! [`backend`] is the execution layer (the `Backend` / `Program` traits, tract and ONNX
//! Runtime); [`artifact`] reads artifact folders; [`data`] reads training data in its file
//! formats and encodes it; [`optim`] is AdamW; [`metrics`] scores predictions
//! (classification, NER, generation); [`generate`] decodes causal LMs (greedy, beam search).
//! [`analyze`] is the magnitude/direction analysis of trained adapters.
//! [`sweep`] runs LoRA vs DoRA vs BiDoRA over seeds and tabulates them.
//! [`tract_exec`] keeps the original tract-only names for existing callers.

pub mod allocator;
pub mod analyze;
pub mod artifact;
pub mod backend;
pub mod data;
pub mod distributed;
pub mod generate;
pub mod metrics;
pub mod optim;
pub mod sweep;
pub mod tract_exec;
pub mod train;
