//! Convert -> decode -> compare: every entry read back through the TOC and chunk frames equals
//! the original tar entry, bytes and metadata. The comparison parses the ORIGINAL tar (with the
//! harness's independent reader), not the converter's output.

use std::io::Write;

use streamsnap_convert::{ConvertOptions, Error, LayerSource, convert_layer, index_layer};
use streamsnap_e2e::{diff_views, every_entry_type_layer, tar_views, toc_views, upper_layers};
use streamsnap_format::media::LayerCompression;
use streamsnap_format::{Digest, Toc};

fn every_type_tar() -> Vec<u8> {
    every_entry_type_layer()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn convert(
    compressed: &[u8],
    compression: LayerCompression,
    tar: &[u8],
) -> Result<(Toc, Vec<u8>), Error> {
    let source = LayerSource {
        digest: Digest::sha256(compressed),
        compression,
        diff_id: Digest::sha256(tar),
    };
    let options = ConvertOptions {
        max_chunk_size: 1 << 20,
        ..ConvertOptions::default()
    };
    let mut blob = Vec::new();
    let converted = convert_layer(compressed, &source, &options, &mut blob, &|_| {})?;
    assert_eq!(converted.uncompressed_size, tar.len() as u64);
    Ok((converted.toc, blob))
}

#[test]
fn every_entry_type_round_trips_through_each_compression() {
    let tar = every_type_tar();
    let original = tar_views(&tar).unwrap();
    for (compression, compressed) in [
        (LayerCompression::None, tar.clone()),
        (LayerCompression::Gzip, gzip(&tar)),
        (
            LayerCompression::Zstd,
            zstd::bulk::compress(&tar, 3).unwrap(),
        ),
    ] {
        let (toc, blob) = convert(&compressed, compression, &tar).unwrap();
        let converted = toc_views(&toc, |chunk| {
            Ok(blob[chunk.offset as usize..][..chunk.compressed_size as usize].to_vec())
        })
        .unwrap();
        let differences = diff_views(&converted, &original);
        assert!(differences.is_empty(), "{compression:?}: {differences:#?}");
        assert_eq!(toc.data_digest(), Digest::sha256(&blob));
        // The 8 MiB run of zeros is stored once, not eight times.
        let zero_chunk = Digest::sha256(&vec![0u8; 1 << 20]);
        let zero_chunks = toc
            .chunks()
            .iter()
            .filter(|c| c.sha256 == zero_chunk.as_bytes())
            .count();
        assert_eq!(zero_chunks, 1);
        // 300 small files are packed into a few chunks, not 300.
        assert_eq!(streamsnap_e2e::layers::SMALL_FILES, 300);
        assert!(toc.chunks().len() < 20, "{} chunks", toc.chunks().len());
    }
}

#[test]
fn the_encoded_toc_decodes_to_the_same_table() {
    let tar = every_type_tar();
    let (toc, _) = convert(&tar, LayerCompression::None, &tar).unwrap();
    let decoded = Toc::decode(&streamsnap_format::encode_toc(toc.raw())).unwrap();
    assert_eq!(decoded.raw(), toc.raw());
}

#[test]
fn whiteouts_and_opaque_markers_of_upper_layers_round_trip() {
    for tar in upper_layers() {
        let (toc, blob) = convert(&tar, LayerCompression::None, &tar).unwrap();
        let converted = toc_views(&toc, |chunk| {
            Ok(blob[chunk.offset as usize..][..chunk.compressed_size as usize].to_vec())
        })
        .unwrap();
        let differences = diff_views(&converted, &tar_views(&tar).unwrap());
        assert!(differences.is_empty(), "{differences:#?}");
    }
}

#[test]
fn hostile_layers_are_refused_with_a_clear_error() {
    let traversal = {
        let mut header = tar::Header::new_gnu();
        header.set_size(4);
        header.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..": write the raw name field like a hostile tool would.
        header.as_old_mut().name[..11].copy_from_slice(b"../etc/evil");
        header.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&header, &b"evil"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let err = convert(&traversal, LayerCompression::None, &traversal).unwrap_err();
    assert!(err.to_string().contains("'..'"), "{err}");

    let absolute = {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.as_old_mut().name[..11].copy_from_slice(b"/etc/shadow");
        header.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&header, std::io::empty()).unwrap();
        b.into_inner().unwrap()
    };
    let err = convert(&absolute, LayerCompression::None, &absolute).unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");

    let tar = every_type_tar();
    let mut corrupt = gzip(&tar);
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x55;
    assert!(matches!(
        convert(&corrupt, LayerCompression::Gzip, &tar),
        Err(Error::CorruptLayer { .. } | Error::LayerDigestMismatch { .. })
    ));

    let truncated = &gzip(&tar)[..1000];
    assert!(matches!(
        convert(truncated, LayerCompression::Gzip, &tar),
        Err(Error::CorruptLayer { .. })
    ));

    // A header claiming an absurd size with no data behind it.
    let absurd = {
        let mut header = tar::Header::new_gnu();
        header.set_path("huge").unwrap();
        header.set_size(1 << 50);
        header.set_cksum();
        let mut raw = header.as_bytes().to_vec();
        raw.extend_from_slice(&[0u8; 4096]);
        raw
    };
    let err = convert(&absurd, LayerCompression::None, &absurd).unwrap_err();
    assert!(matches!(err, Error::CorruptLayer { .. }), "{err:?}");

    // Right content, wrong diff ID in the config.
    let source = LayerSource {
        digest: Digest::sha256(&tar),
        compression: LayerCompression::None,
        diff_id: Digest::sha256(b"something else"),
    };
    let err = convert_layer(
        tar.as_slice(),
        &source,
        &ConvertOptions::default(),
        Vec::new(),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err}");
}

/// Reads every entry of an index-kind TOC back from the ORIGINAL gzip blob: each span inflated
/// from its checkpoint (window from the checkpoints blob), as a node does.
fn index_views(
    toc: &Toc,
    layer: &[u8],
    checkpoints: &[u8],
) -> anyhow::Result<Vec<streamsnap_e2e::EntryView>> {
    streamsnap_e2e::toc_views_decoded(toc, |index, chunk| {
        let checkpoint = toc.checkpoint(index).expect("one checkpoint per span");
        let window = match checkpoint.window_size {
            0 => Vec::new(),
            size => streamsnap_format::gzip::decode_window(
                &checkpoints[checkpoint.window_offset as usize..][..size as usize],
            )?,
        };
        let frame = &layer[chunk.offset as usize..][..chunk.compressed_size as usize];
        Ok(streamsnap_format::gzip::decode_span(
            chunk, checkpoint, &window, frame,
        )?)
    })
}

fn index(
    compressed: &[u8],
    compression: LayerCompression,
    tar: &[u8],
    span_size: u32,
) -> Result<(Toc, Vec<u8>), Error> {
    let source = LayerSource {
        digest: Digest::sha256(compressed),
        compression,
        diff_id: Digest::sha256(tar),
    };
    let options = ConvertOptions {
        span_size,
        ..ConvertOptions::default()
    };
    let mut checkpoints = Vec::new();
    let indexed = index_layer(compressed, &source, &options, &mut checkpoints, &|_| {})?;
    assert_eq!(indexed.uncompressed_size, tar.len() as u64);
    assert_eq!(indexed.checkpoints_digest, Digest::sha256(&checkpoints));
    Ok((indexed.toc, checkpoints))
}

#[test]
fn every_entry_type_round_trips_through_the_index_of_its_gzip_layer() {
    let tar = every_type_tar();
    let original = tar_views(&tar).unwrap();
    for level in [1, 6, 9] {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        enc.write_all(&tar).unwrap();
        let layer = enc.finish().unwrap();
        for span_size in [64 << 10, 1 << 20, 4 << 20] {
            let (toc, checkpoints) =
                index(&layer, LayerCompression::Gzip, &tar, span_size).unwrap();
            assert_eq!(toc.codec(), streamsnap_format::Codec::GzipSpans);
            assert_eq!(toc.data_digest(), Digest::sha256(&layer));
            assert!(toc.chunks().len() > 1, "{} spans", toc.chunks().len());
            let views = index_views(&toc, &layer, &checkpoints).unwrap();
            let differences = diff_views(&views, &original);
            assert!(
                differences.is_empty(),
                "level {level}, span {span_size}: {differences:#?}"
            );
            // The TOC a node decodes is the one the converter validated.
            let decoded = Toc::decode(&streamsnap_format::encode_toc(toc.raw())).unwrap();
            assert_eq!(decoded.raw(), toc.raw());
        }
    }
}

#[test]
fn the_index_kind_refuses_what_it_cannot_read_and_names_the_chunked_kind() {
    let tar = every_type_tar();
    for (compression, compressed) in [
        (LayerCompression::None, tar.clone()),
        (
            LayerCompression::Zstd,
            zstd::bulk::compress(&tar, 3).unwrap(),
        ),
    ] {
        let error = index(&compressed, compression, &tar, 1 << 20).unwrap_err();
        assert!(matches!(error, Error::IndexUnsupported { .. }), "{error}");
        assert!(error.to_string().contains("--kind chunked"), "{error}");
    }
    // Two gzip members (pigz -i, or concatenated streams).
    let half = tar.len() / 2;
    let layer = [gzip(&tar[..half]), gzip(&tar[half..])].concat();
    let error = index(&layer, LayerCompression::Gzip, &tar, 1 << 20).unwrap_err();
    assert!(matches!(error, Error::IndexUnsupported { .. }), "{error}");
    // A wrong diff ID is caught as in the chunked kind.
    let layer = gzip(&tar);
    let source = LayerSource {
        digest: Digest::sha256(&layer),
        compression: LayerCompression::Gzip,
        diff_id: Digest::sha256(b"another tar"),
    };
    let error = index_layer(
        layer.as_slice(),
        &source,
        &ConvertOptions::default(),
        &mut Vec::new(),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(error, Error::DiffIdMismatch { .. }), "{error}");
}

#[test]
fn spans_of_stored_blocks_need_no_window_and_compressible_spans_keep_theirs() {
    // Incompressible content: gzip stores it, nothing refers back, no window is kept.
    let noise = streamsnap_e2e::targen::pseudo_random_bytes(7, 6 << 20);
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {} of a repetitive log\n", i % 977).into_bytes())
        .collect();
    for (content, windows_expected) in [(noise, false), (text, true)] {
        let mut t = streamsnap_e2e::TarGen::new();
        t.file("data", 0o644, &content);
        let tar = t.finish();
        // gzip's default level, as image builders use (zlib-rs's level 1 writes one block).
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&tar).unwrap();
        let layer = enc.finish().unwrap();
        let (toc, checkpoints) = index(&layer, LayerCompression::Gzip, &tar, 1 << 20).unwrap();
        assert!(toc.chunks().len() > 2, "{} spans", toc.chunks().len());
        let windows = (0..toc.chunks().len() as u32)
            .filter(|&i| toc.checkpoint(i).unwrap().window_size > 0)
            .count();
        assert_eq!(windows > 0, windows_expected, "{windows} windows");
        if !windows_expected {
            assert!(checkpoints.is_empty());
        }
        let views = index_views(&toc, &layer, &checkpoints).unwrap();
        assert!(diff_views(&views, &tar_views(&tar).unwrap()).is_empty());
    }
}
