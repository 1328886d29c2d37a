//! Restores to qcow2 against real QEMU tools: a qcow2 backed up through `specs/backup-qcow2.yaml`
//! restores through `specs/restore.yaml` with `format: qcow2` to an image `qemu-img compare` finds
//! identical and that allocates only its data; and a restore that fails or is interrupted leaves no
//! image, no `.partial` and no `qemu-nbd`.
//!
//! These tests need `qemu-img`, `qemu-io` and `qemu-nbd` on the PATH and fail if they are missing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    CancelToken, ChunkRef, Disk, Message, MessageType, OutcomeKind, Payload, Pipeline, RunOptions,
    Stage, StageError, StageIo, Worker,
};
use backflow_repository::Repository;
use backflow_stages::Stages;
use backflow_testkit::qemu::{
    assert_images_equal, assert_no_process_naming, image_info, make_qcow2, qemu_nbd_naming,
    run_tool,
};
use backflow_testkit::{
    assert_succeeded, damage_a_raw_chunk, partial_path, placed, restore_with_format,
    synthetic_disk, verified_chunk,
};
use bytes::Bytes;
use stage_disk_writer::{DiskWriter, DiskWriterOptions, ImageFormat};

/// 64 KiB chunks: the qcow2 default cluster size, so that holes stay holes chunk for chunk.
const CHUNK: u32 = 64 * 1024;
const MIB: u64 = 1 << 20;
/// The source's virtual size.
const VIRTUAL: u64 = 64 * MIB;

/// Seeded bytes that zstd cannot shrink, so that they are stored raw.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A 64 MiB qcow2, mostly unallocated: 256 KiB of 0xab at 1 MiB, a 1 MiB zero cluster range at
/// 8 MiB (written, then zeroed: allocated metadata that reads as zeros), 1 MiB of noise at
/// 16 MiB and 1 MiB of 0xcd at 40 MiB.
fn make_source(dir: &Path) -> PathBuf {
    let image = dir.join("web01.qcow2");
    let noise_file = dir.join("noise.bin");
    std::fs::write(&noise_file, noise(MIB as usize, 0x9e37_79b9_7f4a_7c15)).unwrap();
    let write_noise = format!("write -s {} 16M 1M", noise_file.display());
    make_qcow2(
        &image,
        "64M",
        &[
            "write -P 0xab 1M 256k",
            "write -P 0x11 8M 1M",
            "write -z 8M 1M",
            &write_noise,
            "write -P 0xcd 40M 1M",
        ],
    );
    // The fixture has what it claims: a range that is allocated yet reads as zeros.
    let map: serde_json::Value = serde_json::from_slice(&run_tool(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert!(
        map.as_array().unwrap().iter().any(|e| e["start"] == 8 * MIB
            && e["present"] == true
            && e["zero"] == true
            && e["data"] == false),
        "no zero clusters at 8 MiB: {map}"
    );
    image
}

struct BackedUp {
    dir: tempfile::TempDir,
    repo: PathBuf,
    source: PathBuf,
    snapshot: String,
}

/// The source backed up with `specs/backup-qcow2.yaml`, loaded through the real catalog.
fn backed_up() -> BackedUp {
    let dir = tempfile::tempdir().unwrap();
    let source = make_source(dir.path());
    let repo = dir.path().join("repo");
    Repository::init(&repo, CHUNK).unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../specs/backup-qcow2.yaml");
    let vars = [
        ("source", source.display().to_string()),
        ("repo", repo.display().to_string()),
        ("disk", "vda".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let pipeline =
        backflow_pipeline::spec::load_file(&spec, &vars, &Stages).unwrap_or_else(|e| panic!("{e}"));
    let report = pipeline.run(RunOptions::default());
    assert_succeeded(&report);
    BackedUp {
        snapshot: report.snapshot.unwrap(),
        dir,
        repo,
        source,
    }
}

/// Neither a file nor a process (such as the writer's `qemu-nbd`) is left in or on `out_dir`.
fn assert_nothing_left(out_dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a failed restore left {left:?}");
    assert_no_process_naming(out_dir);
}

#[test]
fn a_qcow2_restore_equals_the_source_and_allocates_only_its_data() {
    let b = backed_up();
    let out = b.dir.path().join("restored.qcow2");
    let report = restore_with_format(&b.repo, &out, true, "qcow2");
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], b.snapshot.as_str());
    let restored = &report.results["restored"][0];
    assert_eq!(restored["disk"], "vda");
    assert_eq!(restored["path"], out.display().to_string().as_str());
    assert_eq!(restored["format"], "qcow2");
    assert_eq!(restored["size"], VIRTUAL);

    let info = image_info(&out);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], VIRTUAL, "{info}");
    assert_images_equal(&b.source, "qcow2", &out, "qcow2");
    run_tool(
        "qemu-img",
        &["check", "-q", "-f", "qcow2", out.to_str().unwrap()],
    );
    assert!(!partial_path(&out).exists());
    assert_no_process_naming(b.dir.path());

    // 2.25 MiB of data in 64 MiB: zero chunks were never written, so the image holds the data and
    // a little metadata (a full write would take 64 MiB).
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 4 * MIB,
        "{allocated} bytes allocated for 2.25 MiB of data"
    );
    assert_eq!(report.stages[3].bytes_out, 2 * MIB + MIB / 4);
}

