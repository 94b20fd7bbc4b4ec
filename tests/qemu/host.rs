//! The host side of the QEMU harness: which OS tools it needs (and the Debian
//! packages that provide them), running them, and the cached Debian kernel.
//!
//! Nothing here skips: a missing tool fails the test with the list of packages to
//! install, because a boot test that silently does not run proves nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Every program the harness runs on the host, with the Debian package providing it.
pub const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("grub-mkstandalone", "grub-common"),
    ("grub-editenv", "grub-common"),
    ("mkfs.fat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("mkfs.ext4", "e2fsprogs"),
    ("sgdisk", "gdisk"),
    ("depmod", "kmod"),
    ("modprobe", "kmod"),
    ("strip", "binutils"),
    ("ldd", "libc-bin"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg", "dpkg"),
];

/// Files the harness needs besides programs, with their packages.
pub const FILES: &[(&str, &str)] = &[
    (OVMF_CODE, "ovmf"),
    (OVMF_VARS, "ovmf"),
    (GRUB_EFI_MODULES, "grub-efi-amd64-bin"),
    (BUSYBOX, "busybox-static"),
];

/// UEFI firmware code (read-only flash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// UEFI variable store template (each machine gets a writable copy).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// GRUB's x86_64 EFI modules, which `grub-mkstandalone -O x86_64-efi` needs.
pub const GRUB_EFI_MODULES: &str = "/usr/lib/grub/x86_64-efi/linux.mod";
/// A statically linked busybox: the guest's shell and tools.
pub const BUSYBOX: &str = "/bin/busybox";

/// The packages to install on a Debian host for the whole suite.
pub fn packages() -> Vec<&'static str> {
    let mut all: Vec<&str> = TOOLS.iter().chain(FILES).map(|(_, p)| *p).collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

/// Fails the test, naming the packages, when a tool or file is missing (or busybox
/// is not the static build).
pub fn require() {
    let mut missing: Vec<String> = Vec::new();
    for (program, package) in TOOLS {
        if !on_path(program) {
            missing.push(format!("{program} (package {package})"));
        }
    }
    for (file, package) in FILES {
        if !Path::new(file).exists() {
            missing.push(format!("{file} (package {package})"));
        }
    }
    if missing.is_empty() && !busybox_is_static() {
        missing.push(format!(
            "{BUSYBOX} is dynamically linked (package busybox-static)"
        ));
    }
    assert!(
        missing.is_empty(),
        "\n\n*** THE QEMU BOOT TEST CANNOT RUN: missing {} ***\n\
         install them with:\n    apt-get install -y --no-install-recommends {}\n\
         (`.ci/run` installs them in CI; this test is not skipped, it fails)\n",
        missing.join(", "),
        packages().join(" ")
    );
}

fn busybox_is_static() -> bool {
    // An ELF with a PT_INTERP program header is dynamically linked.
    let Ok(elf) = fs::read(BUSYBOX) else {
        return false;
    };
    let field = |at: usize, len: usize| -> u64 {
        elf.get(at..at + len).map_or(0, |b| {
            b.iter()
                .rev()
                .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte))
        })
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        return false;
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8), field(0x36, 2), field(0x38, 2));
    (0..phnum).all(|i| {
        let at = usize::try_from(phoff + i * phentsize).unwrap_or(usize::MAX);
        field(at, 4) != 3 // PT_INTERP
    })
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// The kernel modules the guest loads, in dependency order, from its initramfs:
/// the stock Debian kernel builds the virtio disk, file systems and fw_cfg drivers
/// as modules.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "qemu_fw_cfg",
];

/// A Debian kernel and the modules the guest needs.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// Module files, in load order.
    pub modules: Vec<PathBuf>,
}

