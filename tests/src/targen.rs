//! Layer tars built entry by entry, with full control over the headers: modes, owners, mtimes,
//! xattrs (PAX `SCHILY.xattr.*`), long names (PAX `path`/`linkpath` or GNU `././@LongLink`),
//! devices, whiteouts, and raw entries for hostile input. Names are written as given: no `./`
//! prefix is added, nothing is normalized or validated.
//!
//! Writing to memory cannot fail; the builder methods panic on input a tar header cannot hold
//! (e.g. a user name over 32 bytes), which is a bug in the test.

use std::fmt;

use tar::{EntryType, Header};

/// mtime of entries whose options do not set one (2023-11-14).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;
/// Longest name or link target a ustar/GNU header holds without an extension.
const NAME_FIELD: usize = 100;
const BLOCK: usize = 512;

/// Metadata of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryOpts {
    /// Permission bits, including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub uname: String,
    pub gname: String,
    /// Extended attributes (`user.x`, `security.capability`, ...), written as PAX
    /// `SCHILY.xattr.<name>` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Default for EntryOpts {
    fn default() -> Self {
        Self::mode(0o644)
    }
}

impl EntryOpts {
    /// Owned by root, [`DEFAULT_MTIME`], no xattrs.
    pub fn mode(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            uname: String::new(),
            gname: String::new(),
            xattrs: Vec::new(),
        }
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn names(mut self, uname: &str, gname: &str) -> Self {
        self.uname = uname.to_owned();
        self.gname = gname.to_owned();
        self
    }

    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_owned(), value.to_vec()));
        self
    }
}

/// How names and link targets over 100 bytes are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongNames {
    /// A PAX extended header with `path` / `linkpath` (what Go and modern tools write).
    Pax,
    /// A GNU `././@LongLink` entry of type `L` / `K` before the entry (GNU tar's default).
    Gnu,
}

/// A tar archive under construction. See the module doc.
pub struct TarGen {
    builder: tar::Builder<Vec<u8>>,
    long_names: LongNames,
    entries: usize,
}

impl fmt::Debug for TarGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TarGen")
            .field("entries", &self.entries)
            .field("long_names", &self.long_names)
            .field("bytes", &self.builder.get_ref().len())
            .finish()
    }
}

impl Default for TarGen {
    fn default() -> Self {
        Self::new()
    }
}