#[test]
fn a_qcow2_restore_into_a_directory_is_named_after_the_disk() {
    let b = backed_up();
    let to = b.dir.path().join("out");
    std::fs::create_dir(&to).unwrap();
    // Without sync: the server is still stopped before the rename, so the image is complete.
    assert_succeeded(&restore_with_format(&b.repo, &to, false, "qcow2"));
    let names: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["vda.qcow2"]);
    assert_eq!(image_info(&to.join("vda.qcow2"))["format"], "qcow2");
    assert_images_equal(&b.source, "qcow2", &to.join("vda.qcow2"), "qcow2");
    assert_no_process_naming(b.dir.path());
}

#[test]
fn a_damaged_chunk_fails_a_qcow2_restore_and_leaves_nothing() {
    let b = backed_up();
    let repo = Repository::open(&b.repo).unwrap();
    let table: Vec<ChunkRef> = repo
        .open_snapshot(&b.snapshot)
        .unwrap()
        .chunks(0)
        .map(Result::unwrap)
        .collect();
    let (index, _) = damage_a_raw_chunk(&repo, &table, 7);
    // The damaged chunk is in the noise at 16 MiB, after the data at 1 MiB: the writer got chunks
    // (and started its server) before the restore failed.
    assert_eq!(index as u64 * u64::from(CHUNK) / MIB, 16);

    // Workers run in parallel: on a loaded machine the damaged chunk can be verified before any
    // chunk reached the writer. Every attempt must fail and leave nothing; at least one of a few
    // must have had the writer (and its server) started, the case this test is about.
    let mut writer_started = false;
    for attempt in 0..5 {
        let to = b.dir.path().join(format!("out-{attempt}"));
        std::fs::create_dir(&to).unwrap();
        let report = restore_with_format(&b.repo, &to.join("vda.qcow2"), true, "qcow2");
        assert_eq!(report.outcome, OutcomeKind::Failed);
        assert!(
            report.errors.iter().any(|e| e.starts_with("verify")),
            "{:?}",
            report.errors
        );
        assert_eq!(report.stages[3].kind, "disk-writer");
        assert_nothing_left(&to);
        if report.stages[3].items_in > 0 {
            writer_started = true;
            break;
        }
    }
    assert!(writer_started, "in 5 attempts the writer never got a chunk");
}

fn qcow2_writer(to: &Path, sync: bool) -> Arc<DiskWriter> {
    Arc::new(
        DiskWriter::new(DiskWriterOptions {
            path: Some(to.to_owned()),
            sync,
            format: ImageFormat::Qcow2,
            ..Default::default()
        })
        .unwrap(),
    )
}

#[test]
fn an_unverified_chunk_fails_a_qcow2_write_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("out.qcow2");
    let disk = synthetic_disk(40 * u64::from(CHUNK), CHUNK);
    let mut input: Vec<Message> = (0..30)
        .map(|i| {
            verified_chunk(
                &disk,
                i,
                Payload::Raw(Bytes::from(vec![i as u8 + 1; CHUNK as usize])),
            )
        })
        .collect();
    let Message::Chunk(mut bad) = input[20].clone() else {
        unreachable!()
    };
    bad.index = 35;
    bad.verified = false;
    input.push(Message::Chunk(bad));
    let harness = Harness {
        workers: 2,
        ..Harness::new(qcow2_writer(&to, true))
    };
    let (report, _) = harness.run(input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        report.errors[0].contains("unverified"),
        "{:?}",
        report.errors
    );
    assert_nothing_left(dir.path());
}

