//! Link arguments for the bare-metal guest binary: no C start files, no libc, static, our own
//! link script (load address 1 MiB, PVH note, bss layout).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = format!("{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=0x1000",
        "-Wl,-z,noexecstack",
        &format!("-Wl,-T,{script}"),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
