//! Compiles `proto/allot/v1/*.proto` into the `allot::pb` module and writes the
//! encoded descriptor set that the coordinator serves through reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/allot/v1/common.proto",
        "proto/allot/v1/admin.proto",
        "proto/allot/v1/session.proto",
        "proto/allot/v1/placement.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("allot_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
