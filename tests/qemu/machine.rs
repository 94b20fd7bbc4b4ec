//! One QEMU machine: a GPT disk (ESP with a standalone GRUB, two root slots, a data
//! partition), a USB stick, UEFI firmware, and boots that end when the guest powers
//! off or reboots (QEMU runs with `-no-reboot`), when the host kills it, or at a
//! timeout.
//!
//! The guest's instructions travel in the fw_cfg file `opt/shoal/steps`; its
//! answers come back on the serial console as `@@` lines (see `guest/agent`).

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host;
use crate::image::{self, MIB, Part};

/// The disk layout. Partition numbers are the `/dev/vdaN` the guest sees.
pub const ESP: Part = Part {
    type_code: "ef00",
    name: "esp",
    offset: MIB,
    size: 32 * MIB,
};
/// Size of each root slot: room for the `shoal` test binary (debug, stripped, with
/// the server role and the LAN layer: about 45 MB).
pub const SLOT_SIZE: u64 = 96 * MIB;
/// Root slot A (`/dev/vda2`).
pub const SLOT_A: Part = Part {
    type_code: "8304",
    name: "rootA",
    offset: ESP.offset + ESP.size,
    size: SLOT_SIZE,
};
/// Root slot B (`/dev/vda3`).
pub const SLOT_B: Part = Part {
    type_code: "8304",
    name: "rootB",
    offset: SLOT_A.offset + SLOT_A.size,
    size: SLOT_SIZE,
};
/// The data partition for Shoal's store (`/dev/vda4`, mounted at `/data`).
pub const DATA: Part = Part {
    type_code: "8300",
    name: "data",
    offset: SLOT_B.offset + SLOT_B.size,
    size: 32 * MIB,
};

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// QEMU exited by itself: the guest powered off, rebooted or reset (panic).
    Exited,
    /// The host killed QEMU with SIGKILL: a power cut.
    PowerCut,
}

/// One step the agent ran, as reported on the console.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// The command.
    pub command: String,
    /// Its output lines (stdout and stderr interleaved).
    pub output: Vec<String>,
    /// Its exit code; `None` when the boot ended before it finished.
    pub rc: Option<i32>,
}

impl Step {
    /// The output as one string.
    pub fn text(&self) -> String {
        self.output.join("\n")
    }
}

/// What one boot reported.
#[derive(Debug)]
pub struct Boot {
    /// A label for messages (`boot 3: install v2`).
    pub label: String,
    /// The whole serial console log.
    pub log: String,
    /// How it ended.
    pub end: End,
    /// Wall time of the boot.
    pub elapsed: Duration,
    /// The serial log's file.
    pub log_path: PathBuf,
}

impl fmt::Display for Boot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?} after {:.1} s; serial log {})\n----- serial console -----\n{}\n----- end of serial console -----",
            self.label,
            self.end,
            self.elapsed.as_secs_f64(),
            self.log_path.display(),
            self.log
        )
    }
}

/// The `@@` payload of a console line, if it has one. Kernel messages can share a
/// line with the agent's output, so the marker is searched, not anchored.
fn marker(line: &str) -> Option<&str> {
    line.find("@@").map(|i| &line[i + 2..])
}

impl Boot {
    /// Panics with `msg` and the serial log.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{self}")
    }

    /// The `@@` lines, without the marker.
    pub fn markers(&self) -> impl Iterator<Item = &str> {
        self.log.lines().filter_map(marker)
    }

    /// `(slot, release)` from the agent's `@@booted` line, if the system came up.
    pub fn booted(&self) -> Option<(String, String)> {
        self.markers()
            .filter_map(|m| m.strip_prefix("booted "))
            .map(|rest| {
                let field = |k: &str| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .unwrap_or_default()
                        .to_string()
                };
                (field("slot="), field("release="))
            })
            .last()
    }

    /// Asserts the system came up from `slot` running `release`.
    #[track_caller]
    pub fn expect_booted(&self, slot: &str, release: &str) {
        match self.booted() {
            Some((s, r)) if s == slot && r == release => {}
            Some((s, r)) => self.fail(&format!(
                "expected slot {slot} with release {release}, the machine booted slot {s} with release {r}"
            )),
            None => self.fail(&format!(
                "expected slot {slot} with release {release}, the system did not come up"
            )),
        }
    }

    /// Whether the console shows `needle` anywhere.
    pub fn shows(&self, needle: &str) -> bool {
        self.log.contains(needle)
    }

    /// The step named `name` (`boot-check`, or `1`, `2`, ... for the host's steps).
    pub fn step(&self, name: &str) -> Option<Step> {
        let begin = format!("step {name} begin ");
        let end = format!("step {name} end rc=");
        let out = format!("{name}| ");
        let mut step: Option<Step> = None;
        for m in self.markers() {
            if let Some(cmd) = m.strip_prefix(&begin) {
                step = Some(Step {
                    command: cmd.to_string(),
                    ..Step::default()
                });
            } else if let (Some(s), Some(line)) = (step.as_mut(), m.strip_prefix(&out)) {
                s.output.push(line.to_string());
            } else if let (Some(s), Some(rc)) = (step.as_mut(), m.strip_prefix(&end)) {
                s.rc = rc.split_whitespace().next().and_then(|n| n.parse().ok());
            }
        }
        step
    }

    /// The step named `name`, which must have finished with exit code `rc`.
    #[track_caller]
    pub fn expect_step(&self, name: &str, rc: i32) -> Step {
        let Some(step) = self.step(name) else {
            self.fail(&format!("step {name} never ran"))
        };
        if step.rc != Some(rc) {
            self.fail(&format!(
                "step {name} (`{}`) ended with {:?}, expected exit code {rc}; its output:\n{}",
                step.command,
                step.rc,
                step.text()
            ));
        }
        step
    }
}

