//! A decompression bomb is refused as soon as the layer passes the size limit, not after it was
//! decompressed whole: a gzip'd tar of 128 files of 2 MiB of zeros (about 250 KiB) with a
//! 4 MiB limit.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use streamsnap_convert::{ConvertOptions, Error, LayerSource, convert_layer};
use streamsnap_format::Digest;
use streamsnap_format::media::LayerCompression;

/// A tar of files of 2 MiB of zeros, `len` bytes in all, gzip'd as it is written (never held
/// whole). Each file is below the limit; together they are far above it.
fn gzip_of_zeros(len: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    let block = vec![0u8; 2 << 20];
    for i in 0..len / block.len() {
        let mut header = tar::Header::new_ustar();
        header.set_path(format!("f{i}")).unwrap();
        header.set_size(block.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        encoder.write_all(header.as_bytes()).unwrap();
        encoder.write_all(&block).unwrap();
    }
    encoder.write_all(&[0u8; 1024]).unwrap();
    encoder.finish().unwrap()
}

/// Counts the compressed bytes the converter reads.
struct Counted<'a>(&'a [u8], &'a AtomicU64);

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn a_bomb_is_refused_at_the_limit_not_after_decompressing_it() {
    let bomb = gzip_of_zeros(256 << 20);
    let read = AtomicU64::new(0);
    let options = ConvertOptions {
        max_layer_size: 4 << 20,
        ..ConvertOptions::default()
    };
    let source = LayerSource {
        digest: Digest::sha256(&bomb),
        compression: LayerCompression::Gzip,
        diff_id: Digest::sha256(b"unknown"),
    };
    let result = convert_layer(
        Counted(&bomb, &read),
        &source,
        &options,
        std::io::sink(),
        &|_| {},
    );
    assert!(
        matches!(result, Err(Error::LayerTooLarge { .. })),
        "{result:?}"
    );
    let read = read.load(Ordering::Relaxed) as usize;
    assert!(
        read < bomb.len() / 4,
        "read {read} of {} compressed bytes before refusing",
        bomb.len()
    );
}
