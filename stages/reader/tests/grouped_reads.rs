//! The reader reads a data extent a group of chunks at a time through
//! `BlockSource::read_chunks_at`: a source that overrides it (as NBD does, to pipeline requests)
//! is called once per group, and the chunks, zero detection and `source_bytes_read` are the same
//! as through the default, chunk after chunk.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    BlockSource, Disk, DiskSource, Extent, ExtentClass, Message, OutcomeKind, Payload, RunReport,
};
use stage_reader::{READ_GROUP_CHUNKS, Reader, ReaderOptions, group_chunks};

const CHUNK: u32 = 64 << 10;
/// 40 whole chunks and a 4 KiB tail.
const SIZE: u64 = 40 * CHUNK as u64 + 4096;

/// A disk in memory: chunks 3, 4 and 20 are zeros, the rest a seeded xorshift stream.
fn disk_bytes() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data: Vec<u8> = (0..SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    for zero in [3u64, 4, 20] {
        let at = (zero * u64::from(CHUNK)) as usize;
        data[at..at + CHUNK as usize].fill(0);
    }
    data
}

fn read_from(data: &[u8], buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let start = usize::try_from(offset).unwrap();
    let slice = data
        .get(start..start + buf.len())
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    buf.copy_from_slice(slice);
    Ok(())
}

/// Reads chunk by chunk: `read_chunks_at` is the trait's default.
#[derive(Debug)]
struct PerChunk {
    data: Vec<u8>,
    exact_calls: AtomicUsize,
}

impl BlockSource for PerChunk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.exact_calls.fetch_add(1, Ordering::SeqCst);
        read_from(&self.data, buf, offset)
    }

    fn allocated(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// Overrides `read_chunks_at` and records each call as `(offset, buffer lengths)`.
#[derive(Debug)]
struct Grouped {
    data: Vec<u8>,
    exact_calls: AtomicUsize,
    calls: Mutex<Vec<(u64, Vec<usize>)>>,
}

impl BlockSource for Grouped {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.exact_calls.fetch_add(1, Ordering::SeqCst);
        read_from(&self.data, buf, offset)
    }

    fn read_chunks_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> std::io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push((offset, bufs.iter().map(|b| b.len()).collect()));
        let mut at = offset;
        for buf in bufs.iter_mut() {
            read_from(&self.data, buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }

    fn allocated(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// What one chunk message says, comparable across runs.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Raw(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Data chunks 1..38 (groups of 16, 16 and 5), a zero run 38..40, then the two last chunks
/// (the tail short) as one data extent.
fn read_all(source: Arc<dyn BlockSource>) -> (RunReport, Vec<Seen>) {
    let disk = Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: "web01".into(),
            name: "vda".into(),
            location: PathBuf::from("memory"),
            reader: source,
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK,
        parent: None,
    });
    let extent = |first, count, class| {
        Message::Extent(Extent {
            disk: disk.clone(),
            first,
            count,
            class,
        })
    };
    let input = vec![
        extent(1, 37, ExtentClass::Data),
        extent(38, 2, ExtentClass::Zero),
        extent(40, 1, ExtentClass::Data),
    ];
    let (report, out) = Harness::new(Arc::new(Reader::new(ReaderOptions {}).unwrap())).run(input);
    let seen = out
        .into_iter()
        .map(|m| match m {
            Message::Chunk(c) => match c.payload {
                Payload::Raw(bytes) => Seen::Raw(c.index, bytes.to_vec()),
                Payload::Zero { count } => Seen::Zero(c.index, count),
                other => panic!("unexpected payload {other:?}"),
            },
            other => panic!("reader emitted a {} message", other.variant()),
        })
        .collect();
    (report, seen)
}

#[test]
fn an_overriding_source_is_called_once_per_group_with_the_same_chunks() {
    assert_eq!(group_chunks(CHUNK), READ_GROUP_CHUNKS);
    let per_chunk = Arc::new(PerChunk {
        data: disk_bytes(),
        exact_calls: AtomicUsize::new(0),
    });
    let grouped = Arc::new(Grouped {
        data: disk_bytes(),
        exact_calls: AtomicUsize::new(0),
        calls: Mutex::new(Vec::new()),
    });

    let (report_one, one) = read_all(per_chunk.clone());
    let (report_grouped, many) = read_all(grouped.clone());
    for report in [&report_one, &report_grouped] {
        assert_eq!(
            report.outcome,
            OutcomeKind::Succeeded,
            "{:?}",
            report.errors
        );
    }

    // The default reads chunk by chunk: 37 + 1 calls.
    assert_eq!(per_chunk.exact_calls.load(Ordering::SeqCst), 38);
    // The override: one call per group, each chunk its own buffer, nothing through read_exact_at.
    assert_eq!(grouped.exact_calls.load(Ordering::SeqCst), 0);
    let chunk = CHUNK as usize;
    assert_eq!(
        *grouped.calls.lock().unwrap(),
        vec![
            (u64::from(CHUNK), vec![chunk; 16]),
            (17 * u64::from(CHUNK), vec![chunk; 16]),
            (33 * u64::from(CHUNK), vec![chunk; 5]),
            (40 * u64::from(CHUNK), vec![4096]),
        ]
    );

    assert_eq!(one, many);
    assert_eq!(
        report_one.source_bytes_read,
        report_grouped.source_bytes_read
    );
    assert_eq!(
        report_grouped.source_bytes_read,
        37 * u64::from(CHUNK) + 4096
    );
    // Zero detection stays per chunk: the zero chunks inside a group are single zero chunks.
    let data = disk_bytes();
    let mut expected = Vec::new();
    for index in 1..38u64 {
        expected.push(if [3, 4, 20].contains(&index) {
            Seen::Zero(index, 1)
        } else {
            let at = (index * u64::from(CHUNK)) as usize;
            Seen::Raw(index, data[at..at + chunk].to_vec())
        });
    }
    expected.push(Seen::Zero(38, 2));
    expected.push(Seen::Raw(40, data[40 * chunk..].to_vec()));
    assert_eq!(many, expected);
}

#[test]
fn large_chunks_make_smaller_groups() {
    assert_eq!(group_chunks(128 << 10), 16);
    assert_eq!(group_chunks(1 << 20), 8);
    assert_eq!(group_chunks(4 << 20), 2);
    assert_eq!(group_chunks(16 << 20), 1);
}
