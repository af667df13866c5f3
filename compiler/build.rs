//! Generates the prost types for `proto/onnx.proto` into `OUT_DIR/onnx.rs`.
//!
//! The schema is parsed by protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/onnx.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([PROTO], ["proto"])?;
    // Tensor payloads as `Bytes`: decoding from a shared buffer then slices instead of
    // copying, so a model's weights sit in memory once (see onnx_io::decode_model_shared).
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(descriptors)?;
    Ok(())
}
