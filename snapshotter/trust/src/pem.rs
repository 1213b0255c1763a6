//! The PEM blocks keys come in: `-----BEGIN LABEL-----`, base64 lines, `-----END LABEL-----`.

use base64::Engine;

use crate::error::{Error, Result};

/// Largest PEM text read (a P-256 key is a few hundred bytes).
const MAX_PEM: usize = 64 << 10;

/// The DER bytes of the first `label` block in `text`.
pub(crate) fn decode(text: &[u8], label: &'static str) -> Result<Vec<u8>> {
    if text.len() > MAX_PEM {
        return Err(Error::Pem { label });
    }
    let text = std::str::from_utf8(text).map_err(|_| Error::Pem { label })?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or(Error::Pem { label })? + begin.len();
    let stop = text[start..].find(&end).ok_or(Error::Pem { label })? + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| Error::PemBase64 { label })
}

/// `der` as a PEM block, lines of 64 characters.
pub(crate) fn encode(der: &[u8], label: &str) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let pem = encode(
            b"some der bytes that span more than one line of sixty-four chars!!",
            "X",
        );
        assert_eq!(
            decode(pem.as_bytes(), "X").unwrap(),
            b"some der bytes that span more than one line of sixty-four chars!!"
        );
        assert!(matches!(
            decode(pem.as_bytes(), "Y"),
            Err(Error::Pem { .. })
        ));
        assert!(decode(b"-----BEGIN X-----\n!!!\n-----END X-----\n", "X").is_err());
        assert!(decode(b"-----BEGIN X-----\nAAAA\n", "X").is_err());
        assert!(decode(&vec![b'A'; MAX_PEM + 1], "X").is_err());
    }
}
