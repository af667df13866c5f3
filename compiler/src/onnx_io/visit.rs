use super::*;

// ---------------------------------------------------------------------------------------------
// Visiting every tensor of a model.
//
// The patterns below list every field on purpose (no `..`): when the schema gains a field,
// this stops compiling, and whoever updates it decides whether the field can hold tensors.

/// Calls `f` on every `TensorProto` of the model. `f` also gets a lazily built description
/// of where the tensor sits, for messages about unnamed tensors.
macro_rules! tensor_visitor {
    ($model:ident, $graph:ident, $function:ident, $node:ident, $attribute:ident, $sparse:ident;
     $($mutability:tt)?) => {
        pub(super) fn $model(
            m: &$($mutability)? ModelProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let ModelProto {
                ir_version: _,
                opset_import: _,
                producer_name: _,
                producer_version: _,
                domain: _,
                model_version: _,
                doc_string: _,
                graph,
                metadata_props: _,
                training_info,
                functions,
                configuration: _,
            } = m;
            if let Some(g) = graph {
                $graph(g, f)?;
            }
            for info in training_info {
                let TrainingInfoProto {
                    initialization,
                    algorithm,
                    initialization_binding: _,
                    update_binding: _,
                } = info;
                if let Some(g) = initialization {
                    $graph(g, f)?;
                }
                if let Some(g) = algorithm {
                    $graph(g, f)?;
                }
            }
            for function in functions {
                $function(function, f)?;
            }
            Ok(())
        }

        fn $graph(
            g: &$($mutability)? GraphProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let GraphProto {
                node,
                name,
                initializer,
                sparse_initializer,
                doc_string: _,
                input: _,
                output: _,
                value_info: _,
                quantization_annotation: _,
                metadata_props: _,
            } = g;
            let graph_name: &str = name.as_deref().unwrap_or_default();
            for t in initializer {
                f(t, &|| format!("initializer of graph '{graph_name}'"))?;
            }
            for s in sparse_initializer {
                $sparse(s, &|| format!("sparse initializer of graph '{graph_name}'"), f)?;
            }
            for n in node {
                $node(n, "", f)?;
            }
            Ok(())
        }

        fn $function(
            func: &$($mutability)? FunctionProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let FunctionProto {
                name,
                input: _,
                output: _,
                attribute: _,
                attribute_proto,
                node,
                doc_string: _,
                opset_import: _,
                domain: _,
                overload: _,
                value_info: _,
                metadata_props: _,
            } = func;
            let owner = format!("function '{}'", name.as_deref().unwrap_or_default());
            let suffix = format!(" of {owner}");
            for a in attribute_proto {
                $attribute(a, &owner, f)?;
            }
            for n in node {
                $node(n, &suffix, f)?;
            }
            Ok(())
        }

        fn $node(
            n: &$($mutability)? NodeProto,
            suffix: &str,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let NodeProto {
                input: _,
                output: _,
                name,
                op_type,
                domain: _,
                overload: _,
                attribute,
                doc_string: _,
                metadata_props: _,
                device_configurations: _,
            } = n;
            if attribute.is_empty() {
                return Ok(());
            }
            let owner = match name.as_deref() {
                Some(name) if !name.is_empty() => format!("node '{name}'{suffix}"),
                _ => format!(
                    "unnamed '{}' node{suffix}",
                    op_type.as_deref().unwrap_or_default()
                ),
            };
            for a in attribute {
                $attribute(a, &owner, f)?;
            }
            Ok(())
        }

        fn $attribute(
            a: &$($mutability)? AttributeProto,
            owner: &str,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let AttributeProto {
                name,
                ref_attr_name: _,
                doc_string: _,
                r#type: _,
                f: _,
                i: _,
                s: _,
                t,
                g,
                sparse_tensor,
                tp: _,
                floats: _,
                ints: _,
                strings: _,
                tensors,
                graphs,
                sparse_tensors,
                type_protos: _,
            } = a;
            let attr_name: &str = name.as_deref().unwrap_or_default();
            let site = || format!("attribute '{attr_name}' of {owner}");
            if let Some(t) = t {
                f(t, &site)?;
            }
            for t in tensors {
                f(t, &site)?;
            }
            if let Some(s) = sparse_tensor {
                $sparse(s, &site, f)?;
            }
            for s in sparse_tensors {
                $sparse(s, &site, f)?;
            }
            if let Some(g) = g {
                $graph(g, f)?;
            }
            for g in graphs {
                $graph(g, f)?;
            }
            Ok(())
        }

        fn $sparse(
            s: &$($mutability)? SparseTensorProto,
            site: &dyn Fn() -> String,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let SparseTensorProto {
                values,
                indices,
                dims: _,
            } = s;
            let values_name = values
                .as_ref()
                .and_then(|v| v.name.clone())
                .unwrap_or_default();
            if let Some(v) = values {
                f(v, &|| format!("values of a sparse tensor, {}", site()))?;
            }
            if let Some(i) = indices {
                f(i, &|| {
                    format!("indices of sparse tensor '{values_name}', {}", site())
                })?;
            }
            Ok(())
        }
    };
}

