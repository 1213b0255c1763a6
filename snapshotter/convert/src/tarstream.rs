//! Reading a layer's tar stream: extension headers (PAX, GNU long names) applied by hand, with
//! bounded memory and a PAX record parser that follows the record lengths.
//!
//! The `tar` crate is used in raw mode for block framing only: its PAX parser splits records on
//! newlines, which breaks binary xattr values (a capability set can contain 0x0a), and it reads
//! extension headers of any claimed size into memory.

use std::io::{self, Read};

use crate::error::Error;

/// Largest PAX extended header accepted (xattrs included).
const MAX_PAX_HEADER: u64 = 4 << 20;
/// Largest GNU long name or long link accepted.
const MAX_LONG_NAME: u64 = 64 << 10;

/// A tar member with its extension headers applied.
#[derive(Debug)]
pub(crate) struct Member {
    /// Name: PAX `path`, else GNU long name, else the header's (prefix + name).
    pub path: Vec<u8>,
    /// Link target: PAX `linkpath`, else GNU long link, else the header's.
    pub link: Vec<u8>,
    /// PAX records other than path and linkpath, in order.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Extension headers seen since the last member.
#[derive(Default)]
pub(crate) struct Pending {
    pax: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Pending {
    /// Consumes `entry` if it is an extension header (returns true), or applies what was
    /// pending to it and returns the member (false).
    pub fn absorb<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> io::Result<Option<Member>> {
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::XHeader => {
                let data = read_bounded(entry, MAX_PAX_HEADER, "PAX extended header")?;
                if self.pax.replace(parse_pax_records(&data)?).is_some() {
                    return Err(invalid("two PAX extended headers for one member"));
                }
                Ok(None)
            }
            tar::EntryType::XGlobalHeader => {
                read_bounded(entry, MAX_PAX_HEADER, "PAX global header")?;
                Ok(None)
            }
            tar::EntryType::GNULongName => {
                let name = read_bounded(entry, MAX_LONG_NAME, "GNU long name")?;
                if self.long_name.replace(trim_nuls(name)).is_some() {
                    return Err(invalid("two GNU long names for one member"));
                }
                Ok(None)
            }
            tar::EntryType::GNULongLink => {
                let name = read_bounded(entry, MAX_LONG_NAME, "GNU long link")?;
                if self.long_link.replace(trim_nuls(name)).is_some() {
                    return Err(invalid("two GNU long links for one member"));
                }
                Ok(None)
            }
            _ => {
                let mut path = self
                    .long_name
                    .take()
                    .unwrap_or_else(|| entry.path_bytes().into_owned());
                let mut link = self
                    .long_link
                    .take()
                    .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()))
                    .unwrap_or_default();
                let mut pax = Vec::new();
                for (key, value) in self.pax.take().unwrap_or_default() {
                    match key.as_slice() {
                        b"path" => path = value,
                        b"linkpath" => link = value,
                        b"size" => {
                            let size = parse_decimal(&value)
                                .ok_or_else(|| invalid("malformed PAX size"))?;
                            if size != entry.header().entry_size()? {
                                return Err(unsupported(
                                    "a PAX size that differs from the header size",
                                ));
                            }
                        }
                        k if k.starts_with(b"GNU.sparse.") => {
                            return Err(unsupported("GNU sparse files"));
                        }
                        _ => pax.push((key, value)),
                    }
                }
                Ok(Some(Member { path, link, pax }))
            }
        }
    }

    /// Fails if extension headers were left without a member at the end of the archive.
    pub fn finish(self) -> io::Result<()> {
        if self.pax.is_some() || self.long_name.is_some() || self.long_link.is_some() {
            return Err(invalid(
                "extension headers at the end of the archive describe no member",
            ));
        }
        Ok(())
    }
}

/// Parses PAX records `"<len> <key>=<value>\n"`, where `len` counts the whole record, so values
/// may hold any byte, newlines included.
pub(crate) fn parse_pax_records(mut data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut records = Vec::new();
    // Some writers pad the header's data with NULs.
    while let Some((&first, _)) = data.split_first() {
        if first == 0 {
            break;
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| invalid("PAX record without a length"))?;
        let len =
            parse_decimal(&data[..space]).ok_or_else(|| invalid("malformed PAX record length"))?;
        let len = usize::try_from(len).map_err(|_| invalid("PAX record length overflows"))?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(invalid("PAX record length does not match its content"));
        }
        let body = &data[space + 1..len - 1];
        let equals = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| invalid("PAX record without '='"))?;
        records.push((body[..equals].to_vec(), body[equals + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn read_bounded<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    limit: u64,
    what: &str,
) -> io::Result<Vec<u8>> {
    if entry.size() > limit {
        return Err(invalid(&format!(
            "{what} of {} bytes exceeds the limit of {limit}",
            entry.size()
        )));
    }
    let mut data = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut data)?;
    Ok(data)
}

fn trim_nuls(mut name: Vec<u8>) -> Vec<u8> {
    while name.last() == Some(&0) {
        name.pop();
    }
    name
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} are not supported"),
    )
}

/// The error for a member-level problem, with its layer.
pub(crate) fn corrupt(layer: streamsnap_format::Digest) -> impl Fn(io::Error) -> Error {
    move |source| Error::CorruptLayer {
        digest: layer,
        source,
    }
}

#[cfg(test)]
#[path = "tarstream_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_values_may_contain_newlines_and_equals() {
        let value = [0u8, 1, b'\n', b'=', 0xff];
        let record_body = [b"SCHILY.xattr.user.bin=".as_slice(), &value].concat();
        // len counts itself: "NN " + body + "\n"
        let len = record_body.len() + 1 + 3;
        let data = [
            format!("{len} ").as_bytes(),
            &record_body,
            b"\n",
            b"11 path=ab\n",
            &[0u8; 5],
        ]
        .concat();
        let records = parse_pax_records(&data).unwrap();
        assert_eq!(
            records,
            vec![
                (b"SCHILY.xattr.user.bin".to_vec(), value.to_vec()),
                (b"path".to_vec(), b"ab".to_vec())
            ]
        );
    }

    #[test]
    fn malformed_pax_records_are_refused() {
        for bad in [
            &b"5 a=b\n"[..],
            b"99 path=x\n",
            b"x path=x\n",
            b"9 pathx\n\n",
            b"11 path=abc",
        ] {
            assert!(
                parse_pax_records(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
