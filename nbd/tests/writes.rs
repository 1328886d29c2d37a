//! Writes, write zeroes and flush against a writable `qemu-nbd` on a qcow2 image, checked by QEMU itself:
//! once the server has stopped, `qemu-img compare` must find the image identical to the raw file the
//! test built alongside.

mod common;

use std::path::Path;
use std::process::Command;

use backflow_nbd::proto::{FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES};
use backflow_nbd::{Client, NbdError};
use common::*;

/// Larger than the 32 MiB maximum block size, so the long write is split.
const SIZE: u64 = 48 * MIB;

/// Deterministic pseudo-random bytes (xorshift), never zero so they cannot pass for a hole.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

/// `qemu-img compare -f qcow2 -F raw`: exit status 0 means identical, 1 different.
fn qemu_img_compare(qcow2: &Path, raw: &Path) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(qcow2)
        .arg(raw)
        .output()
        .expect("qemu-img is required for these tests (apt-get install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn writes_zeroes_and_flush_reach_the_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    let server = QemuNbd::start_writable(dir.path(), &image, "qcow2", &[]);
    let mut client = Client::connect_unix(&server.socket, "", &[]).unwrap();
    assert!(!client.is_read_only());
    assert_eq!(client.size(), SIZE);
    let flags = client.transmission_flags();
    assert_ne!(flags & FLAG_SEND_WRITE_ZEROES, 0, "qemu-nbd offers zeroes");
    assert_ne!(flags & FLAG_SEND_FLUSH, 0, "qemu-nbd offers flush");

    let mut expected = vec![0u8; SIZE as usize];
    // Scattered writes: aligned, unaligned, across a cluster boundary, longer than the maximum block
    // (split in two requests), and at the very end.
    let writes = [
        (0, 4 * KIB),
        (MIB + 512, 3000),
        (5 * MIB - 100, 200),
        (10 * MIB, 33 * MIB),
        (SIZE - 64 * KIB, 64 * KIB),
    ];
    client.set_max_in_flight(4);
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        client.write_at(offset, &data).unwrap();
        expected[offset as usize..][..len as usize].copy_from_slice(&data);
    }
    // Zeroes inside the long write (unaligned), and over a range that was never written.
    for (offset, len) in [(20 * MIB + 123, 5 * MIB), (7 * MIB, 2 * MIB)] {
        client.write_zeroes(offset, len).unwrap();
        expected[offset as usize..][..len as usize].fill(0);
    }
    // Overwrite part of the zeroed range again.
    let data = pattern(99, 8 * KIB);
    client.write_at(22 * MIB, &data).unwrap();
    expected[(22 * MIB) as usize..][..data.len()].copy_from_slice(&data);
    client.flush().unwrap();

    // The same connection reads back what it wrote.
    let mut back = vec![0x5a; SIZE as usize];
    client.read_at(0, &mut back).unwrap();
    assert!(back == expected, "read back differs from what was written");
    client.close().unwrap();
    server.stop();

    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    let (status, text) = qemu_img_compare(&image, &raw);
    assert_eq!(status, Some(0), "qemu-img compare: {text}");
    assert!(text.contains("identical"), "{text}");

    // The comparison can fail: one byte off is found.
    expected[(30 * MIB + 1) as usize] ^= 0x80;
    std::fs::write(&raw, &expected).unwrap();
    let (status, text) = qemu_img_compare(&image, &raw);
    assert_eq!(status, Some(1), "qemu-img compare: {text}");
}

#[test]
fn read_only_export_refuses_writes_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &[]);
    let mut client = Client::connect_unix(&server.socket, "", &[]).unwrap();
    assert!(client.is_read_only());
    for result in [client.write_at(0, &[1; 4096]), client.write_zeroes(0, 4096)] {
        match result {
            Err(e @ NbdError::ReadOnly { .. }) => assert!(!e.is_retryable()),
            other => panic!("expected a read-only refusal, got {other:?}"),
        }
    }
    // Nothing reached the server: the connection still reads, and flush is harmless.
    client.flush().unwrap();
    let mut buf = vec![0; 4096];
    client.read_at(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    client.close().unwrap();
}