/// What a boot should do and when to stop it.
pub struct Run<'a> {
    /// A label for messages.
    pub label: String,
    /// The agent's steps: shell commands run in order after `shoal boot-check`.
    pub steps: Vec<String>,
    /// The longest the boot may take.
    pub timeout: Duration,
    /// Called with each `@@` line (without the marker); returning true cuts the
    /// power (SIGKILL to QEMU) at once.
    pub cut_power_when: Option<&'a mut dyn FnMut(&str) -> bool>,
}

impl fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("label", &self.label)
            .field("steps", &self.steps)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<'a> Run<'a> {
    /// A boot running `steps`, with the default timeout.
    pub fn new(label: impl Into<String>, steps: &[&str]) -> Run<'a> {
        Run {
            label: label.into(),
            steps: steps.iter().map(|s| (*s).to_string()).collect(),
            timeout: Duration::from_secs(300),
            cut_power_when: None,
        }
    }

    /// Cuts the power when `when` returns true for a console marker line.
    pub fn cut_power_when(mut self, when: &'a mut dyn FnMut(&str) -> bool) -> Run<'a> {
        self.cut_power_when = Some(when);
        self
    }
}

/// A machine: its disk, USB stick and firmware variables, in a work directory.
#[derive(Debug)]
pub struct Machine {
    dir: PathBuf,
    /// The system disk.
    pub disk: PathBuf,
    usb: PathBuf,
    vars: PathBuf,
    boots: usize,
    /// Total wall time spent in QEMU.
    pub qemu_time: Duration,
}

impl Machine {
    /// Assembles the machine in `dir`: `esp`, `slot_a`, `slot_b` and `data` are
    /// partition images (a slot without one is all zeros), `usb` the stick's image.
    pub fn assemble(
        dir: &Path,
        esp: &Path,
        slot_a: Option<&Path>,
        slot_b: Option<&Path>,
        data: &Path,
        usb: &Path,
    ) -> Machine {
        let disk = dir.join("disk.img");
        image::gpt_disk(
            &disk,
            &[ESP, SLOT_A, SLOT_B, DATA],
            &[Some(esp), slot_a, slot_b, Some(data)],
        );
        let vars = dir.join("ovmf_vars.fd");
        fs::copy(host::OVMF_VARS, &vars).expect("copy the OVMF variable store");
        Machine {
            dir: dir.to_path_buf(),
            disk,
            usb: usb.to_path_buf(),
            vars,
            boots: 0,
            qemu_time: Duration::ZERO,
        }
    }

    /// How many times the machine was booted.
    pub fn boots(&self) -> usize {
        self.boots
    }

    /// Boots once and returns what the guest reported. Panics (with the serial log)
    /// when QEMU cannot start or the boot exceeds its timeout.
    pub fn boot(&mut self, run: Run<'_>) -> Boot {
        self.boots += 1;
        let label = format!("boot {}: {}", self.boots, run.label);
        eprintln!("qemu: {label}");
        let steps = self.dir.join("steps");
        let mut text = run.steps.join("\n");
        text.push('\n');
        fs::write(&steps, text).expect("write the steps file");
        let log_path = self.dir.join(format!("serial-{:02}.log", self.boots));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(host::accel_args());
        cmd.args([
            "-machine",
            "q35",
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-net",
            "none",
        ]);
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            host::OVMF_CODE
        ));
        cmd.arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", self.vars.display()));
        cmd.arg("-drive").arg(format!(
            "if=none,id=sys,format=raw,file={}",
            self.disk.display()
        ));
        cmd.args(["-device", "virtio-blk-pci,drive=sys,bootindex=0"]);
        cmd.arg("-drive").arg(format!(
            "if=none,id=usb,format=raw,readonly=on,file={}",
            self.usb.display()
        ));
        cmd.args(["-device", "virtio-blk-pci,drive=usb"]);
        cmd.arg("-fw_cfg")
            .arg(format!("name=opt/shoal/steps,file={}", steps.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .replace('\r', "");
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut log = String::new();
        let mut end = End::Exited;
        let mut cut = run.cut_power_when;
        let deadline = start + run.timeout;
        let mut timed_out = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    log.push_str(&line);
                    log.push('\n');
                    if let (Some(m), Some(when)) = (marker(&line), cut.as_mut())
                        && when(m)
                    {
                        let _ = child.kill();
                        end = End::PowerCut;
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    timed_out = true;
                    break;
                }
            }
        }
        let status = child.wait().expect("wait for qemu");
        // After a kill the reader sees EOF; drain what it read before.
        let _ = reader.join();
        while let Ok(line) = rx.try_recv() {
            log.push_str(&line);
            log.push('\n');
        }
        let elapsed = start.elapsed();
        self.qemu_time += elapsed;
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        fs::write(&log_path, &log).expect("write the serial log");
        let boot = Boot {
            label,
            log,
            end,
            elapsed,
            log_path,
        };
        eprintln!(
            "qemu:   {:?} after {:.1} s, booted {:?}",
            boot.end,
            boot.elapsed.as_secs_f64(),
            boot.booted()
        );
        if timed_out {
            boot.fail(&format!(
                "the boot did not end within {} s (QEMU killed)",
                run.timeout.as_secs()
            ));
        }
        if end == End::Exited && !status.success() {
            boot.fail(&format!("QEMU failed with {status}: {stderr}"));
        }
        boot
    }
}
