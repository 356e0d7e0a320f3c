//! Links `iotd` with packed relative relocations (DT_RELR) on GNU/Linux: a position-independent
//! executable carries one 24-byte relocation per pointer in its read-only data (vtables, string
//! tables), which RELR packs into a bitmap. For iotd that is about 320 KB of its stripped size,
//! on a gateway where flash is scarce (the budget is 5 MB). It needs binutils 2.38 or newer to
//! link and glibc 2.36 or newer to run (Debian 12; Yocto scarthgap has 2.39); an older glibc
//! refuses to start the binary with a clear "GLIBC_ABI_DT_RELR not found", never a crash.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=iotd=-Wl,-z,pack-relative-relocs");
    }
}
