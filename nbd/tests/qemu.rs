//! The client against a real `qemu-nbd`: bytes, allocation and dirty bitmaps compared with what qemu-io wrote.

mod common;

use backflow_nbd::{Client, NbdError, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use common::*;

fn expected_bytes() -> Vec<u8> {
    let mut bytes = vec![0u8; IMAGE_SIZE as usize];
    for &(offset, len, pattern) in BEFORE_BITMAP.iter().chain(AFTER_BITMAP) {
        bytes[offset as usize..(offset + len) as usize].fill(pattern);
    }
    bytes
}

/// Ranges rounded out to 64 KiB (qcow2 clusters, bitmap granules), merged.
fn rounded(writes: &[&(u64, u64, u8)]) -> Vec<(u64, u64)> {
    let g = 64 * KIB;
    merged(
        writes
            .iter()
            .map(|&&(o, l, _)| (o / g * g, (o + l).div_ceil(g) * g))
            .collect(),
    )
}

/// The written ranges themselves, merged.
fn exact(writes: &[&(u64, u64, u8)]) -> Vec<(u64, u64)> {
    merged(writes.iter().map(|&&(o, l, _)| (o, o + l)).collect())
}

#[test]
fn reads_match_what_qemu_io_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &["-x", "vda"]);
    let mut client = Client::connect_unix(&server.socket, "vda", &[]).unwrap();
    assert_eq!(client.size(), IMAGE_SIZE);
    assert!(client.is_read_only());
    assert!(client.structured_replies());
    assert_eq!(client.max_block(), 32 << 20);

    let expected = expected_bytes();
    let mut whole = vec![0x5a; IMAGE_SIZE as usize];
    client.read_at(0, &mut whole).unwrap();
    assert!(
        whole == expected,
        "whole-image read differs from the written patterns"
    );

    // Straddling the end of the 0xab write and a hole, not aligned to anything.
    let mut part = vec![0x5a; 300];
    client.read_at(MIB + 64 * KIB - 100, &mut part).unwrap();
    assert_eq!(part, &expected[(MIB + 64 * KIB - 100) as usize..][..300]);
    client.close().unwrap();
}

#[test]
fn allocation_reports_data_only_where_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &["-x", "vda"]);
    let mut client = Client::connect_unix(&server.socket, "vda", &["base:allocation"]).unwrap();
    let extents = client
        .block_status(0, IMAGE_SIZE, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, 0, IMAGE_SIZE);

    // Allocation is per 64 KiB qcow2 cluster; within a cluster QEMU reports the unwritten part as
    // allocated zeros, so non-zero data is exactly what qemu-io wrote.
    let all: Vec<_> = BEFORE_BITMAP.iter().chain(AFTER_BITMAP).collect();
    assert_eq!(
        ranges_with(&extents, |f| f & STATE_HOLE == 0),
        rounded(&all),
        "{extents:?}"
    );
    let data = ranges_with(&extents, |f| f & (STATE_HOLE | STATE_ZERO) == 0);
    assert_eq!(data, exact(&all), "{extents:?}");
    for e in extents.iter().filter(|e| e.flags & STATE_HOLE != 0) {
        assert_ne!(
            e.flags & STATE_ZERO,
            0,
            "unallocated qcow2 range {e:?} should read as zeros"
        );
    }

    // A sub-range starting inside data is clipped to exactly what was asked.
    let extents = client
        .block_status(MIB + 4 * KIB, 100 * KIB, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, MIB + 4 * KIB, 100 * KIB);
    assert_eq!(extents[0].flags & STATE_HOLE, 0);
    assert_eq!(
        (extents[0].offset, extents[0].len),
        (MIB + 4 * KIB, 60 * KIB)
    );
}

#[test]
fn dirty_bitmap_reports_writes_after_it_was_added() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &["-x", "vda"]);
    let contexts = ["base:allocation", "qemu:dirty-bitmap:b0"];
    let mut client = Client::connect_unix(&server.socket, "vda", &contexts).unwrap();
    assert_ne!(
        client.context_id(contexts[0]),
        client.context_id(contexts[1])
    );

    let extents = client.block_status(0, IMAGE_SIZE, contexts[1]).unwrap();
    assert_exact_cover(&extents, 0, IMAGE_SIZE);
    let after: Vec<_> = AFTER_BITMAP.iter().collect();
    assert_eq!(
        ranges_with(&extents, |f| f & STATE_DIRTY != 0),
        rounded(&after)
    );
    assert_eq!(
        rounded(&after),
        vec![
            (4 * MIB, 4 * MIB + 64 * KIB),
            (5 * MIB, 5 * MIB + 128 * KIB)
        ]
    );

    // The connection stays usable for reads after block status on two contexts.
    let mut buf = vec![0; 4096];
    client.read_at(4 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
}

