//! Running one ONNX program with tract, the embedded CPU backend.
//!
//! Input facts are pinned to the concrete shapes of the first call, so tract can fully type
//! and optimise the graph (it cannot always type exported graphs with several symbolic dims).

use std::path::Path;

use tract_onnx::prelude::*;

/// A named host tensor passed to or returned from a program.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(ndarray::ArrayD<f32>),
    F64(ndarray::ArrayD<f64>),
    I64(ndarray::ArrayD<i64>),
}

impl HostTensor {
    fn to_tract(&self) -> TractResult<Tensor> {
        Ok(match self {
            HostTensor::F32(a) => a.clone().into_tensor(),
            HostTensor::F64(a) => a.clone().into_tensor(),
            HostTensor::I64(a) => a.clone().into_tensor(),
        })
    }

    fn fact(&self) -> InferenceFact {
        let (dt, shape) = match self {
            HostTensor::F32(a) => (f32::datum_type(), a.shape().to_vec()),
            HostTensor::F64(a) => (f64::datum_type(), a.shape().to_vec()),
            HostTensor::I64(a) => (i64::datum_type(), a.shape().to_vec()),
        };
        InferenceFact::dt_shape(dt, shape)
    }

    pub fn as_f32(&self) -> Option<&ndarray::ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Some(a),
            _ => None,
        }
    }
}

/// A program compiled by tract for fixed input shapes.
pub struct TractProgram {
    plan: Arc<TypedRunnableModel>,
    input_names: Vec<String>,
    output_names: Vec<String>,
}

impl TractProgram {
    /// Loads `path` and optimises it for the shapes and types of `example` inputs, given by
    /// name; every graph input must be named.
    pub fn load(path: &Path, example: &[(String, HostTensor)]) -> anyhow::Result<TractProgram> {
        // Read through the compiler's importer (path-safe external data, clear errors) and
        // legalise for tract's known gaps before handing tract the bytes.
        let ir = bidora_compiler::load_model(path)?;
        let ir = bidora_compiler::legalize::for_tract(&ir);
        let bytes = bidora_compiler::onnx_io::encode_model(
            &bidora_compiler::ir::convert::model_to_proto(&ir),
        );
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow::anyhow!("tract cannot read {}: {e:?}", path.display()))?;
        let input_names: Vec<String> = model
            .input_outlets()?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        for (i, name) in input_names.iter().enumerate() {
            let (_, t) = example.iter().find(|(n, _)| n == name).ok_or_else(|| {
                anyhow::anyhow!("no value given for input '{name}' of {}", path.display())
            })?;
            model.set_input_fact(i, t.fact())?;
        }
        // Exporters annotate intermediate values with symbolic shapes (`value_info`); with the
        // inputs pinned to concrete shapes those symbols no longer unify, so let tract infer
        // every non-input fact itself.
        let inputs: Vec<OutletId> = model.input_outlets()?.to_vec();
        for node in 0..model.nodes().len() {
            for slot in 0..model.node(node).outputs.len() {
                let outlet = OutletId::new(node, slot);
                if !inputs.contains(&outlet) {
                    model.set_outlet_fact(outlet, InferenceFact::default())?;
                }
            }
        }
        let output_names: Vec<String> = model
            .output_outlets()?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let plan = model
            .into_optimized()
            .map_err(|e| anyhow::anyhow!("tract cannot optimise {}: {e:?}", path.display()))?
            .into_runnable()?;
        Ok(TractProgram {
            plan,
            input_names,
            output_names,
        })
    }

    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// Runs with inputs given by name; returns outputs in graph order.
    pub fn run(&self, inputs: &[(String, HostTensor)]) -> anyhow::Result<Vec<HostTensor>> {
        let mut values = TVec::new();
        for name in &self.input_names {
            let (_, t) = inputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| anyhow::anyhow!("no value given for input '{name}'"))?;
            values.push(t.to_tract()?.into_tvalue());
        }
        let outs = self
            .plan
            .run(values)
            .map_err(|e| anyhow::anyhow!("tract run failed: {e:?}"))?;
        outs.into_iter()
            .map(|t| {
                let t = t.into_tensor();
                Ok(match t.datum_type() {
                    DatumType::F32 => HostTensor::F32(t.into_plain_array::<f32>()?),
                    DatumType::F64 => HostTensor::F64(t.into_plain_array::<f64>()?),
                    DatumType::I64 => HostTensor::I64(t.into_plain_array::<i64>()?),
                    other => anyhow::bail!("unsupported output type {other:?}"),
                })
            })
            .collect()
    }
}

/// Loads and runs a program once.
pub fn run_once(path: &Path, inputs: &[(String, HostTensor)]) -> anyhow::Result<Vec<HostTensor>> {
    TractProgram::load(path, inputs)?.run(inputs)
}
