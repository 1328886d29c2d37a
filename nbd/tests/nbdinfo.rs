//! The client's block status cross-checked with libnbd's `nbdinfo --map --json` on the same
//! qemu-nbd exports as `qemu.rs`: two independent clients must see the same extents.

mod common;

use std::path::Path;
use std::process::Command;

use backflow_nbd::{Client, Extent};
use common::*;

/// (offset, length, flags) with adjacent entries of equal flags merged.
fn coalesced(extents: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (offset, len, flags) in extents {
        match out.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == offset => last.1 += len,
            _ => out.push((offset, len, flags)),
        }
    }
    out
}

fn ours(extents: &[Extent]) -> Vec<(u64, u64, u32)> {
    coalesced(extents.iter().map(|e| (e.offset, e.len, e.flags)))
}

/// The value of `"key": NUMBER` in one JSON object of nbdinfo's map.
fn number(object: &str, key: &str) -> u64 {
    let quoted = format!("\"{key}\"");
    let at = object
        .find(&quoted)
        .unwrap_or_else(|| panic!("no {key} in {object}"));
    let rest = object[at + quoted.len()..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .expect("a colon after the key")
        .trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {object}: {e}"))
}

/// Runs `nbdinfo --map[=CONTEXT] --json` on the unix socket's default export and returns its
/// extents, merged. nbdinfo's JSON map is a flat array of flat objects, so a small scanner
/// suffices (no JSON dependency for one test).
fn nbdinfo_map(socket: &Path, context: &str) -> Vec<(u64, u64, u32)> {
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let map = format!("--map={context}");
    // Under timeout(1), so a server that never answers fails the test instead of hanging it.
    let out = Command::new("timeout")
        .args(["60", "nbdinfo", &map, "--json", &uri])
        .output()
        .expect("timeout (coreutils) runs nbdinfo");
    assert_ne!(
        out.status.code(),
        Some(127),
        "nbdinfo is required for these tests (apt-get install libnbd-bin)"
    );
    assert!(
        out.status.success(),
        "nbdinfo {map} --json {uri} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    let body = json.trim();
    assert!(
        body.starts_with('[') && body.ends_with(']'),
        "unexpected nbdinfo output: {json}"
    );
    let extents = body[1..body.len() - 1]
        .split('}')
        .filter(|object| object.contains('{'))
        .map(|object| {
            let flags = u32::try_from(number(object, "type")).unwrap();
            (number(object, "offset"), number(object, "length"), flags)
        });
    coalesced(extents)
}

#[test]
fn allocation_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &[]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    let extents = client
        .block_status(0, IMAGE_SIZE, "base:allocation")
        .unwrap();
    client.close().unwrap(); // qemu-nbd serves one client at a time (-e 1)
    let theirs = nbdinfo_map(&server.socket, "base:allocation");
    assert_eq!(ours(&extents), theirs);
    // Not vacuous: the map has data, allocated zeros and holes.
    let kinds: std::collections::BTreeSet<u32> = theirs.iter().map(|e| e.2).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec![0, 2, 3],
        "{theirs:?}"
    );
}

#[test]
fn dirty_bitmap_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let server = qcow2_fixture(dir.path(), &[]);
    let context = "qemu:dirty-bitmap:b0";
    let mut client =
        Client::connect_unix(&server.socket, "", &["base:allocation", context]).unwrap();
    let extents = client.block_status(0, IMAGE_SIZE, context).unwrap();
    client.close().unwrap(); // qemu-nbd serves one client at a time (-e 1)
    let theirs = nbdinfo_map(&server.socket, context);
    assert_eq!(ours(&extents), theirs);
    let dirty: Vec<_> = theirs
        .iter()
        .filter(|e| e.2 == 1)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(dirty, vec![(4 * MIB, 64 * KIB), (5 * MIB, 128 * KIB)]);
}

#[test]
fn raw_sparse_allocation_matches_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::File::create(&image).unwrap();
        file.set_len(8 * MIB).unwrap();
        for (offset, len) in [(MIB, 64 * KIB), (6 * MIB + 4 * KIB, 12 * KIB)] {
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&vec![0x3c; len as usize]).unwrap();
        }
        file.sync_all().unwrap();
    }
    let server = QemuNbd::start(dir.path(), &image, "raw", &[]);
    let mut client = Client::connect_unix(&server.socket, "", &["base:allocation"]).unwrap();
    let extents = client.block_status(0, 8 * MIB, "base:allocation").unwrap();
    client.close().unwrap(); // qemu-nbd serves one client at a time (-e 1)
    assert_eq!(
        ours(&extents),
        nbdinfo_map(&server.socket, "base:allocation")
    );
}
