//! Link flags of the device build (`--profile device`): on linux-gnu targets the
//! `shoal` binary is linked with packed relative relocations (DT_RELR, `-z
//! pack-relative-relocs`): the same position-independent executable, about 300 KB
//! smaller (its `.rela.dyn` of 24 bytes per pointer becomes a bitmap). It needs GNU
//! ld >= 2.38 (or lld) to link and glibc >= 2.36 on the device to run; for an older
//! device glibc, build with `SHOAL_NO_RELR=1` (the binary then says "version
//! `GLIBC_ABI_DT_RELR' not found" otherwise).
//!
//! On x86_64 and aarch64 linux-gnu targets the device build also leaves out the
//! unwind tables (`.eh_frame`,
//! `.eh_frame_hdr`, `.gcc_except_table`: about 870 KB): the profile has panic =
//! "abort", so nothing unwinds, and a stripped binary's backtrace has no names to
//! print anyway (`RUST_BACKTRACE=full` then lists one raw address instead of a
//! dozen). `-C force-unwind-tables=no` would need RUSTFLAGS, which apply to every
//! profile (the tests unwind), and would leave std's tables (and those of every
//! function that inlines std code) in; a linker script given to the link of `shoal`
//! alone discards them all (measured on x86_64-unknown-linux-gnu, with lld and with
//! GNU ld; aarch64 unwinds through `.eh_frame` the same way, and is let in on that
//! ground, not linked here). `SHOAL_KEEP_UNWIND_TABLES=1` keeps them (e.g. to walk a core dump's
//! stack in gdb). Other profiles, and other targets, link as usual: on 32-bit ARM
//! the unwind index (`.ARM.exidx`/`.ARM.extab`, not `.eh_frame`) points into
//! `.gcc_except_table`, and GNU ld refuses to link once that is discarded ("`lsda'
//! referenced in section `.ARM.extab' ... defined in discarded section"); other
//! architectures and libcs were not measured, so they keep their tables.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SHOAL_NO_RELR");
    println!("cargo:rerun-if-env-changed=SHOAL_KEEP_UNWIND_TABLES");
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
    let linux = var("CARGO_CFG_TARGET_OS") == "linux";
    let linux_gnu = linux && var("CARGO_CFG_TARGET_ENV") == "gnu";
    // Only where the script was measured to link and run (see the crate doc: 32-bit
    // ARM's unwind index refers to `.gcc_except_table`, so discarding it breaks the
    // link there).
    let arch = var("CARGO_CFG_TARGET_ARCH");
    let drop_unwind = linux_gnu && (arch == "x86_64" || arch == "aarch64");
    if profile == "device" && linux_gnu && std::env::var_os("SHOAL_NO_RELR").is_none() {
        println!("cargo:rustc-link-arg-bin=shoal=-Wl,-z,pack-relative-relocs");
    }
    if profile == "device" && drop_unwind && std::env::var_os("SHOAL_KEEP_UNWIND_TABLES").is_none()
    {
        // `INSERT AFTER` makes the script amend the linker's default layout instead of
        // replacing it.
        let script = Path::new(&out_dir).join("no-unwind-tables.ld");
        std::fs::write(
            &script,
            "SECTIONS {\n  /DISCARD/ : { *(.eh_frame) *(.eh_frame_hdr) \
             *(.gcc_except_table .gcc_except_table.*) }\n} INSERT AFTER .text;\n",
        )
        .expect("write the device build's linker script to OUT_DIR");
        // The C compiler driver's own `-T FILE` (not `-Wl,-T,FILE`, which a comma in
        // the target directory's path would split).
        println!("cargo:rustc-link-arg-bin=shoal=-T");
        println!("cargo:rustc-link-arg-bin=shoal={}", script.display());
    }
}
