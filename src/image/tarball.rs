//! Tar archives: reading them without trusting them, and telling a plain tar from a `docker save`
//! or OCI-layout tarball.
//!
//! An archive is read through the `tar` crate's iterator; entries are applied by the [`Stager`],
//! never by the crate's `unpack`. Before an archive's entries are applied, a raw pass over its
//! headers bounds what the `tar` crate would hold in memory (GNU long names, pax headers) and what
//! the entries declare, so a small gzip stream cannot make ember read or allocate without end.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{Archive, EntryType};

use super::stage::{self, Stager};
use super::{shown, ImageError, Limits};

/// Bytes of an archive: borrowed, owned, or a file of known length.
pub(crate) enum Backing<'a> {
    Slice(&'a [u8]),
    Owned(Vec<u8>),
    File(File, u64),
}

impl Backing<'_> {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Backing::Slice(s) => s.len() as u64,
            Backing::Owned(v) => v.len() as u64,
            Backing::File(_, n) => *n,
        }
    }

    /// A reader of `len` bytes from `start` (its own offsets start at 0), seekable.
    pub(crate) fn range(&self, start: u64, len: u64) -> RangeReader<'_> {
        let end = start.saturating_add(len).min(self.len());
        RangeReader { backing: self, start: start.min(end), pos: 0, end }
    }

    pub(crate) fn all(&self) -> RangeReader<'_> {
        self.range(0, self.len())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let s: &[u8] = match self {
            Backing::Slice(s) => s,
            Backing::Owned(v) => v,
            Backing::File(f, _) => return f.read_at(buf, at),
        };
        let at = usize::try_from(at).unwrap_or(usize::MAX).min(s.len());
        let n = buf.len().min(s.len() - at);
        buf[..n].copy_from_slice(&s[at..at + n]);
        Ok(n)
    }
}

/// A window of a [`Backing`], read with positioned reads (no shared file offset).
pub(crate) struct RangeReader<'a> {
    backing: &'a Backing<'a>,
    start: u64,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = (self.end - self.start).saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.backing.read_at(&mut buf[..want], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = (self.end - self.start) as i128;
        let new = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => len + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = u64::try_from(new).unwrap_or(u64::MAX);
        Ok(self.pos)
    }
}

/// Where a decompressed outer archive goes: memory, or a new file in a scratch directory.
pub(crate) enum Scratch<'p> {
    Memory,
    Dir(&'p Path),
}

pub(crate) fn is_gzip(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b])
}

pub(crate) fn is_zstd(head: &[u8]) -> bool {
    head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

fn tar_err(what: &str) -> impl Fn(io::Error) -> ImageError + '_ {
    move |e| ImageError::malformed(what, e)
}

/// Checks an archive's raw headers (data skipped) against the limits: long-name and pax headers
/// (which the `tar` crate reads into memory) stay small, entries are counted, and the declared
/// data stays within the byte limit.
pub(crate) fn check_headers<R: Read + Seek>(mut archive: Archive<R>, limits: &Limits) -> Result<(), ImageError> {
    // An outer archive may be a tarball of blobs: its data is capped like an archive's.
    let entries = archive.entries_with_seek().map_err(tar_err("tar archive"))?;
    check_entries(entries, limits, ("archive size", limits.max_archive_bytes))
}

/// [`check_headers`] for a stream that cannot seek.
pub(crate) fn check_stream_headers<R: Read>(mut archive: Archive<R>, limits: &Limits) -> Result<(), ImageError> {
    let entries = archive.entries().map_err(tar_err("tar archive"))?;
    check_entries(entries, limits, ("total extracted bytes", limits.max_total_bytes))
}

