//! A miniature backup/restore pipeline over the repository API, and deterministic test data.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use backflow_repository::{
    BackupSession, ChunkRef, Codec, Digest, DiskMeta, InitOptions, PackId, PackWriter, Repository,
    Snapshot, SnapshotInfo,
};

pub const CHUNK: u32 = 64 * 1024;
pub const CHUNK_USIZE: usize = CHUNK as usize;

/// 64 KiB chunks and 192 KiB packs: every test crosses pack boundaries with a few chunks.
pub fn init(dir: &Path) -> Repository {
    Repository::init_with(
        dir,
        &InitOptions {
            chunk_size: CHUNK,
            pack_target_size: 192 * 1024,
        },
    )
    .unwrap()
}

/// SplitMix64: deterministic data from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A disk image: `pattern` says per chunk 'z' zeros, 'r' random (incompressible), 't' text-like
/// (compressible), 'a' a fixed chunk repeated (dedup within the disk). `tail` bytes of a partial last chunk
/// (random) follow when non-zero.
pub fn image(seed: u64, pattern: &str, tail: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut fixed = vec![0u8; CHUNK_USIZE];
    Rng(999).fill(&mut fixed);
    for p in pattern.chars() {
        let mut c = vec![0u8; CHUNK_USIZE];
        match p {
            'z' => {}
            'r' => rng.fill(&mut c),
            't' => {
                let word = format!("line {} of some text\n", rng.next() % 1000);
                for (i, b) in c.iter_mut().enumerate() {
                    *b = word.as_bytes()[i % word.len()];
                }
            }
            'a' => c.copy_from_slice(&fixed),
            _ => panic!("bad pattern {p}"),
        }
        out.extend_from_slice(&c);
    }
    let mut t = vec![0u8; tail];
    rng.fill(&mut t);
    out.extend_from_slice(&t);
    out
}

pub fn encode(plain: &[u8]) -> (Codec, Vec<u8>) {
    let z = zstd::bulk::compress(plain, 1).unwrap();
    if z.len() < plain.len() {
        (Codec::Zstd, z)
    } else {
        (Codec::None, plain.to_vec())
    }
}

/// Stores every chunk of `data` as disk `disk` of the session: zeros as Zero, known chunks by reference,
/// others through `writer`. Chunks `unchanged` (by index) are copied from the parent instead of read.
pub fn write_disk(
    repo: &Repository,
    session: &BackupSession,
    writer: &mut PackWriter,
    seen: &mut HashSet<Digest>,
    disk: usize,
    data: &[u8],
) {
    for (i, chunk) in data.chunks(CHUNK_USIZE).enumerate() {
        let r = if chunk.iter().all(|&b| b == 0) {
            ChunkRef::Zero
        } else {
            let d = Digest(*blake3::hash(chunk).as_bytes());
            if !seen.contains(&d) && repo.lookup(&d).unwrap().is_none() {
                let (codec, stored) = encode(chunk);
                writer.add(d, codec, chunk.len() as u32, &stored).unwrap();
                seen.insert(d);
            }
            ChunkRef::Data(d)
        };
        session.set_chunk(disk, i as u64, r).unwrap();
    }
}

pub fn disk_meta(name: &str, size: usize) -> DiskMeta {
    DiskMeta {
        name: name.into(),
        size: size as u64,
        chunk_size: CHUNK,
        location: format!("/images/{name}.raw"),
        cbt: None,
    }
}

/// A full backup of `disks` as one session with one writer.
pub fn backup(repo: &Repository, vm: &str, disks: &[(&str, &[u8])]) -> SnapshotInfo {
    let session = repo.begin_backup(vm).unwrap();
    let mut writer = session.pack_writer();
    let mut seen = HashSet::new();
    for (name, data) in disks {
        let d = session.add_disk(disk_meta(name, data.len())).unwrap();
        write_disk(repo, &session, &mut writer, &mut seen, d, data);
    }
    writer.finish().unwrap();
    session
        .commit(Some(format!("<domain><name>{vm}</name></domain>")))
        .unwrap()
}

/// Restores one disk, checking every chunk against its digest.
pub fn restore(repo: &Repository, snap: &Snapshot, disk: usize) -> Vec<u8> {
    let meta = &snap.meta().disks[disk];
    let mut out = Vec::with_capacity(meta.size as usize);
    for (i, r) in snap.chunks(disk).enumerate() {
        let len = (meta.size - i as u64 * u64::from(meta.chunk_size))
            .min(u64::from(meta.chunk_size)) as usize;
        match r.unwrap() {
            ChunkRef::Zero => out.resize(out.len() + len, 0),
            ChunkRef::Data(d) => {
                let loc = repo
                    .lookup(&d)
                    .unwrap()
                    .expect("referenced chunk is indexed");
                let stored = repo.read_chunk(&loc).unwrap();
                let plain = backflow_repository::decode(stored.codec, &stored.data, stored.raw_len)
                    .unwrap();
                assert_eq!(blake3::hash(&plain).as_bytes(), d.as_bytes());
                assert_eq!(plain.len(), len);
                out.extend_from_slice(&plain);
            }
        }
    }
    out
}

/// Every file under `dir/sub` with the given extension.
pub fn files(dir: &Path, sub: &str, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join(sub)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The file of pack `id` in the repository at `root`: `packs/XX/ID.pack`.
pub fn pack_file(root: &Path, id: &PackId) -> PathBuf {
    let hex = id.to_hex();
    root.join("packs")
        .join(&hex[..2])
        .join(format!("{hex}.pack"))
}

/// Rewrites the file at `path` with `change` applied to its bytes: damage, for the tests.
pub fn modify(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}
