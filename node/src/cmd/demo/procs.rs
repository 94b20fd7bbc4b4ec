//! The demo's child processes and its interruption (Ctrl-C, SIGTERM, SIGHUP).
//!
//! Every process the demo starts is owned by a [`Proc`], which kills and reaps it
//! when dropped (on success, on an error, on an interruption). Children run in
//! their own process group, so a Ctrl-C on the terminal reaches the demo alone and
//! the demo stops them in order; and each is asked to die with the demo
//! (`PR_SET_PDEATHSIG`), so even a demo killed with SIGKILL leaves none running.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cmd::Exit;

/// Set once SIGINT, SIGTERM or SIGHUP arrived.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The exit code of a demo stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Catches SIGINT, SIGTERM and SIGHUP from now on: they set a flag that every wait
/// of the demo checks, instead of ending the process before it cleaned up.
pub fn catch_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the signal watcher")?;
    // Registered here, before the demo starts anything: a signal from now on is seen.
    let (mut int, mut term, mut hup) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ))
        })
        .context("cannot catch signals")?;
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            });
            INTERRUPTED.store(true, Ordering::SeqCst);
        })
        .context("cannot start the signal watcher")?;
    Ok(())
}

/// `Err` (exit code 130) once the demo was interrupted.
pub fn check() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(anyhow::Error::new(Exit {
            code: EXIT_INTERRUPTED,
            message: "interrupted".into(),
        }));
    }
    Ok(())
}

/// Sleeps `d`, in steps that notice an interruption.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Polls `f` every `every` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let end = Instant::now() + timeout;
    loop {
        check()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!(
                "{what} did not happen within {} s",
                timeout.as_secs_f64().round()
            );
        }
        sleep(every)?;
    }
}

/// A child process the demo owns; killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages ("dev-3's daemon").
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` with stdin closed, stdout discarded and stderr appended to `log`,
    /// in a process group of its own, to die with the demo.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt as _;
        let name = name.into();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name,
            child: Some(child),
        })
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Asks it to stop (SIGTERM), waits up to `grace`, then kills it. Returns
    /// whether it was running.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        if !grace.is_zero() {
            terminate(child.id());
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    /// Kills it at once (SIGKILL), as a power cut or a reboot would.
    pub fn kill(&mut self) -> bool {
        self.stop(Duration::ZERO)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGTERM to `pid`.
#[allow(unsafe_code)]
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) only sends a signal; `pid` is a child this process has not
    // reaped yet (the caller holds its `Child`), so the id cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Has the kernel kill the child with SIGKILL when the thread that started it (the
/// demo's main thread) ends, whatever way it ends.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl(2), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