fn check_entries<R: Read>(
    entries: tar::Entries<'_, R>,
    limits: &Limits,
    (what, max_data): (&'static str, u64),
) -> Result<(), ImageError> {
    // Every member may come with a long name, a long link name and a pax header.
    let max_raw = limits.max_entries.saturating_mul(4).saturating_add(16);
    let (mut n, mut data) = (0u64, 0u64);
    for e in entries.raw(true) {
        let e = e.map_err(tar_err("tar archive"))?;
        n += 1;
        if n > max_raw {
            return Err(ImageError::Limit { what: "entries", limit: limits.max_entries });
        }
        let t = e.header().entry_type();
        let size = e.header().entry_size().map_err(tar_err("tar header"))?;
        if t.is_gnu_sparse() && e.header().as_gnu().is_some_and(|g| g.is_extended()) {
            // Its extra sparse headers would be read as members here.
            return Err(ImageError::Unsupported(
                "GNU sparse files with more than 4 holes (re-create the tar without -S)".into(),
            ));
        }
        if t.is_gnu_longname() || t.is_gnu_longlink() {
            if size > limits.max_path_len as u64 + 1 {
                return Err(ImageError::Limit { what: "path length", limit: limits.max_path_len as u64 });
            }
        } else if t.is_pax_local_extensions() || t.is_pax_global_extensions() {
            if size > limits.max_json_bytes {
                return Err(ImageError::Limit { what: "pax header size", limit: limits.max_json_bytes });
            }
        } else {
            data = data.saturating_add(size);
            if data > max_data {
                return Err(ImageError::Limit { what, limit: max_data });
            }
        }
    }
    Ok(())
}

/// Applies one tar stream (already checked by [`check_headers`]) as one layer; with `layered`,
/// `.wh.` entries are whiteouts rather than files.
pub(crate) fn apply_tar<R: Read>(reader: R, stager: &mut Stager<'_>, layered: bool) -> Result<(), ImageError> {
    let mut archive = Archive::new(reader);
    stager.begin_layer();
    for e in archive.entries().map_err(tar_err("tar archive"))? {
        let mut e = e.map_err(tar_err("tar archive"))?;
        stager.count_entry()?;
        let raw = e.path_bytes().into_owned();
        let rel = stager.rel_path(&raw)?;
        let kind = e.header().entry_type();
        if layered {
            if let (Some(name), Some(dir)) = (rel.file_name(), rel.parent()) {
                let name = name.as_bytes();
                if name == b".wh..wh..opq" {
                    stager.opaque(dir)?;
                    continue;
                }
                if let Some(hidden) = name.strip_prefix(b".wh.") {
                    // Other `.wh..wh.` names are aufs bookkeeping, not content.
                    if !hidden.starts_with(b".wh.") {
                        stager.whiteout(dir, hidden)?;
                    }
                    continue;
                }
            }
        }
        let mode = || e.header().mode().map_err(|err| ImageError::malformed(format!("tar entry {}", shown(&raw)), err));
        match kind {
            // Old archives mark directories as regular files whose names end in a slash.
            EntryType::Regular if raw.ends_with(b"/") => stager.put_dir(&rel, mode()?)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mode = mode()?;
                stager.put_file(&rel, mode, &mut e)?
            }
            EntryType::Directory => stager.put_dir(&rel, mode()?)?,
            EntryType::Symlink => {
                let target = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                stager.put_symlink(&rel, &target)?
            }
            EntryType::Link => {
                let target = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let target = stager.rel_path(&target)?;
                stager.put_hardlink(&rel, &target)?
            }
            EntryType::Char | EntryType::Block => {
                return Err(ImageError::refused(shown(&raw), "device nodes are not allowed in an image"))
            }
            EntryType::Fifo => return Err(ImageError::refused(shown(&raw), "fifos are not allowed in an image")),
            EntryType::XGlobalHeader => {}
            other => {
                return Err(ImageError::refused(
                    shown(&raw),
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ))
            }
        }
    }
    Ok(())
}

/// What an archive holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A root file system tree.
    Plain,
    /// A `docker save` tarball (a top-level `manifest.json`).
    Docker,
    /// An OCI image layout (`oci-layout` and `index.json`).
    Oci,
}

/// A member of an outer archive, by its normalized path.
enum Member {
    File { offset: u64, len: u64 },
    Symlink(Vec<u8>),
    Hardlink(PathBuf),
    Other,
}

/// The members of an uncompressed archive, for reading a layout's blobs in place.
pub(crate) struct Members<'b> {
    pub(crate) backing: &'b Backing<'b>,
    map: HashMap<PathBuf, Member>,
}