impl TarGen {
    /// An empty archive writing long names as PAX records.
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            long_names: LongNames::Pax,
            entries: 0,
        }
    }

    /// How the following entries write long names.
    pub fn long_names(&mut self, how: LongNames) -> &mut Self {
        self.long_names = how;
        self
    }

    /// A directory; a `/` is appended to the name unless it ends with one.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.dir_with(path, EntryOpts::mode(mode))
    }

    pub fn dir_with(&mut self, path: &str, opts: EntryOpts) -> &mut Self {
        let name = if path.ends_with('/') {
            path.to_owned()
        } else {
            format!("{path}/")
        };
        self.entry(
            name.as_bytes(),
            EntryType::Directory,
            &opts,
            None,
            None,
            &[],
        )
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_with(path, EntryOpts::mode(mode), data)
    }

    pub fn file_with(&mut self, path: &str, opts: EntryOpts, data: &[u8]) -> &mut Self {
        self.entry(path.as_bytes(), EntryType::Regular, &opts, None, None, data)
    }

    /// A symlink (mode 0777) to `target`, written as is (relative, absolute or dangling).
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let opts = EntryOpts::mode(0o777);
        let target = Some(target.as_bytes());
        self.entry(
            path.as_bytes(),
            EntryType::Symlink,
            &opts,
            target,
            None,
            &[],
        )
    }

    /// A hard link to `target`, an earlier entry's name in this archive (not a path relative to
    /// the link).
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let opts = EntryOpts::mode(0o644);
        let target = Some(target.as_bytes());
        self.entry(path.as_bytes(), EntryType::Link, &opts, target, None, &[])
    }

    /// A character device (mode 0666).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let opts = EntryOpts::mode(0o666);
        let dev = Some((major, minor));
        self.entry(path.as_bytes(), EntryType::Char, &opts, None, dev, &[])
    }

    /// A block device (mode 0660).
    pub fn block_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let opts = EntryOpts::mode(0o660);
        let dev = Some((major, minor));
        self.entry(path.as_bytes(), EntryType::Block, &opts, None, dev, &[])
    }

    /// A named pipe (mode 0644).
    pub fn fifo(&mut self, path: &str) -> &mut Self {
        let opts = EntryOpts::mode(0o644);
        self.entry(path.as_bytes(), EntryType::Fifo, &opts, None, None, &[])
    }

    /// The whiteout `dir/.wh.name`: deletes `dir/name` of the layers below. `dir` may be `""`
    /// for the root.
    pub fn whiteout(&mut self, dir: &str, name: &str) -> &mut Self {
        self.file(&join(dir, &format!(".wh.{name}")), 0o644, &[])
    }

    /// The opaque marker `dir/.wh..wh..opq`: hides everything below `dir` in lower layers.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&join(dir, ".wh..wh..opq"), 0o644, &[])
    }

    /// Escape hatch for hostile input: a ustar header named `name` (raw bytes, truncated to 100;
    /// e.g. `../escape`, `/abs`, invalid UTF-8) of type `kind` whose size field says `size_field`,
    /// followed by `data` padded to a block. If `size_field` differs from `data.len()` the
    /// archive is deliberately inconsistent from here on (a reader consumes the following bytes
    /// as this entry's data, or hits EOF).
    pub fn raw_entry(
        &mut self,
        name: &[u8],
        kind: EntryType,
        size_field: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut header = Header::new_ustar();
        set_field(&mut header.as_old_mut().name, name);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_mtime(DEFAULT_MTIME);
        header.set_size(size_field);
        header.set_cksum();
        self.raw(&header, data)
    }

    /// Appends `header` exactly as given (checksum included) followed by `data` padded to a
    /// block. Nothing is checked.
    pub fn raw(&mut self, header: &Header, data: &[u8]) -> &mut Self {
        let out = self.builder.get_mut();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
        self.entries += 1;
        self
    }

    /// A PAX extended header applying to the next entry, with arbitrary records (e.g. a hostile
    /// `path=../x`).
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .expect("writing a tar to memory cannot fail");
        self
    }

    /// The archive, with its two terminating zero blocks.
    pub fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder
            .into_inner()
            .expect("writing a tar to memory cannot fail")
    }

    fn entry(
        &mut self,
        name: &[u8],
        kind: EntryType,
        opts: &EntryOpts,
        link: Option<&[u8]>,
        device: Option<(u32, u32)>,
        data: &[u8],
    ) -> &mut Self {
        let mut pax: Vec<(String, Vec<u8>)> = opts
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
            .collect();
        let link = link.unwrap_or_default();
        for (bytes, pax_key, gnu_kind) in [
            (name, "path", EntryType::GNULongName),
            (link, "linkpath", EntryType::GNULongLink),
        ] {
            if bytes.len() <= NAME_FIELD {
                continue;
            }
            match self.long_names {
                LongNames::Pax => pax.push((pax_key.to_owned(), bytes.to_vec())),
                LongNames::Gnu => self.gnu_long(gnu_kind, bytes),
            }
        }
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("writing a tar to memory cannot fail");
        }
        let mut header = match self.long_names {
            LongNames::Pax => Header::new_ustar(),
            LongNames::Gnu => Header::new_gnu(),
        };
        set_field(&mut header.as_old_mut().name, name);
        set_field(&mut header.as_old_mut().linkname, link);
        header.set_entry_type(kind);
        header.set_mode(opts.mode);
        header.set_uid(opts.uid);
        header.set_gid(opts.gid);
        header.set_mtime(opts.mtime);
        header.set_size(data.len() as u64);
        header
            .set_username(&opts.uname)
            .expect("user names fit in 32 bytes");
        header
            .set_groupname(&opts.gname)
            .expect("group names fit in 32 bytes");
        let (major, minor) = device.unwrap_or_default();
        header.set_device_major(major).expect("ustar/gnu header");
        header.set_device_minor(minor).expect("ustar/gnu header");
        header.set_cksum();
        self.builder
            .append(&header, data)
            .expect("writing a tar to memory cannot fail");
        self.entries += 1;
        self
    }

    /// A GNU `././@LongLink` entry holding the next entry's long name or link target.
    fn gnu_long(&mut self, kind: EntryType, value: &[u8]) {
        let mut data = value.to_vec();
        data.push(0);
        let mut header = Header::new_gnu();
        set_field(&mut header.as_old_mut().name, b"././@LongLink");
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder
            .append(&header, data.as_slice())
            .expect("writing a tar to memory cannot fail");
    }
}

