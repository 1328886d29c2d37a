//! Helpers shared by the integration tests of the stage crates. A dev-dependency only: nothing
//! in a pipeline uses it.
//!
//! The crate root holds pipeline and repository helpers; [`qemu`] runs QEMU's tools and checks
//! the processes they leave; [`disks`] partitioned disks of known files; [`libvirt`] runs throwaway domains on `qemu:///system`;
//! [`libvirtd`] a libvirtd of a test's own, to restart; [`pki`] x509 certificates for NBD over
//! TLS (certtool); [`smtp`] a real SMTP server on loopback;
//! [`s3`] real S3-compatible object stores (Garage, one node or a three-node cluster in network
//! namespaces, and s3s-fs); [`cluster`] the lab of three KVM hosts on one machine that clusters
//! and workers are tested on (`scripts/cluster.sh`); [`guest`] the bootable test guest (a disk
//! made from Debian's kernel and busybox that boots under libvirt and answers commands on its
//! serial console: docs/test-guest.md); [`tools`] finds promtool and schemathesis; [`webdriver`]
//! drives Debian's headless chromium through chromedriver (the web console's tests).

pub mod cluster;
pub mod disks;
pub mod guest;
pub mod libvirt;
pub mod libvirtd;
pub mod pki;
pub mod qemu;
pub mod s3;
pub mod smtp;
pub mod tools;
pub mod webdriver;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backflow_pipeline::{
    Chunk, ChunkRef, Codec, Digest, Disk, DiskSource, Message, MessageType, OutcomeKind, Payload,
    PlacedStage, RunOptions, RunReport, SizeOnly, Stage, StageError, StageIo, Worker, digest_of,
};
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

/// A sink that keeps every message, so that a test sees what the stage before it emitted.
pub struct Collect(pub Arc<Mutex<Vec<Message>>>);

impl Stage for Collect {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Any),
            output: None,
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            self.0.lock().unwrap().push(message);
        }
        Ok(())
    }
}

/// A stage placed in a test pipeline under its own name, with a 16-item input channel.
pub fn placed(name: &str, stage: Arc<dyn Stage>, workers: usize) -> PlacedStage {
    PlacedStage {
        name: name.into(),
        kind: name.into(),
        workers,
        capacity: 16,
        stage,
    }
}

/// Flips the byte at `at` inside a chunk that is stored raw and used once in `table` (so that the
/// damaged data still decodes and only its digest can tell, and an error can name only one index).
/// Returns the chunk's index in the table and its digest.
pub fn damage_a_raw_chunk(repo: &Repository, table: &[ChunkRef], at: u64) -> (usize, Digest) {
    let (index, digest, location) = table
        .iter()
        .enumerate()
        .find_map(|(i, r)| {
            let ChunkRef::Data(d) = r else { return None };
            if table.iter().filter(|x| *x == r).count() != 1 {
                return None;
            }
            let loc = repo.lookup(d).unwrap().unwrap();
            (loc.codec == Codec::None).then_some((i, *d, loc))
        })
        .expect("the image has incompressible chunks");
    let hex = location.pack.to_hex();
    let pack = repo
        .path()
        .join("packs")
        .join(&hex[..2])
        .join(format!("{hex}.pack"));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, location.offset + at).unwrap();
    file.write_all_at(&[!byte[0]], location.offset + at)
        .unwrap();
    (index, digest)
}

/// Restores the latest snapshot of `repo` to `to` with `specs/restore.yaml`, loaded through the
/// real catalog: what `backflow restore` runs.
pub fn restore_with_spec(repo: &Path, to: &Path, sync: bool) -> RunReport {
    restore_with_format(repo, to, sync, "raw")
}

/// [`restore_with_spec`] writing images in `format` (`raw` or `qcow2`).
pub fn restore_with_format(repo: &Path, to: &Path, sync: bool, format: &str) -> RunReport {
    restore_snapshot(repo, "latest", to, sync, format)
}

/// Restores `snapshot` (an id, or `latest`) of `repo` to `to` in `format` with
/// `specs/restore.yaml`.
pub fn restore_snapshot(
    repo: &Path,
    snapshot: &str,
    to: &Path,
    sync: bool,
    format: &str,
) -> RunReport {
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../specs/restore.yaml");
    let vars = [
        ("repo", repo.display().to_string()),
        ("snapshot", snapshot.to_owned()),
        ("to", to.display().to_string()),
        ("sync", sync.to_string()),
        ("format", format.to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let pipeline = backflow_pipeline::spec::load_file(&spec, &vars, &backflow_stages::Stages)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", spec.display()));
    pipeline.run(RunOptions::default())
}

/// Disk `vda` of VM `web01` at `/dev/vda`: `size` bytes cut into `chunk_size` chunks, with no data
/// behind it, for feeding a writer synthetic chunks.
pub fn synthetic_disk(size: u64, chunk_size: u32) -> Arc<Disk> {
    Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: "web01".into(),
            name: "vda".into(),
            location: PathBuf::from("/dev/vda"),
            reader: Arc::new(SizeOnly(size)),
            tracking: None,
            definition: None,
        }),
        chunk_size,
        parent: None,
    })
}

/// Chunk `index` of `disk` as the verify stage passes it on: verified, with the digest of its
/// plaintext when it has one.
pub fn verified_chunk(disk: &Arc<Disk>, index: u64, payload: Payload) -> Message {
    let digest = match &payload {
        Payload::Raw(b) => Some(digest_of(b)),
        _ => None,
    };
    Message::Chunk(Chunk {
        disk: disk.clone(),
        index,
        digest,
        verified: true,
        payload,
    })
}

/// Where the disk writer writes `path` until the run succeeds: `NAME.partial` beside it.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap().to_owned();
    name.push(".partial");
    path.with_file_name(name)
}

/// Asserts that a run succeeded, showing its errors when it did not.
pub fn assert_succeeded(report: &RunReport) {
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
}
