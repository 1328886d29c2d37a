//! The client against nbdkit (plugins shipped with Debian 12's `nbdkit` package): bytes and
//! `base:allocation` compared with what the plugin was told to serve.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backflow_nbd::proto::FLAG_SEND_WRITE_ZEROES;
use backflow_nbd::{Client, Extent, STATE_HOLE, STATE_ZERO};
use common::{assert_exact_cover, json_bool, merged, nbdinfo_json, ranges_with};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// An nbdkit serving one plugin on a private unix socket, backgrounded with a pid file and killed by
/// that pid on drop.
struct Nbdkit {
    socket: PathBuf,
    pid: String,
}

impl Nbdkit {
    /// Starts `nbdkit -U dir/nbdkit.sock -P dir/nbdkit.pid ARGS` (nbdkit forks into the background
    /// once it listens) and waits for the pid file and the socket. Panics when nbdkit is missing:
    /// these tests must not skip.
    fn start(dir: &Path, args: &[&str]) -> Self {
        let socket = dir.join("nbdkit.sock");
        let pid_file = dir.join("nbdkit.pid");
        let out = Command::new("nbdkit")
            .arg("-U")
            .arg(&socket)
            .arg("-P")
            .arg(&pid_file)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("nbdkit is required for these tests (apt-get install nbdkit): {e}")
            });
        assert!(
            out.status.success(),
            "nbdkit {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let pid = pid.trim();
            if !pid.is_empty() && socket.exists() {
                return Nbdkit {
                    socket,
                    pid: pid.to_string(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "nbdkit {args:?} wrote no pid file or socket within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
        // Wait (briefly) until it is gone, so no nbdkit outlives the test run.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // Gone, or a zombie waiting for whichever process adopted it to reap it.
            let alive = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"));
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
    }
}

/// Every extent flagged zero reads as zeros in `bytes`.
fn assert_zero_extents_read_zero(extents: &[Extent], bytes: &[u8]) {
    for e in extents.iter().filter(|e| e.flags & STATE_ZERO != 0) {
        let range = &bytes[e.offset as usize..(e.offset + e.len) as usize];
        assert!(
            range.iter().all(|&b| b == 0),
            "{e:?} is flagged zero but holds data"
        );
    }
}

/// Size of the `data` export: larger than 32 MiB so whole reads are split.
const DATA_SIZE: u64 = 40 * MIB;
/// (offset, bytes) placed by the `data` plugin; the last one straddles 32 MiB.
fn data_layout() -> Vec<(u64, Vec<u8>)> {
    vec![
        (MIB, vec![1, 2, 3]),
        (2 * MIB, vec![0xaa; 8192]),
        (4 * MIB + 100, vec![4]),
        (32 * MIB - 2, vec![0x55; 4]),
    ]
}

/// The `data=` expression for [`data_layout`].
fn data_expression() -> String {
    data_layout()
        .iter()
        .map(|(offset, bytes)| {
            let body = if bytes.iter().all(|&b| b == bytes[0]) && bytes.len() > 1 {
                format!("( {:#x} )*{}", bytes[0], bytes.len())
            } else {
                bytes
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            format!("@{offset} {body}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn data_plugin_bytes_and_sparse_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("data={}", data_expression());
    let size = format!("size={DATA_SIZE}");
    let server = Nbdkit::start(dir.path(), &["-r", "data", &data, &size]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), DATA_SIZE);
    assert!(client.is_read_only());
    assert!(client.structured_replies());

    let mut expected = vec![0u8; DATA_SIZE as usize];
    for (offset, bytes) in data_layout() {
        expected[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
    }
    let mut whole = vec![0x5a; DATA_SIZE as usize];
    client.read_at(0, &mut whole).unwrap();
    assert!(
        whole == expected,
        "whole read differs from the data= layout"
    );
    let mut part = vec![0x5a; 10];
    client.read_at(32 * MIB - 5, &mut part).unwrap();
    assert_eq!(part, &expected[(32 * MIB - 5) as usize..][..10]);

    // The data plugin keeps a sparse array of 32 KiB pages: pages holding placed bytes are data,
    // every other page is a hole that reads as zeros.
    let page = 32 * KIB;
    let pages = merged(
        data_layout()
            .iter()
            .map(|(o, b)| (o / page * page, (o + b.len() as u64).div_ceil(page) * page))
            .collect(),
    );
    assert_eq!(
        pages,
        vec![
            (MIB, MIB + page),
            (2 * MIB, 2 * MIB + page),
            (4 * MIB, 4 * MIB + page),
            (32 * MIB - page, 32 * MIB + page)
        ]
    );
    let extents = client
        .block_status(0, DATA_SIZE, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, 0, DATA_SIZE);
    assert_eq!(
        ranges_with(&extents, |f| f & (STATE_HOLE | STATE_ZERO) == 0),
        pages,
        "{extents:?}"
    );
    for e in extents.iter().filter(|e| e.flags & STATE_HOLE != 0) {
        assert_eq!(e.flags, STATE_HOLE | STATE_ZERO, "{e:?}");
    }
    assert_zero_extents_read_zero(&extents, &whole);

    // A sub-range starting inside a data page is clipped to what was asked. nbdkit checks the
    // requested part of an allocated page: with bytes in it, it is data; all zeros, it is
    // allocated zeros (zero without hole).
    let extents = client
        .block_status(2 * MIB + 4 * KIB, 100 * KIB, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, 2 * MIB + 4 * KIB, 100 * KIB);
    assert_eq!(
        (extents[0].offset, extents[0].len, extents[0].flags),
        (2 * MIB + 4 * KIB, page - 4 * KIB, 0)
    );
    let extents = client
        .block_status(MIB + 4 * KIB, 100 * KIB, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, MIB + 4 * KIB, 100 * KIB);
    assert_eq!(
        (extents[0].offset, extents[0].len, extents[0].flags),
        (MIB + 4 * KIB, page - 4 * KIB, STATE_ZERO)
    );
    assert_zero_extents_read_zero(&extents, &whole);
    client.close().unwrap();
}

#[test]
fn memory_plugin_is_one_zero_hole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), &["memory", "size=64M"]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), 64 * MIB);
    assert!(!client.is_read_only(), "memory without -r is writable");

    let mut buf = vec![0x5a; (33 * MIB) as usize];
    client.read_at(31 * MIB, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "an unwritten memory disk reads as zeros"
    );

    let extents = client.block_status(0, 64 * MIB, "base:allocation").unwrap();
    assert_exact_cover(&extents, 0, 64 * MIB);
    assert!(
        extents.iter().all(|e| e.flags == STATE_HOLE | STATE_ZERO),
        "{extents:?}"
    );
    assert_eq!(extents.len(), 1, "extents are coalesced: {extents:?}");
    client.close().unwrap();
}

#[test]
fn file_plugin_serves_a_sparse_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let size = 6 * MIB;
    // Deterministic pseudo-random data (xorshift) in 64 KiB-aligned ranges; the rest stays sparse.
    let written = [
        (MIB, 64 * KIB),
        (3 * MIB + 128 * KIB, 192 * KIB),
        (size - 64 * KIB, 64 * KIB),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut expected = vec![0u8; size as usize];
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::File::create(&image).unwrap();
        file.set_len(size).unwrap();
        for &(offset, len) in &written {
            let range = &mut expected[offset as usize..(offset + len) as usize];
            for b in range.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = (state as u8) | 1; // never zero, so written data cannot pass for a hole
            }
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(range).unwrap();
        }
        file.sync_all().unwrap();
    }
    let server = Nbdkit::start(dir.path(), &["-r", "file", image.to_str().unwrap()]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), size);
    assert!(client.is_read_only());

    let mut got = vec![0x5a; size as usize];
    client.read_at(0, &mut got).unwrap();
    assert!(got == expected, "file export differs from the file");

    // The file plugin reports SEEK_DATA/SEEK_HOLE. Written ranges are data on any filesystem; the
    // gaps are holes on ext4/xfs/tmpfs (where this runs), so at least one hole must be reported.
    let extents = client.block_status(0, size, "base:allocation").unwrap();
    assert_exact_cover(&extents, 0, size);
    let data = ranges_with(&extents, |f| f & (STATE_HOLE | STATE_ZERO) == 0);
    for &(offset, len) in &written {
        assert!(
            data.iter()
                .any(|&(from, to)| from <= offset && offset + len <= to),
            "written range {offset}+{len} is not reported as data: {extents:?}"
        );
    }
    assert!(
        extents.iter().any(|e| e.flags & STATE_HOLE != 0),
        "a sparse file should report holes: {extents:?}"
    );
    assert_zero_extents_read_zero(&extents, &got);
    client.close().unwrap();
}

