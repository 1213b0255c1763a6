//! Reading a layer index back: the header, the body's digest, and every record's references,
//! so that nothing the accessors index can be out of bounds.

use std::ops::Range;

use streamsnap_format::Digest;

use super::{
    CHILD_LEN, CHUNK_LEN, EXTENT_LEN, HEADER_LEN, Kind, LayerIndex, MAGIC, NODE_LEN, XATTR_LEN,
    digest_at, header, u32_at, u64_at,
};

/// Why saved index bytes cannot be used (the layer's TOC can rebuild them).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not a layer index of this version (magic {found:?})")]
    Magic { found: Vec<u8> },
    #[error("index of {len} bytes, its header says {expected}")]
    Length { len: usize, expected: u128 },
    #[error("index content does not match its digest (damaged)")]
    Digest,
    #[error("index was built from TOC {found}, not {expected}")]
    OtherToc { found: Digest, expected: Digest },
    #[error("index was built with implied directories of mode {found:o}, not {expected:o}")]
    Options { found: u32, expected: u32 },
    #[error("index record {section}[{index}] is inconsistent: {reason}")]
    Record {
        section: &'static str,
        index: usize,
        reason: &'static str,
    },
}

/// What a saved index must match to be used.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expect {
    pub(crate) toc_digest: Digest,
    pub(crate) default_dir_mode: u32,
}

fn within(range: Range<u64>, limit: u64) -> bool {
    range.start <= range.end && range.end <= limit
}

impl LayerIndex {
    /// Reads saved index bytes: refused unless they are an index of this layout whose body
    /// matches its digest, built from the TOC of digest `toc_digest` with implied directories
    /// of mode `default_dir_mode`, and whose every record stays inside its sections.
    pub fn from_bytes(
        bytes: Vec<u8>,
        toc_digest: Digest,
        default_dir_mode: u32,
    ) -> Result<Self, IndexError> {
        let index = Self::parse(bytes.into_boxed_slice(), true)?;
        index.expect(Expect {
            toc_digest,
            default_dir_mode,
        })?;
        Ok(index)
    }

    pub(crate) fn expect(&self, expect: Expect) -> Result<(), IndexError> {
        if self.toc_digest() != expect.toc_digest {
            return Err(IndexError::OtherToc {
                found: self.toc_digest(),
                expected: expect.toc_digest,
            });
        }
        if self.default_dir_mode() != expect.default_dir_mode {
            return Err(IndexError::Options {
                found: self.default_dir_mode(),
                expected: expect.default_dir_mode,
            });
        }
        Ok(())
    }

    /// Splits `bytes` into sections and checks every reference; `verify`: the body's digest
    /// too (a freshly built index has just been digested).
    pub(crate) fn parse(bytes: Box<[u8]>, verify: bool) -> Result<Self, IndexError> {
        if bytes.len() < HEADER_LEN || bytes[header::MAGIC..header::MAGIC + 8] != MAGIC {
            return Err(IndexError::Magic {
                found: bytes.iter().take(8).copied().collect(),
            });
        }
        let count = |field| u128::from(u32_at(&bytes, field));
        let sizes = [
            count(header::NODES) * NODE_LEN as u128,
            count(header::CHILDREN) * CHILD_LEN as u128,
            count(header::EXTENTS) * EXTENT_LEN as u128,
            count(header::CHUNKS) * CHUNK_LEN as u128,
            count(header::XATTRS) * XATTR_LEN as u128,
            u128::from(u64_at(&bytes, header::STRINGS)),
        ];
        let expected = HEADER_LEN as u128 + sizes.iter().sum::<u128>();
        if expected != bytes.len() as u128 {
            return Err(IndexError::Length {
                len: bytes.len(),
                expected,
            });
        }
        if verify && Digest::sha256(&bytes[HEADER_LEN..]) != digest_at(&bytes, header::BODY_DIGEST)
        {
            return Err(IndexError::Digest);
        }
        let mut at = HEADER_LEN;
        let mut sections = sizes.map(|size| {
            let range = at..at + size as usize;
            at = range.end;
            range
        });
        let take = |i: usize, sections: &mut [Range<usize>; 6]| std::mem::take(&mut sections[i]);
        let index = Self {
            nodes: take(0, &mut sections),
            children: take(1, &mut sections),
            extents: take(2, &mut sections),
            chunks: take(3, &mut sections),
            xattrs: take(4, &mut sections),
            strings: take(5, &mut sections),
            bytes,
        };
        index.check_records()?;
        Ok(index)
    }

