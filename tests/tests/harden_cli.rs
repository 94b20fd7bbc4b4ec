//! Regression tests for issue 9 ("Hardening"): what an adversarial review of the
//! release binary found, and the error contract (one line on stderr, the right exit
//! code), through the real binary on file-backed devices.

mod install_common;

use std::path::Path;

use install_common::{Device, image, ok};
use shoal_bootctl::Slot;
use shoal_tests::fails;

const MIB: usize = 1024 * 1024;
const SIZE: usize = 2 * MIB;
const SLOT: u64 = 3 * MIB as u64;

/// A ustar header block for `path` of type `kind` with `size` data bytes.
fn ustar_header(path: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Appends a member after the last one (as `tarfile.open(.., 'a')` does): the end
/// blocks are replaced by the member, then written again.
fn append_member(artifact: &Path, path: &str, kind: u8, data: &[u8]) {
    let mut bytes = std::fs::read(artifact).expect("artifact");
    let end = bytes.len() - 1024;
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "ends with the end blocks"
    );
    bytes.truncate(end);
    bytes.extend_from_slice(&ustar_header(path, kind, data.len() as u64));
    bytes.extend_from_slice(data);
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(artifact, bytes).expect("write artifact");
}

fn no_trial_armed(dev: &Device) {
    let state = dev.boot_state();
    assert_eq!(state.trial, None, "no trial armed: {state:?}");
    assert_eq!(state.committed, Slot::A);
}

/// Item 1: slot B configured as a symlink to slot A's file. The install wrote the
/// new image over the running slot A and armed a trial.
#[test]
fn a_slot_symlinked_to_the_running_slot_is_refused_before_anything_is_written() {
    let factory = image(1, SIZE);
    let dev = Device::new(&factory, SLOT);
    let v1 = dev.build(&image(2, SIZE), "1.0", 1, None);
    let link = dev.path("by-partlabel-rootfs-b");
    std::os::unix::fs::symlink(dev.path("a.img"), &link).expect("symlink");
    dev.write_config_with_b(&link, None, "");
    let before = std::fs::read(dev.path("a.img")).expect("slot A");
    let line = fails(dev.run(&["install", &v1.display().to_string()]), 2);
    assert_eq!(
        line,
        format!(
            "shoal: [slots]/[bootloader]: slots A and B overlap: {a} and {link} (= {a}) are the same storage",
            a = dev.path("a.img").display(),
            link = link.display()
        )
    );
    assert_eq!(std::fs::read(dev.path("a.img")).expect("slot A"), before);
    no_trial_armed(&dev);
}

/// Item 2: one extra tar member after the last pack. `install` exited 1 ("unexpected
/// tar member") with the trial already armed.
#[test]
fn an_extra_member_after_the_last_pack_fails_the_install_without_arming() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    let v1 = dev.build(&image(2, SIZE), "1.0", 1, None);
    append_member(&v1, "evil", b'0', b"hello");
    let out = dev.run(&["install", &v1.display().to_string()]);
    no_trial_armed(&dev);
    let line = fails(out, 1);
    assert_eq!(
        line,
        format!(
            "shoal: installing {}: unexpected tar member \"evil\"",
            v1.display()
        )
    );
    no_trial_armed(&dev);
    let status = dev.status();
    assert_ne!(status["deployment"]["phase"], "trial-armed", "{status}");
    let _ = ok;
}
