//! Counting the bytes a process reads from one file, with `strace`.
//!
//! The delta-install goal is about how much of the *source* (the artifact on a USB
//! stick, a chunk store) the installer reads, not about all its reads (it also reads
//! its active slot). `/proc/<pid>/io` cannot tell files apart, so the bench runs the
//! install once more under `strace -f -y` (every fd printed with its path) and sums
//! the return values of the read-like system calls on the source's fds. That run is
//! not timed. A source that is memory-mapped cannot be counted this way; that is
//! reported as an error rather than as a small number.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};

use crate::measure::Cmd;

/// System calls that read from a file descriptor, and which argument is the fd read from.
const READS: [(&str, usize); 8] = [
    ("read", 0),
    ("pread64", 0),
    ("readv", 0),
    ("preadv", 0),
    ("preadv2", 0),
    ("copy_file_range", 0),
    ("splice", 0),
    ("sendfile", 1),
];

/// `strace` around `cmd`, logging the read-like calls (and `mmap`) to `log`.
pub fn wrap(cmd: &Cmd, log: &Path) -> Cmd {
    let mut trace = READS.map(|(name, _)| name).join(",");
    trace.push_str(",mmap");
    Cmd::new("strace")
        .args(["-f", "-qq", "-y", "-s", "0", "-e"])
        .arg(format!("trace={trace}"))
        .arg("-o")
        .arg(log)
        .arg("--")
        .arg(cmd.program())
        .args(cmd.arguments())
}

/// Sums the bytes returned by read-like calls on any fd whose path is `source`, or,
/// when `source` is a directory, any file under it.
pub fn bytes_read_from(log: &str, source: &str, source_is_dir: bool) -> Result<u64> {
    let matches = |path: &str| {
        if source_is_dir {
            path.strip_prefix(source)
                .is_some_and(|rest| rest.starts_with('/'))
        } else {
            path == source
        }
    };
    // With -f a call can be split: "<pid> read(3</f>, <unfinished ...>" then
    // "<pid> <... read resumed>""..., 4096) = 4096".
    let mut pending: HashMap<&str, Option<&str>> = HashMap::new();
    let mut total = 0u64;
    for line in log.lines() {
        let (pid, call) = match line.split_once(' ') {
            Some((pid, rest)) if pid.bytes().all(|b| b.is_ascii_digit()) => {
                (pid, rest.trim_start())
            }
            _ => ("", line),
        };
        let path = if let Some(rest) = call.strip_prefix("<... ") {
            if !rest.contains(" resumed>") {
                continue;
            }
            match pending.remove(pid) {
                Some(path) => path,
                None => continue,
            }
        } else {
            let Some((name, args)) = call.split_once('(') else {
                continue;
            };
            if name == "mmap" {
                if fd_path(args, 4).is_some_and(matches) {
                    bail!("the source is memory-mapped; its reads cannot be counted with strace");
                }
                continue;
            }
            let Some(&(_, fd_arg)) = READS.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            let path = fd_path(args, fd_arg);
            if call.ends_with("<unfinished ...>") {
                pending.insert(pid, path);
                continue;
            }
            path
        };
        if !path.is_some_and(matches) {
            continue;
        }
        if let Some((_, ret)) = call.rsplit_once(" = ")
            && let Some(n) = ret.split_whitespace().next()
            && let Ok(n) = n.parse::<u64>()
        {
            total += n;
        }
    }
    Ok(total)
}

/// The path strace printed (`-y`) for the fd in argument `index` of `args`.
fn fd_path(args: &str, index: usize) -> Option<&str> {
    let mut rest = args;
    for _ in 0..index {
        // fd arguments print as N<path>; skip whole arguments, paths included.
        let cut = next_arg_end(rest)?;
        rest = rest[cut..].trim_start_matches(',').trim_start();
    }
    let open = rest.find('<')?;
    if !rest[..open].bytes().all(|b| b.is_ascii_digit()) || open == 0 {
        return None;
    }
    let close = rest[open..]
        .find(">,")
        .or_else(|| rest[open..].find(">)"))?;
    Some(&rest[open + 1..open + close])
}

/// Where the first argument of `s` ends (at its top-level comma).
fn next_arg_end(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_path = false;
    for (i, c) in s.char_indices() {
        match c {
            '<' if !in_path => in_path = true,
            '>' if in_path => in_path = false,
            '[' | '{' | '(' if !in_path => depth += 1,
            ']' | '}' | ')' if !in_path => depth -= 1,
            ',' if !in_path && depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"100 read(3</w/v2.shoal>, ""..., 65536) = 65536
100 read(4</w/slot-a.img>, ""..., 65536) = 65536
100 pread64(3</w/v2.shoal>, ""..., 4096, 8192) = 4096
101 read(3</w/v2.shoal>,  <unfinished ...>
100 read(5</w/store/chunks/ab/abcd>, ""..., 100) = 100
101 <... read resumed>""..., 1000) = 1000
100 read(3</w/v2.shoal>, ""..., 65536) = 0
100 read(3</w/v2.shoal>, 0x7f, 65536) = -1 EINTR (Interrupted system call)
100 sendfile(7</w/out>, 3</w/v2.shoal>, NULL, 500) = 500
100 copy_file_range(4</w/slot-a.img>, NULL, 7</w/out>, NULL, 9, 0) = 9
"#;

    #[test]
    fn sums_reads_of_the_source_file_only() {
        assert_eq!(
            bytes_read_from(LOG, "/w/v2.shoal", false).unwrap(),
            65536 + 4096 + 1000 + 500
        );
        assert_eq!(
            bytes_read_from(LOG, "/w/slot-a.img", false).unwrap(),
            65536 + 9
        );
    }

    #[test]
    fn a_directory_source_counts_files_under_it() {
        assert_eq!(bytes_read_from(LOG, "/w/store", true).unwrap(), 100);
        assert_eq!(bytes_read_from(LOG, "/w/sto", true).unwrap(), 0);
    }

    #[test]
    fn a_mapped_source_is_an_error() {
        let log = "100 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, 3</w/v2.shoal>, 0) = 0x7f00\n";
        assert!(bytes_read_from(log, "/w/v2.shoal", false).is_err());
        assert_eq!(bytes_read_from(log, "/w/other", false).unwrap(), 0);
    }
}