tensor_visitor!(visit_model, visit_graph, visit_function, visit_node, visit_attribute,
    visit_sparse;);
tensor_visitor!(visit_model_mut, visit_graph_mut, visit_function_mut, visit_node_mut,
    visit_attribute_mut, visit_sparse_mut; mut);

// ---------------------------------------------------------------------------------------------
// Copying a model while replacing its tensors (used to write external data without cloning
// the payloads that move out of the model file).

pub(super) type TensorMap<'a> =
    dyn FnMut(&TensorProto, &dyn Fn() -> String) -> Result<TensorProto> + 'a;

pub(super) fn map_model(m: &ModelProto, f: &mut TensorMap) -> Result<ModelProto> {
    let ModelProto {
        ir_version,
        opset_import,
        producer_name,
        producer_version,
        domain,
        model_version,
        doc_string,
        graph,
        metadata_props,
        training_info,
        functions,
        configuration,
    } = m;
    Ok(ModelProto {
        ir_version: *ir_version,
        opset_import: opset_import.clone(),
        producer_name: producer_name.clone(),
        producer_version: producer_version.clone(),
        domain: domain.clone(),
        model_version: *model_version,
        doc_string: doc_string.clone(),
        graph: graph.as_ref().map(|g| map_graph(g, f)).transpose()?,
        metadata_props: metadata_props.clone(),
        training_info: training_info
            .iter()
            .map(|info| {
                let TrainingInfoProto {
                    initialization,
                    algorithm,
                    initialization_binding,
                    update_binding,
                } = info;
                Ok(TrainingInfoProto {
                    initialization: initialization
                        .as_ref()
                        .map(|g| map_graph(g, f))
                        .transpose()?,
                    algorithm: algorithm.as_ref().map(|g| map_graph(g, f)).transpose()?,
                    initialization_binding: initialization_binding.clone(),
                    update_binding: update_binding.clone(),
                })
            })
            .collect::<Result<_>>()?,
        functions: functions
            .iter()
            .map(|func| map_function(func, f))
            .collect::<Result<_>>()?,
        configuration: configuration.clone(),
    })
}

pub(super) fn map_graph(g: &GraphProto, f: &mut TensorMap) -> Result<GraphProto> {
    let GraphProto {
        node,
        name,
        initializer,
        sparse_initializer,
        doc_string,
        input,
        output,
        value_info,
        quantization_annotation,
        metadata_props,
    } = g;
    let graph_name: &str = name.as_deref().unwrap_or_default();
    Ok(GraphProto {
        node: node
            .iter()
            .map(|n| map_node(n, "", f))
            .collect::<Result<_>>()?,
        name: name.clone(),
        initializer: initializer
            .iter()
            .map(|t| f(t, &|| format!("initializer of graph '{graph_name}'")))
            .collect::<Result<_>>()?,
        sparse_initializer: sparse_initializer
            .iter()
            .map(|s| {
                map_sparse(
                    s,
                    &|| format!("sparse initializer of graph '{graph_name}'"),
                    f,
                )
            })
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        input: input.clone(),
        output: output.clone(),
        value_info: value_info.clone(),
        quantization_annotation: quantization_annotation.clone(),
        metadata_props: metadata_props.clone(),
    })
}

