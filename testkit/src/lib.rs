//! Helpers shared by the integration tests of the stage crates. A dev-dependency only: nothing
//! in a pipeline uses it.

use std::collections::HashSet;
use std::path::Path;

use backflow_pipeline::{ChunkRef, digest_of};
use backflow_repository::{DiskMeta, Repository};
use bytes::Bytes;
use stage_zstd::{Zstd, ZstdOptions};

/// Backs up images as the disks of one snapshot of `vm` through the repository API, compressed
/// with the zstd stage's encoder; returns the snapshot id and each disk's chunk table.
pub fn backup_files(
    repo: &Repository,
    vm: &str,
    disks: &[(&str, &Path)],
) -> (String, Vec<Vec<ChunkRef>>) {
    let session = repo.begin_backup(vm).unwrap();
    let mut packs = session.pack_writer();
    let mut compressor = Zstd::new(ZstdOptions::default())
        .unwrap()
        .compressor()
        .unwrap();
    let mut stored = HashSet::new();
    let mut tables = Vec::new();
    for (name, path) in disks {
        let data = std::fs::read(path).unwrap();
        let slot = session
            .add_disk(DiskMeta {
                name: (*name).into(),
                size: data.len() as u64,
                chunk_size: repo.chunk_size(),
                location: path.display().to_string(),
                cbt: None,
            })
            .unwrap();
        let mut table = Vec::new();
        for (i, plain) in data.chunks(repo.chunk_size() as usize).enumerate() {
            if plain.iter().all(|&b| b == 0) {
                table.push(ChunkRef::Zero);
                continue;
            }
            let digest = digest_of(plain);
            if stored.insert(digest) && repo.lookup(&digest).unwrap().is_none() {
                let (codec, data) = compressor.encode(&Bytes::copy_from_slice(plain)).unwrap();
                packs.add(digest, codec, plain.len() as u32, &data).unwrap();
            }
            session
                .set_chunk(slot, i as u64, ChunkRef::Data(digest))
                .unwrap();
            table.push(ChunkRef::Data(digest));
        }
        tables.push(table);
    }
    packs.finish().unwrap();
    (session.commit(None).unwrap().id, tables)
}