/// Copies as much of `value` as fits into a NUL-padded header field.
fn set_field(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

fn join(dir: &str, name: &str) -> String {
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A seeded xorshift64* generator: reproducible, non-repeating test data without a `rand`
/// dependency.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `range` (not perfectly uniform; fine for test data).
    pub fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.next_u64() % (range.end - range.start)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    XorShift::new(seed).fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Path, type, mode, link name and data of an entry.
    type ReadEntry = (String, EntryType, u32, Option<String>, Vec<u8>);

    /// Every entry, read back with the tar crate.
    fn read_back(tar: &[u8]) -> Vec<ReadEntry> {
        let mut archive = tar::Archive::new(tar);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let link = entry
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap());
            let kind = entry.header().entry_type();
            let mode = entry.header().mode().unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.push((path, kind, mode, link, data));
        }
        out
    }

    #[test]
    fn entries_read_back_with_names_modes_links_and_data() {
        let long = format!("d/{}", "n".repeat(150));
        let tar = TarGen::new()
            .dir("d", 0o1777)
            .file("d/f", 0o4755, b"data")
            .symlink("d/s", "/abs/target")
            .hardlink("d/h", "d/f")
            .whiteout("d", "gone")
            .opaque("d")
            .file(&long, 0o644, b"pax")
            .long_names(LongNames::Gnu)
            .symlink(&format!("{long}-gnu"), &long)
            .finish();
        let entries = read_back(&tar);
        let summary: Vec<_> = entries
            .iter()
            .map(|(p, k, m, l, d)| (p.as_str(), *k, *m, l.as_deref(), d.as_slice()))
            .collect();
        let gnu = format!("{long}-gnu");
        assert_eq!(
            summary,
            [
                ("d/", EntryType::Directory, 0o1777, None, &b""[..]),
                ("d/f", EntryType::Regular, 0o4755, None, b"data"),
                ("d/s", EntryType::Symlink, 0o777, Some("/abs/target"), b""),
                ("d/h", EntryType::Link, 0o644, Some("d/f"), b""),
                ("d/.wh.gone", EntryType::Regular, 0o644, None, b""),
                ("d/.wh..wh..opq", EntryType::Regular, 0o644, None, b""),
                (long.as_str(), EntryType::Regular, 0o644, None, b"pax"),
                (
                    gnu.as_str(),
                    EntryType::Symlink,
                    0o777,
                    Some(long.as_str()),
                    b""
                ),
            ]
        );
    }

    #[test]
    fn owners_xattrs_and_devices_are_in_the_headers() {
        let tar = TarGen::new()
            .file_with(
                "f",
                EntryOpts::mode(0o600)
                    .owner(100_000, 1000)
                    .names("u", "g")
                    .mtime(0)
                    .xattr("user.x", &[0, 1, 255]),
                b"",
            )
            .char_device("c", 1, 3)
            .block_device("b", 7, 1)
            .fifo("p")
            .finish();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut entries = archive.entries().unwrap();
        let mut f = entries.next().unwrap().unwrap();
        let xattrs: Vec<(String, Vec<u8>)> = f
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.key().unwrap().to_owned(), e.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            xattrs,
            [("SCHILY.xattr.user.x".to_owned(), vec![0, 1, 255])]
        );
        let h = f.header();
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (100_000, 1000));
        assert_eq!(h.username().unwrap(), Some("u"));
        assert_eq!(h.mtime().unwrap(), 0);
        for (kind, dev) in [
            (EntryType::Char, Some((1, 3))),
            (EntryType::Block, Some((7, 1))),
            (EntryType::Fifo, Some((0, 0))),
        ] {
            let e = entries.next().unwrap().unwrap();
            let h = e.header();
            assert_eq!(h.entry_type(), kind);
            let got = h.device_major().unwrap().zip(h.device_minor().unwrap());
            assert_eq!(got, dev);
        }
    }

    #[test]
    fn raw_entries_keep_hostile_names_and_size_fields() {
        let tar = TarGen::new()
            .raw_entry(b"../escape", EntryType::Regular, 3, b"abc")
            .raw_entry(b"/abs", EntryType::Regular, 0, b"")
            .pax(&[("path", b"../../pax-escape")])
            .file("innocent", 0o644, b"x")
            .finish();
        let names: Vec<String> = read_back(&tar).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["../escape", "/abs", "../../pax-escape"]);

        let absurd = TarGen::new()
            .raw_entry(b"huge", EntryType::Regular, 1 << 40, b"short")
            .finish();
        let mut archive = tar::Archive::new(absurd.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.header().size().unwrap(), 1 << 40);
        let mut data = Vec::new();
        let _ = entry.read_to_end(&mut data);
        assert!(
            data.len() < 1 << 40,
            "the archive ends long before the claimed size"
        );
    }

    #[test]
    fn xorshift_is_seeded_and_does_not_repeat() {
        assert_eq!(pseudo_random_bytes(7, 64), pseudo_random_bytes(7, 64));
        assert_ne!(pseudo_random_bytes(7, 64), pseudo_random_bytes(8, 64));
        let data = pseudo_random_bytes(1, 1 << 20);
        assert_ne!(data[..4096], data[4096..8192]);
        assert_eq!(XorShift::new(0).below(5..6), 5);
    }
}
