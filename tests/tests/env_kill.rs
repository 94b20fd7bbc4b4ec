//! Real process kills: `shoal env set` is SIGKILLed at pseudo-random moments while
//! it updates an environment (redundant U-Boot, GRUB layout, file backend), and after
//! every kill the environment must read back as either the last completed update or
//! the interrupted one, never a mix and never unreadable.
//!
//! This complements bootctl's exhaustive simulated-crash tests: a kill does not lose
//! the page cache, so it checks that each update is ordered and never leaves both
//! copies unusable at the system-call level, with the real binary and real files.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::env::grub::{GrubEnv, Paths};
use shoal_bootctl::env::uboot::{FwEnvConfig, UbootEnv};
use shoal_bootctl::env::{Env, Vars};
use shoal_tests::shoal;

/// A small deterministic generator (xorshift64*), so a failure is reproducible from
/// the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn kill_loop(selector: &[String], open: &dyn Fn() -> Box<dyn Env>, seed: u64) {
    let mut rng = Rng(seed);
    let mut committed: u64 = 0;
    let mut kills = 0;
    let mut completions = 0;
    // Calibrate: how long one update takes (median of three), so kills land
    // anywhere in it.
    let mut runs_us: Vec<u64> = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let out = shoal()
                .args(["env", "set"])
                .args(selector)
                .arg("n=0")
                .output()
                .expect("run shoal");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            t0.elapsed().as_micros() as u64
        })
        .collect();
    runs_us.sort_unstable();
    let run_us = runs_us[1];
    let start = Instant::now();
    for n in 1..=40u64 {
        // Big values make each update a few writes of real size.
        let value = format!("{n}-{}", "x".repeat((n % 7 * 40) as usize));
        let mut cmd = shoal();
        cmd.args(["env", "set"])
            .args(selector)
            .arg(format!("counter={value}"))
            .arg(format!("n={n}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn shoal");
        let delay_us = rng.next() % (run_us * 12 / 10 + 1);
        std::thread::sleep(Duration::from_micros(delay_us));
        let finished = child.try_wait().expect("try_wait").is_some();
        if !finished {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let status = child.wait().expect("wait");
        let vars: Vars = open()
            .load()
            .unwrap_or_else(|e| panic!("seed {seed}, update {n}: unreadable after kill: {e}"));
        let got: u64 = vars
            .get("n")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("seed {seed}, update {n}: no n in {vars:?}"));
        assert!(
            got == committed || got == n,
            "seed {seed}, update {n}: env says n={got}, expected {committed} or {n}"
        );
        if got == n {
            assert_eq!(
                vars["counter"], value,
                "seed {seed}, update {n}: mixed variables"
            );
            committed = n;
        }
        if status.success() {
            completions += 1;
            assert_eq!(
                got, n,
                "seed {seed}, update {n}: completed update not visible"
            );
        }
    }
    eprintln!(
        "seed {seed}: one update takes {run_us} us; {kills} kills, {completions} completed, \
         last committed {committed}, {:?}",
        start.elapsed()
    );
    assert!(kills > 0, "seed {seed}: no update was ever interrupted");
    assert!(completions > 0, "seed {seed}: no update ever completed");
}

fn seed() -> u64 {
    std::env::var("SHOAL_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001)
}

#[test]
fn killed_env_set_leaves_redundant_uboot_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 0x40000]).unwrap();
    let cfg = dir.path().join("fw_env.config");
    std::fs::write(
        &cfg,
        format!("{0} 0x0 0x20000\n{0} 0x20000 0x20000\n", img.display()),
    )
    .unwrap();
    let config = FwEnvConfig::load(&cfg).unwrap();
    let open = || -> Box<dyn Env> { Box::new(UbootEnv::open(&config, false).unwrap()) };
    let mut first = UbootEnv::open(&config, true).unwrap();
    first
        .store(&Vars::from([("n".into(), "0".into())]))
        .unwrap();
    kill_loop(
        &["--uboot-config".into(), cfg.display().to_string()],
        &open,
        seed(),
    );
}

#[test]
fn killed_env_set_leaves_grub_layout_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path(), "shoal_grubenv");
    let open = || -> Box<dyn Env> { Box::new(GrubEnv::open(&paths, false).unwrap()) };
    GrubEnv::open(&paths, true)
        .unwrap()
        .store(&Vars::from([("n".into(), "0".into())]))
        .unwrap();
    kill_loop(
        &["--grub".into(), dir.path().display().to_string()],
        &open,
        seed() + 1,
    );
}

#[test]
fn killed_env_set_leaves_file_env_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootenv");
    let open = || -> Box<dyn Env> { Box::new(FileEnv::open(Path::new(&path), false).unwrap()) };
    FileEnv::open(&path, true)
        .unwrap()
        .store(&Vars::from([("n".into(), "0".into())]))
        .unwrap();
    kill_loop(
        &["--file".into(), path.display().to_string()],
        &open,
        seed() + 2,
    );
}
