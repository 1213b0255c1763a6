//! Entry paths. A TOC stores every path normalized: relative, '/'-separated, no empty, '.' or
//! '..' components. Anything that could escape the layer root is refused, never rewritten.

use crate::error::{Error, Result};

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component accepted (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

fn invalid(path: &[u8], reason: &'static str) -> Error {
    Error::InvalidPath {
        path: String::from_utf8_lossy(path).chars().take(200).collect(),
        reason,
    }
}

/// Normalizes a tar entry name: drops a leading "./", repeated and trailing slashes and "."
/// components. Refuses absolute paths and ".." components.
pub fn normalize_tar_path(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.first() == Some(&b'/') {
        return Err(invalid(raw, "absolute paths are not allowed in a layer"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err(invalid(raw, "'..' components are not allowed in a layer")),
            name => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(name);
            }
        }
    }
    validate_path(&out).map_err(|_| invalid(raw, "too long or contains NUL"))?;
    Ok(out)
}

/// Checks that `path` is in normalized form (what [`normalize_tar_path`] produces).
pub fn validate_path(path: &[u8]) -> Result<()> {
    if path.len() > MAX_PATH_LEN {
        return Err(invalid(path, "longer than 4096 bytes"));
    }
    if path.contains(&0) {
        return Err(invalid(path, "contains a NUL byte"));
    }
    if path.is_empty() {
        return Ok(());
    }
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" => return Err(invalid(path, "empty component or leading or trailing '/'")),
            b"." | b".." => return Err(invalid(path, "'.' or '..' component")),
            name if name.len() > MAX_NAME_LEN => {
                return Err(invalid(path, "component longer than 255 bytes"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_the_forms_tar_writers_produce() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"./", b""),
            (b".", b""),
            (b"./etc/passwd", b"etc/passwd"),
            (b"usr/bin/", b"usr/bin"),
            (b"a//b/./c", b"a/b/c"),
            ("données/π".as_bytes(), "données/π".as_bytes()),
        ];
        for (raw, want) in cases {
            assert_eq!(
                normalize_tar_path(raw).unwrap(),
                *want,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn refuses_paths_that_escape_the_root() {
        for raw in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/..", b"a\0b"] {
            assert!(
                normalize_tar_path(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn validate_accepts_only_normalized_paths() {
        assert!(validate_path(b"").is_ok());
        assert!(validate_path(b"a/b").is_ok());
        for bad in [&b"/a"[..], b"a/", b"a//b", b"./a", b"a/../b"] {
            assert!(
                validate_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(validate_path(&vec![b'x'; 256]).is_err());
    }
}