#[test]
fn pipelined_vectored_read_of_the_data_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("data={}", data_expression());
    let size = format!("size={DATA_SIZE}");
    let server = Nbdkit::start(dir.path(), &["-r", "data", &data, &size]);
    let mut client = Client::connect_unix(&server.socket, "", &[]).unwrap();
    let mut expected = vec![0u8; DATA_SIZE as usize];
    for (offset, bytes) in data_layout() {
        expected[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
    }
    // 64 buffers of 128 KiB ending past the bytes that straddle 32 MiB, 16 requests in flight.
    client.set_max_in_flight(16);
    let offset = 32 * MIB - 4 * MIB - 3;
    let mut bufs = vec![vec![0x5au8; 128 * KIB as usize]; 64];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    client.read_vectored_at(offset, &mut slices).unwrap();
    assert!(
        bufs.concat()[..] == expected[offset as usize..][..(8 * MIB) as usize],
        "vectored read differs from the data= layout"
    );
    // From the start, covering the bytes at 1, 2 and 4 MiB.
    let mut bufs = vec![vec![0x5au8; 128 * KIB as usize]; 64];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    client.read_vectored_at(0, &mut slices).unwrap();
    assert!(bufs.concat()[..] == expected[..(8 * MIB) as usize]);
    client.close().unwrap();
}

