//! Command implementations, one module per noun.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

#[cfg(feature = "server")]
pub mod admin;
pub mod artifact;
pub mod daemon;
#[cfg(feature = "host")]
pub mod demo;
pub mod device;
pub mod env;
pub mod install;
pub mod key;
pub mod reports;
pub mod root;
#[cfg(feature = "server")]
pub mod server;
pub mod slot;
pub mod store;

/// Exit code: the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: temporary failure; safe to retry.
pub const EXIT_TEMPFAIL: u8 = 75;

/// An error that carries its own exit code. Attach it with
/// `Err(anyhow::Error::new(Exit::usage(..)))` or `.context(..)` on top of it.
#[derive(Debug)]
pub struct Exit {
    /// The process exit code.
    pub code: u8,
    /// What went wrong, one line.
    pub message: String,
}

impl Exit {
    /// A usage or configuration error (exit code 2).
    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code: EXIT_USAGE,
            message: message.into(),
        })
    }

    /// A temporary failure that is safe to retry (exit code 75).
    pub fn tempfail(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code: EXIT_TEMPFAIL,
            message: message.into(),
        })
    }
}

/// An error and its sources, on one line, each said once (a source whose text the
/// line already holds is left out).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !text.is_empty() && !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// An error and its causes on one line, each said once: a cause whose text the line
/// already holds (a message that quotes its source, a context that repeats it) is
/// left out, and control characters are escaped so the line stays one line.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    escape(&line).into_owned()
}

/// `text` with control characters (terminal escapes, newlines) written as `\u{..}`
/// escapes, for printing text that came from untrusted input.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Picks the exit code for an error: the innermost [`Exit`] in its chain decides,
/// otherwise 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .filter_map(|e| e.downcast_ref::<Exit>())
        .last()
        .map_or(EXIT_FAILED, |e| e.code)
}

/// How a command talks to the person running it.
#[derive(Debug)]
pub struct Ui {
    quiet: bool,
    tty: bool,
}

impl Ui {
    /// `quiet` suppresses informational messages and progress bars.
    pub fn new(quiet: bool) -> Self {
        Ui {
            quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Whether progress bars are shown (a terminal, not quiet); the demo's live lines.
    #[cfg(feature = "server")]
    pub fn shows_progress(&self) -> bool {
        self.tty && !self.quiet
    }

    /// Whether only errors are printed.
    #[cfg(feature = "server")]
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// An informational line on stderr, unless quiet.
    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            // Messages quote release names and paths: never a raw terminal escape.
            errln!("{}", escape(&msg.to_string()));
        }
    }

    /// A byte progress bar on stderr, shown only on a TTY, never when quiet or when
    /// `json` output was asked for. Otherwise a hidden bar that costs nothing.
    pub fn progress(&self, total_bytes: u64, what: &str, json: bool) -> ProgressBar {
        if self.quiet || json || !self.tty {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total_bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}
