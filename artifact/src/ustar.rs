//! The small subset of POSIX ustar that `.shoal` artifacts use, read strictly.
//!
//! Headers are written and parsed by the `tar` crate's [`tar::Header`]. The member
//! loop does not use `tar::Archive`: an artifact reader must tell a truncated file
//! from a finished one, refuse extension headers (pax, GNU long names) instead of
//! interpreting them, and bound every size before it allocates.

use std::io::{self, Read, Write};

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// A member header, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's path (prefix joined with name).
    pub path: String,
    /// The ustar type flag byte.
    pub kind: u8,
    /// Size of the member's data in bytes.
    pub size: u64,
}

/// A header block that is not a valid ustar header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The checksum does not match.
    Checksum,
    /// No `ustar` magic.
    Magic,
    /// A numeric field is not octal.
    Number(&'static str),
    /// The path is not UTF-8.
    PathEncoding,
    /// The block after the first end-of-archive block is not zero.
    NotEnd,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Checksum => f.write_str("header checksum mismatch"),
            HeaderError::Magic => f.write_str("no ustar magic"),
            HeaderError::Number(field) => write!(f, "field {field} is not an octal number"),
            HeaderError::PathEncoding => f.write_str("path is not UTF-8"),
            HeaderError::NotEnd => f.write_str("the second end-of-archive block is not zero"),
        }
    }
}

/// What one block at a member boundary was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// A member header.
    Member(Member),
    /// An all-zero block: the end of the archive.
    End,
}

/// Parses one header block with the `tar` crate's [`tar::Header`], strictly: the
/// checksum must match and the magic must be ustar (POSIX or GNU).
pub fn parse(block: &[u8; BLOCK]) -> Result<Block, HeaderError> {
    if block.iter().all(|&b| b == 0) {
        return Ok(Block::End);
    }
    let header = tar::Header::from_byte_slice(block);
    let stored = header
        .cksum()
        .map_err(|_| HeaderError::Number("checksum"))?;
    let mut recomputed = header.clone();
    recomputed.set_cksum();
    if recomputed.cksum().ok() != Some(stored) {
        return Err(HeaderError::Checksum);
    }
    if header.as_ustar().is_none() && header.as_gnu().is_none() {
        return Err(HeaderError::Magic);
    }
    let size = header.size().map_err(|_| HeaderError::Number("size"))?;
    let path = String::from_utf8(header.path_bytes().into_owned())
        .map_err(|_| HeaderError::PathEncoding)?;
    Ok(Block::Member(Member {
        path,
        kind: header.entry_type().as_byte(),
        size,
    }))
}

/// Whether a member path could escape the directory it is extracted into.
pub fn is_unsafe_path(path: &str) -> bool {
    path.starts_with('/') || path.split('/').any(|c| c == "..") || path.contains('\\')
}

/// Zero bytes to pad `size` bytes of data to a block boundary.
pub fn padding(size: u64) -> usize {
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 { 0 } else { BLOCK - rem }
}

/// A deterministic header for a regular file member (mode 0644, owner 0, mtime 0).
///
/// The path is written as given (at most 100 bytes): this crate only writes safe
/// paths, and tests need to write unsafe ones to check that readers refuse them.
pub fn header(path: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let name = &mut h.as_old_mut().name;
    assert!(path.len() <= name.len(), "member path {path:?} is too long");
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// Writes one member: header, data, padding. Returns the bytes written.
pub fn write_member<W: Write>(out: &mut W, path: &str, data: &[u8]) -> io::Result<u64> {
    let h = header(path, data.len() as u64);
    out.write_all(h.as_bytes())?;
    out.write_all(data)?;
    let pad = padding(data.len() as u64);
    out.write_all(&[0u8; BLOCK][..pad])?;
    Ok((BLOCK + data.len() + pad) as u64)
}

/// The end-of-archive marker: two zero blocks.
pub fn write_end<W: Write>(out: &mut W) -> io::Result<u64> {
    out.write_all(&[0u8; 2 * BLOCK])?;
    Ok(2 * BLOCK as u64)
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the source ended first (after
/// reading `*got` bytes).
pub fn read_full<R: Read>(src: &mut R, buf: &mut [u8], got: &mut usize) -> io::Result<bool> {
    *got = 0;
    while *got < buf.len() {
        match src.read(&mut buf[*got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => *got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut out = Vec::new();
        write_member(&mut out, "chunks/ab/abcdef", b"hello").unwrap();
        assert_eq!(out.len(), 1024);
        let block: &[u8; BLOCK] = out[..BLOCK].try_into().unwrap();
        assert_eq!(
            parse(block).unwrap(),
            Block::Member(Member {
                path: "chunks/ab/abcdef".into(),
                kind: b'0',
                size: 5
            })
        );
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let h = header("x", 1);
        let mut b = *h.as_bytes();
        b[0] = b'y';
        assert_eq!(parse(&b), Err(HeaderError::Checksum));
        assert_eq!(parse(&[0u8; BLOCK]), Ok(Block::End));
        let mut not_tar = [b'a'; BLOCK];
        not_tar[148..156].copy_from_slice(b"0000000\0");
        assert!(parse(&not_tar).is_err());
    }

    #[test]
    fn unsafe_paths() {
        assert!(is_unsafe_path("/etc/passwd"));
        assert!(is_unsafe_path("chunks/../../x"));
        assert!(is_unsafe_path(".."));
        assert!(!is_unsafe_path("chunks/ab/ab..cd"));
    }
}
