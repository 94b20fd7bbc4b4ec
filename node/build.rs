//! Link flags of the device build (`--profile device`): on linux-gnu targets the
//! `shoal` binary is linked with packed relative relocations (DT_RELR, `-z
//! pack-relative-relocs`): the same position-independent executable, about 300 KB
//! smaller (its `.rela.dyn` of 24 bytes per pointer becomes a bitmap). It needs GNU
//! ld >= 2.38 (or lld) to link and glibc >= 2.36 on the device to run; for an older
//! device glibc, build with `SHOAL_NO_RELR=1` (the binary then says "version
//! `GLIBC_ABI_DT_RELR' not found" otherwise). Other profiles link as usual.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SHOAL_NO_RELR");
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<package>-<hash>/out: the only
    // place a build script learns the name of a custom profile.
    let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let linux_gnu = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if profile == "device" && linux_gnu && std::env::var_os("SHOAL_NO_RELR").is_none() {
        println!("cargo:rustc-link-arg-bin=shoal=-Wl,-z,pack-relative-relocs");
    }
}
