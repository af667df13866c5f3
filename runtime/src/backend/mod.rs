//! Placeholder of the backend interface (the full version with ONNX Runtime lands from the
//! `ort` branch): a tract engine behind the `Backend` / `Program` traits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::tract_exec::HostTensor;
use crate::tract_exec::TractProgram;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Other(String),
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> String;
    fn load(&self, path: &Path) -> Result<Box<dyn Program>, BackendError>;
}

pub trait Program: Send {
    fn input_names(&self) -> &[String];
    fn output_names(&self) -> &[String];
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError>;
}

pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }
    fn description(&self) -> String {
        "tract (embedded, CPU)".into()
    }
    fn load(&self, path: &Path) -> Result<Box<dyn Program>, BackendError> {
        let m =
            bidora_compiler::load_model(path).map_err(|e| BackendError::Other(e.to_string()))?;
        let inits = &m.graph.initializers;
        Ok(Box::new(TractPlans {
            path: path.to_path_buf(),
            inputs: m
                .graph
                .inputs
                .iter()
                .filter(|i| !inits.contains_key(&i.name))
                .map(|i| i.name.clone())
                .collect(),
            outputs: m.graph.outputs.iter().map(|o| o.name.clone()).collect(),
            plans: HashMap::new(),
        }))
    }
}

struct TractPlans {
    path: PathBuf,
    inputs: Vec<String>,
    outputs: Vec<String>,
    plans: HashMap<Vec<Vec<usize>>, TractProgram>,
}

impl Program for TractPlans {
    fn input_names(&self) -> &[String] {
        &self.inputs
    }
    fn output_names(&self) -> &[String] {
        &self.outputs
    }
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError> {
        let key: Vec<Vec<usize>> = self
            .inputs
            .iter()
            .map(|n| {
                inputs
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, t)| match t {
                        HostTensor::F32(a) => a.shape().to_vec(),
                        HostTensor::F64(a) => a.shape().to_vec(),
                        HostTensor::I64(a) => a.shape().to_vec(),
                    })
                    .unwrap_or_default()
            })
            .collect();
        if !self.plans.contains_key(&key) {
            let p = TractProgram::load(&self.path, inputs)
                .map_err(|e| BackendError::Other(format!("{e:#}")))?;
            self.plans.insert(key.clone(), p);
        }
        self.plans[&key]
            .run(inputs)
            .map_err(|e| BackendError::Other(format!("{e:#}")))
    }
}