/// A source that sends a few chunks, waits until the writer's `qemu-nbd` runs (so that the
/// interruption comes mid-restore, never before or after), then cancels the run as Ctrl-C would.
struct SendThenCancel {
    disk: Arc<Disk>,
    watch: PathBuf,
}

impl Stage for SendThenCancel {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::VerifiedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        for i in 0..4 {
            let data = Bytes::from(vec![i as u8 + 1; CHUNK as usize]);
            if worker
                .send(verified_chunk(&self.disk, i, Payload::Raw(data)))
                .is_err()
            {
                return Ok(());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while qemu_nbd_naming(&self.watch).is_empty() {
            assert!(Instant::now() < deadline, "the writer started no qemu-nbd");
            std::thread::sleep(Duration::from_millis(5));
        }
        worker.ctx().cancel_token().cancel();
        Ok(())
    }
}

#[test]
fn an_interrupted_qcow2_restore_stops_the_server_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("out.qcow2");
    let disk = synthetic_disk(64 * u64::from(CHUNK), CHUNK);
    let pipeline = Pipeline {
        name: "interrupted".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                Arc::new(SendThenCancel {
                    disk,
                    watch: dir.path().to_owned(),
                }),
                1,
            ),
            placed("writer", qcow2_writer(&to, true), 2),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions {
        cancel: CancelToken::new(),
        ..Default::default()
    });
    assert_eq!(
        report.outcome,
        OutcomeKind::Cancelled,
        "{:?}",
        report.errors
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_nothing_left(dir.path());
}

#[test]
fn a_synthetic_qcow2_restore_keeps_data_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("sparse.qcow2");
    let size = 64 * MIB;
    let disk = synthetic_disk(size, CHUNK);
    let a = Bytes::from(vec![0xa5u8; CHUNK as usize]);
    let b = Bytes::from(noise(CHUNK as usize, 5));
    let last = disk.chunk_count() - 1;
    let input = vec![
        verified_chunk(&disk, 0, Payload::Zero { count: 10 }),
        verified_chunk(&disk, 10, Payload::Raw(a.clone())),
        verified_chunk(&disk, 11, Payload::Zero { count: 500 }),
        verified_chunk(&disk, 511, Payload::Raw(b.clone())),
        verified_chunk(&disk, 512, Payload::Zero { count: last - 512 }),
        verified_chunk(&disk, last, Payload::Zero { count: 1 }),
    ];
    let harness = Harness {
        workers: 2,
        ..Harness::new(qcow2_writer(&to, false))
    };
    let (report, _) = harness.run(input);
    assert_succeeded(&report);

    // The guest-visible bytes, read back by QEMU as raw.
    let raw = dir.path().join("back.raw");
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            to.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, size);
    let at = |i: u64| &data[(i * u64::from(CHUNK)) as usize..((i + 1) * u64::from(CHUNK)) as usize];
    assert_eq!(at(10), &a[..]);
    assert_eq!(at(511), &b[..]);
    assert_eq!(
        data.iter().filter(|&&x| x != 0).count(),
        CHUNK as usize + b.iter().filter(|&&x| x != 0).count()
    );

    // Only the two written clusters hold data.
    let map: serde_json::Value = serde_json::from_slice(&run_tool(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", to.to_str().unwrap()],
    ))
    .unwrap();
    let data_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, 2 * u64::from(CHUNK), "{map}");
}

#[test]
fn an_odd_sized_disk_is_rounded_up_to_whole_sectors_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("odd.qcow2");
    let size = 3 * u64::from(CHUNK) + 100;
    let disk = synthetic_disk(size, CHUNK);
    let tail = Bytes::from(vec![0x5au8; 100]);
    let input = vec![
        verified_chunk(&disk, 0, Payload::Zero { count: 3 }),
        verified_chunk(&disk, 3, Payload::Raw(tail)),
    ];
    let (report, _) = Harness::new(qcow2_writer(&to, true)).run(input);
    assert_succeeded(&report);
    assert_eq!(image_info(&to)["virtual-size"], size.next_multiple_of(512));
    assert!(
        report.warnings.iter().any(|w| w.contains("rounded up")),
        "{:?}",
        report.warnings
    );
}