    fn check_records(&self) -> Result<(), IndexError> {
        use crate::index::ChunkTable as _;
        let nodes = self.node_count() as u64;
        let children = (self.children.len() / CHILD_LEN) as u64;
        let extents = (self.extents.len() / EXTENT_LEN) as u64;
        let strings = self.strings.len() as u64;
        let is_ino = |ino: u64| (1..=nodes).contains(&ino);
        for i in 0..nodes as usize {
            let bad = |reason| IndexError::Record {
                section: "nodes",
                index: i,
                reason,
            };
            let at = self.nodes.start + i * NODE_LEN;
            let record = &self.bytes[at..at + NODE_LEN];
            let kind = Kind::from_u8(record[0]).ok_or(bad("unknown kind"))?;
            let (a, b, x) = (
                u64::from(u32_at(record, 28)),
                u64::from(u32_at(record, 32)),
                u64_at(record, 36),
            );
            let ok = match kind {
                Kind::Dir => is_ino(a) && within(b..b.saturating_add(x), children),
                Kind::Regular => within(a..a + b, extents),
                Kind::Symlink => within(a..a + b, strings) && x == b,
                _ => true,
            };
            if !ok {
                return Err(bad("a reference is out of range"));
            }
            if i == 0 && kind != Kind::Dir {
                return Err(bad("the root is not a directory"));
            }
        }
        if nodes == 0 {
            return Err(IndexError::Record {
                section: "nodes",
                index: 0,
                reason: "no root",
            });
        }
        for i in 0..children as usize {
            let at = self.children.start + i * CHILD_LEN;
            let record = &self.bytes[at..at + CHILD_LEN];
            let start = u64::from(u32_at(record, 4));
            let len = u64::from(record[8]);
            if !is_ino(u64::from(u32_at(record, 0)))
                || len == 0
                || !within(start..start + len, strings)
            {
                return Err(IndexError::Record {
                    section: "children",
                    index: i,
                    reason: "inode or name out of range",
                });
            }
        }
        for i in 0..extents as usize {
            let at = self.extents.start + i * EXTENT_LEN;
            let record = &self.bytes[at..at + EXTENT_LEN];
            let chunk = self.chunk(u32_at(record, 0));
            let end = u64::from(u32_at(record, 4)) + u64::from(u32_at(record, 8));
            if chunk.is_none_or(|c| end > u64::from(c.size)) {
                return Err(IndexError::Record {
                    section: "extents",
                    index: i,
                    reason: "outside its chunk",
                });
            }
        }
        let mut previous = 0;
        for i in 0..self.xattr_count() {
            let record = self.xattr_record(i);
            let ino = u64::from(u32_at(record, 0));
            let name = u64::from(u32_at(record, 4));
            let name_len = u64::from(record[8]);
            let value = u64::from(u32_at(record, 9));
            let value_len = u64::from(u32_at(record, 13));
            let ok = is_ino(ino)
                && ino >= previous
                && within(name..name + name_len, strings)
                && within(value..value + value_len, strings);
            if !ok {
                return Err(IndexError::Record {
                    section: "xattrs",
                    index: i,
                    reason: "inode out of order or name or value out of range",
                });
            }
            previous = ino;
        }
        Ok(())
    }
}