#[test]
fn raw_image_bytes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    // Deterministic pseudo-random contents (xorshift), 3 MiB + 4 KiB.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..3 * MIB + 4 * KIB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&image, &bytes).unwrap();
    let server = QemuNbd::start(dir.path(), &image, "raw", &[]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), bytes.len() as u64);

    let mut got = vec![0; bytes.len()];
    client.read_at(0, &mut got).unwrap();
    assert!(got == bytes, "raw export differs from the file");

    let mut tail = vec![0; 4096];
    client.read_at(3 * MIB, &mut tail).unwrap();
    assert_eq!(tail, &bytes[3 * MIB as usize..]);
}

#[test]
fn caller_and_server_refusals_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &["-x", "vda"]);

    match Client::connect_unix(&server.socket, "no-such-export", &[]) {
        Err(NbdError::OptionRefused { option, reply, .. }) => {
            assert_eq!(option, "NBD_OPT_GO");
            assert_eq!(reply, "NBD_REP_ERR_UNKNOWN");
        }
        other => panic!("expected NBD_REP_ERR_UNKNOWN, got {other:?}"),
    }
    match Client::connect_unix(&server.socket, "vda", &["qemu:dirty-bitmap:nope"]) {
        Err(e @ NbdError::MetaContextUnavailable { .. }) => assert!(!e.is_retryable()),
        other => panic!("expected a missing context, got {other:?}"),
    }

    let mut client = Client::connect_unix(&server.socket, "vda", &["base:allocation"]).unwrap();
    let mut buf = vec![0; 8192];
    assert!(matches!(
        client.read_at(IMAGE_SIZE - 4096, &mut buf),
        Err(NbdError::InvalidArgument(_))
    ));
    assert!(matches!(
        client.block_status(0, MIB, "qemu:dirty-bitmap:b0"),
        Err(NbdError::InvalidArgument(_))
    ));
    // Refused requests never reached the server: the connection still works.
    client.read_at(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
}

#[test]
fn tcp_transport_reads_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img, "4M"]);
    write(img, (MIB + 512, 3000, 0x7e));
    let server = QemuNbd::start_tcp(dir.path(), &image, "qcow2");
    let mut client =
        Client::connect_tcp(("127.0.0.1", server.port), "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), 4 * MIB);
    let mut buf = vec![0x5a; 8192];
    client.read_at(MIB, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0));
    assert!(buf[512..3512].iter().all(|&b| b == 0x7e));
    assert!(buf[3512..].iter().all(|&b| b == 0));
    let extents = client.block_status(0, 4 * MIB, "base:allocation").unwrap();
    assert_exact_cover(&extents, 0, 4 * MIB);
    client.close().unwrap();
}

#[test]
fn pipelined_vectored_reads_match_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &["-x", "vda"]);
    let mut client = Client::connect_unix(&server.socket, "vda", &[]).unwrap();
    let expected = expected_bytes();

    // 64 buffers of 128 KiB from an unaligned offset: 64 requests through a window of 8, covering
    // the writes at 1 MiB, 4 MiB and 5 MiB.
    let offset = 512;
    let mut bufs = vec![vec![0x5au8; 128 * KIB as usize]; 64];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    client.read_vectored_at(offset, &mut slices).unwrap();
    let got = bufs.concat();
    assert!(
        got[..] == expected[offset as usize..][..got.len()],
        "vectored read differs from the written patterns"
    );

    // Uneven buffers, one empty and one larger than the 32 MiB maximum block (split in two requests),
    // through a window of three: the whole image.
    client.set_max_in_flight(3);
    let sizes = [3 * MIB + 7, 0, 35 * MIB, IMAGE_SIZE - 38 * MIB - 7];
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0x5a; n as usize]).collect();
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    client.read_vectored_at(0, &mut slices).unwrap();
    assert!(
        bufs.concat() == expected,
        "whole-image vectored read differs"
    );

    // Past the end is refused before anything is sent.
    let mut a = vec![0; 4096];
    let mut b = vec![0; 4096];
    assert!(matches!(
        client.read_vectored_at(IMAGE_SIZE - 6000, &mut [&mut a, &mut b]),
        Err(NbdError::InvalidArgument(_))
    ));
    client.close().unwrap();
}

#[test]
fn multi_conn_flag_matches_nbdinfo() {
    let mut seen = Vec::new();
    for extra in [&[][..], &["--shared=2"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let server = qcow2_fixture(dir.path(), extra);
        // nbdinfo first: with --shared=1 qemu-nbd serves one client at a time.
        let json = nbdinfo_json(&server.socket);
        let client = Client::connect_unix(&server.socket, "", &[]).unwrap();
        assert_eq!(
            client.can_multi_conn(),
            json_bool(&json, "can_multi_conn"),
            "qemu-nbd {extra:?}: {json}"
        );
        assert_eq!(client.is_read_only(), json_bool(&json, "is_read_only"));
        seen.push(client.can_multi_conn());
        client.close().unwrap();
    }
    // qemu-nbd advertises multi-conn only when it accepts several clients, so both values were checked.
    assert_eq!(seen, [false, true]);
}