/// Fetches (once, into `cache`) the Debian kernel package `linux-image-amd64`
/// depends on (override with `SHOAL_QEMU_KERNEL_PKG`), keeping only the kernel
/// image and the modules the guest loads.
pub fn kernel(cache: &Path) -> Kernel {
    let meta =
        std::env::var("SHOAL_QEMU_KERNEL_PKG").unwrap_or_else(|_| "linux-image-amd64".into());
    let out = Command::new("apt-cache")
        .args(["depends", &meta])
        .output()
        .expect("run apt-cache");
    let depends = String::from_utf8_lossy(&out.stdout);
    let resolved = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
        })
        .map(str::to_string)
        .or_else(|| (out.status.success() && !depends.is_empty()).then(|| meta.clone()));
    // Without apt lists, a kernel cached earlier still does.
    let cached = || {
        fs::read_dir(cache)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.path().join(".done").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
    };
    let package = resolved.or_else(cached).unwrap_or_else(|| {
        panic!(
            "\n\n*** THE QEMU BOOT TEST CANNOT FETCH ITS KERNEL: apt knows no package {meta} ***\n\
             run `apt-get update` (the test fetches the kernel with `apt-get download` into \
             {})\n{}\n",
            cache.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let dir = cache.join(&package);
    let done = dir.join(".done");
    if !done.exists() {
        // Built in a private staging directory and renamed into place when
        // complete, so concurrent test runs never see half a cache.
        let staging = cache.join(format!("{package}.partial-{}", std::process::id()));
        eprintln!(
            "qemu: fetching kernel package {package} into {}",
            dir.display()
        );
        let _ = fs::remove_dir_all(&staging);
        let work = staging.join("work");
        fs::create_dir_all(&work).expect("kernel cache directory");
        run(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&work));
        let deb = fs::read_dir(&work)
            .expect("download directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .unwrap_or_else(|| panic!("apt-get download {package} left no .deb"));
        let x = work.join("x");
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&x));
        let kver = fs::read_dir(x.join("lib/modules"))
            .expect("kernel package has lib/modules")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .expect("a kernel version directory");
        run(Command::new("depmod").arg("-b").arg(&x).arg(&kver));
        fs::copy(
            x.join(format!("boot/vmlinuz-{kver}")),
            staging.join("vmlinuz"),
        )
        .expect("copy vmlinuz");
        let mods = staging.join("modules");
        fs::create_dir_all(&mods).expect("modules directory");
        let mut order: Vec<String> = Vec::new();
        for module in MODULES {
            let show = stdout(Command::new("modprobe").arg("-d").arg(&x).args([
                "-S",
                &kver,
                "--show-depends",
                module,
            ]));
            for line in show.lines() {
                let Some(path) = line.strip_prefix("insmod ") else {
                    continue;
                };
                let path = Path::new(path.split_whitespace().next().unwrap_or_default());
                let name = path
                    .file_name()
                    .expect("module file name")
                    .to_string_lossy()
                    .into_owned();
                if !order.contains(&name) {
                    fs::copy(path, mods.join(&name)).expect("copy module");
                    order.push(name);
                }
            }
        }
        fs::write(staging.join("modules.list"), order.join("\n") + "\n").expect("modules.list");
        fs::remove_dir_all(&work).expect("remove the unpacked package");
        fs::write(staging.join(".done"), &package).expect("mark the kernel cache complete");
        if fs::rename(&staging, &dir).is_err() {
            // Another run finished first (or a stale directory is in the way).
            if done.exists() {
                let _ = fs::remove_dir_all(&staging);
            } else {
                let _ = fs::remove_dir_all(&dir);
                fs::rename(&staging, &dir).expect("move the kernel cache into place");
            }
        }
    }
    let list = fs::read_to_string(dir.join("modules.list")).expect("modules.list");
    Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: list
            .lines()
            .map(|name| dir.join("modules").join(name))
            .collect(),
    }
}

/// Whether KVM can run this machine: only with real VT-x/AMD-V. Sandboxes that
/// expose `kvm_pvm` (no vmx/svm in cpuinfo) cannot run firmware, so they use TCG.
pub fn accel_args() -> Vec<String> {
    let forced = std::env::var("SHOAL_QEMU_ACCEL").unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm")
        && !Path::new("/sys/module/kvm_pvm").exists();
    let kvm = match forced.as_str() {
        "kvm" => true,
        "tcg" => false,
        _ => kvm_usable,
    };
    if kvm {
        ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    } else {
        ["-accel", "tcg", "-cpu", "max"]
    }
    .map(String::from)
    .to_vec()
}