#[test]
fn memory_plugin_writes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), &["memory", "size=16M"]);
    let mut client = Client::connect_unix(&server.socket, "", &[]).unwrap();
    assert_ne!(client.transmission_flags() & FLAG_SEND_WRITE_ZEROES, 0);
    let mut expected = vec![0u8; 16 * MIB as usize];
    let data: Vec<u8> = (0..3 * MIB + 5).map(|i| (i % 253) as u8 + 1).collect();
    client.write_at(MIB - 1, &data).unwrap();
    expected[(MIB - 1) as usize..][..data.len()].copy_from_slice(&data);
    client.write_zeroes(2 * MIB, 64 * KIB + 1).unwrap();
    expected[(2 * MIB) as usize..][..(64 * KIB + 1) as usize].fill(0);
    client.flush().unwrap();
    let mut got = vec![0x5a; 16 * MIB as usize];
    client.read_at(0, &mut got).unwrap();
    assert!(got == expected, "memory disk differs from what was written");
    client.close().unwrap();
}

#[test]
fn zeroes_fall_back_to_writes_without_server_support() {
    let dir = tempfile::tempdir().unwrap();
    // The nozero filter hides NBD_CMD_WRITE_ZEROES from clients.
    let server = Nbdkit::start(dir.path(), &["--filter=nozero", "memory", "size=8M"]);
    let mut client = Client::connect_unix(&server.socket, "", &[]).unwrap();
    assert_eq!(client.transmission_flags() & FLAG_SEND_WRITE_ZEROES, 0);
    client.write_at(0, &vec![0xee; 8 * MIB as usize]).unwrap();
    client.write_zeroes(MIB + 3, 5 * MIB).unwrap();
    let mut got = vec![0; 8 * MIB as usize];
    client.read_at(0, &mut got).unwrap();
    let (from, to) = ((MIB + 3) as usize, (6 * MIB + 3) as usize);
    assert!(got[..from].iter().all(|&b| b == 0xee));
    assert!(got[from..to].iter().all(|&b| b == 0));
    assert!(got[to..].iter().all(|&b| b == 0xee));
    client.close().unwrap();
}

#[test]
fn multi_conn_flag_matches_nbdinfo() {
    let mut seen = Vec::new();
    for args in [
        &["memory", "size=1M"][..],
        &[
            "--filter=multi-conn",
            "memory",
            "size=1M",
            "multi-conn-mode=disable",
        ][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = Nbdkit::start(dir.path(), args);
        let client = Client::connect_unix(&server.socket, "", &[]).unwrap();
        let json = nbdinfo_json(&server.socket);
        assert_eq!(
            client.can_multi_conn(),
            json_bool(&json, "can_multi_conn"),
            "nbdkit {args:?}: {json}"
        );
        seen.push(client.can_multi_conn());
        client.close().unwrap();
    }
    assert_eq!(seen, [true, false], "both values of the flag were checked");
}
