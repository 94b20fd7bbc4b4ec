//! The guest system, built from the project's own pieces: root slot images (the
//! Debian kernel, an initramfs, busybox, the freshly built `shoal` binary and the
//! libraries it links, a device configuration, health checks, release content) and
//! the EFI system partition with a standalone GRUB running Shoal's `grub.cfg`
//! fragment from `bootctl/integration/`.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::{self, Kernel, run, stdout};
use crate::image::{self, Entry};
use crate::machine::SLOT_SIZE;

/// The guest files (`tests/qemu/guest/`).
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu/guest")
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// One release of the device's root file system.
#[derive(Debug, Clone)]
pub struct Release {
    /// Short name, reported by the guest (`v1`).
    pub name: &'static str,
    /// The release version in the artifact.
    pub version: &'static str,
    /// Anti-rollback security counter.
    pub counter: u64,
    /// Seeds of the application data files: a release changes some of them, so
    /// consecutive releases share most chunks.
    pub data_seeds: &'static [u64],
    /// Whether its health check passes.
    pub healthy: bool,
    /// Whether its kernel comes up (false: the initramfs exits and the kernel panics).
    pub boots: bool,
}

/// Size of each application data file.
const DATA_FILE_SIZE: usize = 256 * 1024;

/// Deterministic incompressible bytes for a data file.
fn data_file(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(DATA_FILE_SIZE);
    while out.len() < DATA_FILE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Builds the guest's pieces in a work directory.
#[derive(Debug)]
pub struct Builder {
    dir: PathBuf,
    kernel: Kernel,
    shoal: PathBuf,
    libs: Vec<PathBuf>,
}

impl Builder {
    /// A builder working in `dir`, putting the stripped `shoal` binary into the
    /// guest together with every shared library `ldd` lists for it.
    pub fn new(dir: &Path, cache: &Path, shoal: &Path) -> Builder {
        fs::create_dir_all(dir).expect("work directory");
        let kernel = host::kernel(cache);
        let stripped = dir.join("shoal");
        run(Command::new("strip").arg("-o").arg(&stripped).arg(shoal));
        let ldd = stdout(Command::new("ldd").arg(&stripped));
        let mut libs = Vec::new();
        for line in ldd.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split_once("=>")
                .map_or(line, |(_, p)| p)
                .split_whitespace()
                .next()
                .unwrap_or_default();
            if path.starts_with('/') {
                libs.push(PathBuf::from(path));
            }
        }
        Builder {
            dir: dir.to_path_buf(),
            kernel,
            shoal: stripped,
            libs,
        }
    }

    /// The initramfs: busybox, the modules, and `/init` (mount the root slot and
    /// switch to it), or for a release that must not come up, an `/init` that exits.
    pub fn initramfs(&self, boots: bool) -> Vec<u8> {
        let mut entries = vec![
            Entry::Dir("bin".into()),
            Entry::Dir("dev".into()),
            Entry::Dir("proc".into()),
            Entry::Dir("sys".into()),
            Entry::Dir("newroot".into()),
            Entry::Dir("lib".into()),
            Entry::Dir("lib/modules".into()),
        ];
        entries.push(Entry::File(
            "bin/busybox".into(),
            0o755,
            fs::read(host::BUSYBOX).expect("read busybox"),
        ));
        for applet in busybox_applets() {
            entries.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
        }
        let mut list = String::new();
        for module in &self.kernel.modules {
            let name = module
                .file_name()
                .expect("module name")
                .to_string_lossy()
                .into_owned();
            entries.push(Entry::File(
                format!("lib/modules/{name}"),
                0o644,
                fs::read(module).expect("read module"),
            ));
            list.push_str(&name);
            list.push('\n');
        }
        entries.push(Entry::File("modules.list".into(), 0o644, list.into_bytes()));
        let init = if boots {
            "initramfs-init"
        } else {
            "panic-init"
        };
        entries.push(Entry::File(
            "init".into(),
            0o755,
            fs::read(guest_dir().join(init)).expect("read the guest init"),
        ));
        image::cpio(&entries)
    }

    /// The root slot image of `release`, with `extra` files (path, mode, contents)
    /// such as the device configuration and trust root. Returns its path.
    pub fn rootfs(&self, release: &Release, extra: &[(&str, u32, Vec<u8>)]) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{}", release.name));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bin",
            "boot",
            "boot/efi",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "data",
            "mnt/usb",
            "usr/bin",
            "usr/share/acme",
            "etc/shoal/health.d",
            "etc/shoal-qemu",
            "root",
        ] {
            fs::create_dir_all(root.join(d)).expect("rootfs directory");
        }
        symlink("bin", root.join("sbin")).expect("sbin link");
        symlink("bin", root.join("usr/sbin")).expect("usr/sbin link");
        put(
            &root,
            "bin/busybox",
            0o755,
            &fs::read(host::BUSYBOX).expect("busybox"),
        );
        for applet in busybox_applets() {
            symlink("busybox", root.join("bin").join(applet)).expect("applet link");
        }
        put(
            &root,
            "usr/bin/shoal",
            0o755,
            &fs::read(&self.shoal).expect("shoal"),
        );
        for lib in &self.libs {
            let rel = lib.strip_prefix("/").expect("absolute library path");
            let bytes = fs::read(lib).expect("read a library shoal links");
            put(&root, rel.to_str().expect("UTF-8 path"), 0o755, &bytes);
        }
        put(
            &root,
            "boot/vmlinuz",
            0o644,
            &fs::read(&self.kernel.vmlinuz).expect("vmlinuz"),
        );
        put(
            &root,
            "boot/initrd.img",
            0o644,
            &self.initramfs(release.boots),
        );
        let guest = guest_dir();
        put(
            &root,
            "etc/inittab",
            0o644,
            &fs::read(guest.join("inittab")).expect("inittab"),
        );
        put(
            &root,
            "etc/shoal-qemu/agent",
            0o755,
            &fs::read(guest.join("agent")).expect("agent"),
        );
        put(
            &root,
            "usr/bin/install-watched",
            0o755,
            &fs::read(guest.join("install-watched")).expect("install-watched"),
        );
        put(
            &root,
            "etc/shoal-qemu/release",
            0o644,
            release.name.as_bytes(),
        );
        let health = if release.healthy {
            "#!/bin/sh\n# The application's health check: its files are in place.\n\
             test -s /usr/share/acme/data-0.bin || { echo 'application data missing'; exit 1; }\n\
             echo \"application of release $(cat /etc/shoal-qemu/release) is healthy\"\n"
                .to_string()
        } else {
            format!(
                "#!/bin/sh\n# The application of release {} does not start.\n\
                 echo 'acme-app: cannot start: missing /usr/share/acme/config'\nexit 1\n",
                release.name
            )
        };
        put(&root, "etc/shoal/health.d/10-app", 0o755, health.as_bytes());
        for (i, seed) in release.data_seeds.iter().enumerate() {
            put(
                &root,
                &format!("usr/share/acme/data-{i}.bin"),
                0o644,
                &data_file(*seed),
            );
        }
        for (path, mode, bytes) in extra {
            put(&root, path, *mode, bytes);
        }
        let image = self.dir.join(format!("slot-{}.img", release.name));
        // Journaled, as a stock ext4 root is: mounted read-only it alters the
        // slot's cached view (see `image::Journal`), which Shoal must see through.
        image::ext4(
            &image,
            "rootfs",
            SLOT_SIZE,
            Some(&root),
            image::Journal::Yes,
        );
        fs::remove_dir_all(&root).expect("remove the rootfs tree");
        image
    }

    /// A standalone GRUB EFI binary (`BOOTX64.EFI`): `board` is its `grub.cfg`, and
    /// Shoal's fragment is embedded beside it as `$prefix/shoal.cfg`.
    pub fn grub_efi(&self, board: &str, fragment: &str) -> Vec<u8> {
        let board_path = self.dir.join("grub.cfg");
        let fragment_path = self.dir.join("shoal.cfg");
        fs::write(&board_path, board).expect("write grub.cfg");
        fs::write(&fragment_path, fragment).expect("write shoal.cfg");
        let efi = self.dir.join("BOOTX64.EFI");
        run(Command::new("grub-mkstandalone")
            .args(["-O", "x86_64-efi", "-o"])
            .arg(&efi)
            .arg(
                "--install-modules=part_gpt fat ext2 loadenv regexp search search_fs_file \
                 search_fs_uuid search_label linux echo test normal configfile cat sleep \
                 reboot halt",
            )
            .args([
                "--modules=part_gpt fat ext2",
                "--locales=",
                "--fonts=",
                "--themes=",
            ])
            .arg(format!("boot/grub/grub.cfg={}", board_path.display()))
            .arg(format!("boot/grub/shoal.cfg={}", fragment_path.display())));
        fs::read(&efi).expect("read BOOTX64.EFI")
    }

    /// The four blocks of a GRUB environment in Shoal's two-copy layout (see
    /// `shoal_bootctl::env::grub`), made with `grub-editenv`: both copies hold
    /// `vars`, both locks say `editing=0`. Returns `(path under grub_dir, bytes)`.
    pub fn grub_env(&self, vars: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let block = |name: &str, kv: &[String]| -> Vec<u8> {
            let path = self.dir.join(name);
            let _ = fs::remove_file(&path);
            run(Command::new("grub-editenv").arg(&path).arg("create"));
            run(Command::new("grub-editenv").arg(&path).arg("set").args(kv));
            fs::read(&path).expect("read env block")
        };
        let kv: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let env = block("grubenv", &kv);
        let lock = block("grublock", &["editing=0".to_string()]);
        let mut out = Vec::new();
        for n in [1, 2] {
            out.push((format!("shoal_grubenv{n}/env"), env.clone()));
            out.push((format!("shoal_grubenv{n}/lock"), lock.clone()));
        }
        out
    }
}

/// Writes `bytes` to `root/rel` with `mode`, creating parent directories.
fn put(root: &Path, rel: &str, mode: u32, bytes: &[u8]) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("parent directory");
    }
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("set mode");
}

/// The applets of the host's static busybox.
fn busybox_applets() -> Vec<String> {
    stdout(Command::new(host::BUSYBOX).arg("--list"))
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(str::to_string)
        .collect()
}