impl<'b> Members<'b> {
    /// Names that tell an archive's [`Kind`].
    const LAYOUT_FILES: [&'static str; 3] = ["oci-layout", "index.json", "manifest.json"];

    /// Indexes `backing` (an uncompressed tar whose headers [`check_headers`] passed): every
    /// member when `all`, else only the top-level files that tell its [`Kind`].
    pub(crate) fn index(backing: &'b Backing<'b>, limits: &Limits, all: bool) -> Result<Self, ImageError> {
        let mut archive = Archive::new(backing.all());
        let mut map = HashMap::new();
        for e in archive.entries_with_seek().map_err(tar_err("tar archive"))? {
            let e = e.map_err(tar_err("tar archive"))?;
            let rel = stage::rel_path(&e.path_bytes(), limits)?;
            if !all && !Self::LAYOUT_FILES.iter().any(|n| rel == Path::new(n)) {
                continue;
            }
            let member = match e.header().entry_type() {
                EntryType::Regular | EntryType::Continuous => {
                    Member::File { offset: e.raw_file_position(), len: e.size() }
                }
                EntryType::Symlink => Member::Symlink(e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default()),
                EntryType::Link => {
                    let target = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                    Member::Hardlink(stage::rel_path(&target, limits)?)
                }
                _ => Member::Other,
            };
            if map.len() as u64 >= limits.max_entries {
                return Err(ImageError::Limit { what: "entries", limit: limits.max_entries });
            }
            map.insert(rel, member);
        }
        Ok(Members { backing, map })
    }

    pub(crate) fn kind(&self) -> Kind {
        let has = |n: &str| matches!(self.map.get(Path::new(n)), Some(Member::File { .. }));
        if has("oci-layout") && has("index.json") {
            Kind::Oci
        } else if has("manifest.json") {
            Kind::Docker
        } else {
            Kind::Plain
        }
    }

    /// The file at `rel`, through hard links and symlinks (resolved lexically inside the archive).
    pub(crate) fn resolve(&self, rel: &Path) -> Option<(u64, u64)> {
        let mut cur = rel.to_path_buf();
        for _ in 0..40 {
            match self.map.get(&cur)? {
                Member::File { offset, len } => return Some((*offset, *len)),
                Member::Hardlink(t) => cur = t.clone(),
                Member::Symlink(t) => {
                    let mut next = if t.starts_with(b"/") { PathBuf::new() } else { cur.parent()?.to_path_buf() };
                    for c in t.split(|&b| b == b'/') {
                        match c {
                            b"" | b"." => {}
                            b".." => {
                                if !next.pop() {
                                    return None;
                                }
                            }
                            c => next.push(std::ffi::OsStr::from_bytes(c)),
                        }
                    }
                    cur = next;
                }
                Member::Other => return None,
            }
        }
        None
    }
}

/// Decompresses a gzip archive into memory or a scratch file, up to `max_archive_bytes`.
pub(crate) fn gunzip<'s>(src: &Backing<'_>, scratch: &Scratch<'_>, limits: &Limits) -> Result<Backing<'s>, ImageError> {
    let max = limits.max_archive_bytes;
    let mut gz = flate2::read::GzDecoder::new(BufReader::new(src.all())).take(max.saturating_add(1));
    let too_big = ImageError::Limit { what: "archive size", limit: max };
    match scratch {
        Scratch::Memory => {
            let mut v = Vec::new();
            gz.read_to_end(&mut v).map_err(tar_err("gzip stream"))?;
            if v.len() as u64 > max {
                return Err(too_big);
            }
            Ok(Backing::Owned(v))
        }
        Scratch::Dir(dir) => {
            let path = dir.join("archive.tar");
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| ImageError::io(path.display(), e))?;
            let n = io::copy(&mut gz, &mut f).map_err(|e| match e.kind() {
                io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                    ImageError::malformed("gzip stream", e)
                }
                _ => ImageError::io(path.display(), e),
            })?;
            if n > max {
                return Err(too_big);
            }
            Ok(Backing::File(f, n))
        }
    }
}

/// The first (up to 4) bytes of a buffered reader, not consumed.
pub(crate) fn peek<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let buf = r.fill_buf()?;
    Ok(buf[..buf.len().min(4)].to_vec())
}
