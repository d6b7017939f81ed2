//! Compiles `proto/` with protox (pure Rust, no protoc) into prost + tonic code, and pbjson serde
//! impls (proto3 JSON) for flagd's protocols, whose Connect JSON codec uses them; Vexil's own
//! `vexil.v1` is transcoded from its descriptors at run time and needs none. `google.protobuf.Struct` is our
//! `JsonStruct` (the most specific extern path wins); other well-known types are pbjson-types'.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "flagd/evaluation/v1/evaluation.proto",
    "flagd/evaluation/v2/evaluation.proto",
    "flagd/sync/v1/sync.proto",
    "schema/v1/schema.proto",
    "vexil/v1/admin.proto",
    "vexil/v1/evaluation.proto",
    "vexil/v1/config.proto",
    "vexil/v1/tracking.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?;
    let fds = compiler.file_descriptor_set();
    let descriptor_path = out.join("descriptor.bin");
    // Encoded by protox, not from `fds`: prost-types' options have no room for extensions, and the
    // `google.api.http` annotations the JSON routes are built from are extensions.
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf.Struct", "crate::JsonStruct")
        .extern_path(".google.protobuf", "::pbjson_types")
        .file_descriptor_set_path(&descriptor_path)
        .codec_path("crate::codec::Codec")
        .skip_protoc_run()
        .compile_fds(fds.clone())?;

    // flagd's Connect JSON codec: every field emitted (zero values too), unknown fields ignored.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        .emit_fields()
        .ignore_unknown_fields()
        .extern_path(".google.protobuf.Struct", "crate::JsonStruct")
        .extern_path(".google.protobuf", "::pbjson_types")
        .build(&[".flagd", ".schema"])?;
    Ok(())
}