pub(super) fn map_function(func: &FunctionProto, f: &mut TensorMap) -> Result<FunctionProto> {
    let FunctionProto {
        name,
        input,
        output,
        attribute,
        attribute_proto,
        node,
        doc_string,
        opset_import,
        domain,
        overload,
        value_info,
        metadata_props,
    } = func;
    let owner = format!("function '{}'", name.as_deref().unwrap_or_default());
    let suffix = format!(" of {owner}");
    Ok(FunctionProto {
        name: name.clone(),
        input: input.clone(),
        output: output.clone(),
        attribute: attribute.clone(),
        attribute_proto: attribute_proto
            .iter()
            .map(|a| map_attribute(a, &owner, f))
            .collect::<Result<_>>()?,
        node: node
            .iter()
            .map(|n| map_node(n, &suffix, f))
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        opset_import: opset_import.clone(),
        domain: domain.clone(),
        overload: overload.clone(),
        value_info: value_info.clone(),
        metadata_props: metadata_props.clone(),
    })
}

pub(super) fn map_node(n: &NodeProto, suffix: &str, f: &mut TensorMap) -> Result<NodeProto> {
    let NodeProto {
        input,
        output,
        name,
        op_type,
        domain,
        overload,
        attribute,
        doc_string,
        metadata_props,
        device_configurations,
    } = n;
    let owner = match name.as_deref() {
        Some(name) if !name.is_empty() => format!("node '{name}'{suffix}"),
        _ => format!(
            "unnamed '{}' node{suffix}",
            op_type.as_deref().unwrap_or_default()
        ),
    };
    Ok(NodeProto {
        input: input.clone(),
        output: output.clone(),
        name: name.clone(),
        op_type: op_type.clone(),
        domain: domain.clone(),
        overload: overload.clone(),
        attribute: attribute
            .iter()
            .map(|a| map_attribute(a, &owner, f))
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        metadata_props: metadata_props.clone(),
        device_configurations: device_configurations.clone(),
    })
}

pub(super) fn map_attribute(
    a: &AttributeProto,
    owner: &str,
    f: &mut TensorMap,
) -> Result<AttributeProto> {
    let AttributeProto {
        name,
        ref_attr_name,
        doc_string,
        r#type,
        f: float,
        i,
        s,
        t,
        g,
        sparse_tensor,
        tp,
        floats,
        ints,
        strings,
        tensors,
        graphs,
        sparse_tensors,
        type_protos,
    } = a;
    let attr_name: &str = name.as_deref().unwrap_or_default();
    let site = || format!("attribute '{attr_name}' of {owner}");
    Ok(AttributeProto {
        name: name.clone(),
        ref_attr_name: ref_attr_name.clone(),
        doc_string: doc_string.clone(),
        r#type: *r#type,
        f: *float,
        i: *i,
        s: s.clone(),
        t: t.as_ref().map(|t| f(t, &site)).transpose()?,
        g: g.as_ref().map(|g| map_graph(g, f)).transpose()?,
        sparse_tensor: sparse_tensor
            .as_ref()
            .map(|s| map_sparse(s, &site, f))
            .transpose()?,
        tp: tp.clone(),
        floats: floats.clone(),
        ints: ints.clone(),
        strings: strings.clone(),
        tensors: tensors.iter().map(|t| f(t, &site)).collect::<Result<_>>()?,
        graphs: graphs
            .iter()
            .map(|g| map_graph(g, f))
            .collect::<Result<_>>()?,
        sparse_tensors: sparse_tensors
            .iter()
            .map(|s| map_sparse(s, &site, f))
            .collect::<Result<_>>()?,
        type_protos: type_protos.clone(),
    })
}

pub(super) fn map_sparse(
    s: &SparseTensorProto,
    site: &dyn Fn() -> String,
    f: &mut TensorMap,
) -> Result<SparseTensorProto> {
    let SparseTensorProto {
        values,
        indices,
        dims,
    } = s;
    let values_name = values
        .as_ref()
        .and_then(|v| v.name.as_deref())
        .unwrap_or_default();
    Ok(SparseTensorProto {
        values: values
            .as_ref()
            .map(|v| f(v, &|| format!("values of a sparse tensor, {}", site())))
            .transpose()?,
        indices: indices
            .as_ref()
            .map(|i| {
                f(i, &|| {
                    format!("indices of sparse tensor '{values_name}', {}", site())
                })
            })
            .transpose()?,
        dims: dims.clone(),
    })
}
