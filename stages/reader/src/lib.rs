//! Reader stage: reads the chunks of `Data` extents from the disk and recognises all-zero chunks.
//!
//! Extents arrive chunk-aligned from a changed-block map, so each chunk is read exactly once and
//! several workers can read one disk in parallel. Zero and unchanged extents are passed on as
//! one data-less message per run: their cost does not grow with their size.
//!
//! A data extent is read a group of chunks at a time ([`group_chunks`]) with one
//! [`BlockSource::read_chunks_at`](backflow_pipeline::BlockSource::read_chunks_at) call, each chunk
//! in its own buffer: a source that can pipeline requests (NBD) pays one round trip per group
//! instead of one per chunk, and the chunks still leave as separate messages.

use std::sync::atomic::Ordering;

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, ExtentClass, InvalidOption, Message, MessageType, Payload, Stage, StageError, StageIo,
    Work, Worker, stage::unexpected,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "reader";

#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct ReaderOptions {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "reads chunk-aligned extents into chunks; all-zero chunks become zero markers, never stored",
    input: Some(MessageType::Extent),
    output: Some(MessageType::Chunk),
    repository: RepositoryUse::No,
    options: option_docs::<ReaderOptions>,
    build: Build::Stage(|options| build_stage(options, Reader::new)),
};

#[derive(Debug, Default)]
pub struct Reader;

impl Reader {
    pub fn new(_options: ReaderOptions) -> Result<Self, InvalidOption> {
        Ok(Reader)
    }
}

/// Most chunks read by one call: enough to keep an NBD connection's requests in flight (8 by
/// default) busy twice over.
pub const READ_GROUP_CHUNKS: u64 = 16;

/// Most bytes read by one call, so that large chunk sizes do not make a worker hold hundreds of
/// MiB: a group is at least one chunk, and at most this or [`READ_GROUP_CHUNKS`] chunks.
pub const READ_GROUP_BYTES: u64 = 8 << 20;

/// How many chunks of `chunk_size` one read call takes: what bounds a worker's buffers to about
/// `READ_GROUP_BYTES` (or one chunk, if larger).
pub fn group_chunks(chunk_size: u32) -> u64 {
    (READ_GROUP_BYTES / u64::from(chunk_size).max(1)).clamp(1, READ_GROUP_CHUNKS)
}

/// Whether every byte is zero. Folding 64-byte blocks with OR lets the compiler vectorise it.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

impl Stage for Reader {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Extent),
            output: Some(MessageType::Chunk),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            let Message::Extent(extent) = message else {
                return Err(unexpected(KIND, &message));
            };
            let disk = &extent.disk;
            let runless = |payload| Chunk {
                disk: disk.clone(),
                index: extent.first,
                digest: None,
                verified: false,
                payload,
            };
            let count = extent.count;
            match extent.class {
                ExtentClass::Zero => {
                    if worker
                        .send(Message::Chunk(runless(Payload::Zero { count })))
                        .is_err()
                    {
                        return Ok(());
                    }
                    continue;
                }
                ExtentClass::Unchanged => {
                    let chunk = runless(Payload::Unchanged { count });
                    if worker.send(Message::Chunk(chunk)).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                ExtentClass::Data => {}
            }
            let group = group_chunks(disk.chunk_size);
            let end = extent.first + extent.count;
            let mut first = extent.first;
            while first < end {
                let last = end.min(first + group);
                let mut bufs: Vec<Vec<u8>> = (first..last)
                    .map(|index| vec![0u8; disk.chunk_len(index) as usize])
                    .collect();
                let offset = first * u64::from(disk.chunk_size);
                let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
                disk.source
                    .reader
                    .read_chunks_at(&mut slices, offset)
                    .map_err(|e| {
                        StageError::io(
                            format!("reading disk {} at offset {offset}", disk.name()),
                            e,
                        )
                    })?;
                for (index, buf) in (first..last).zip(bufs) {
                    worker
                        .ctx()
                        .source_bytes_read
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    let payload = if is_zero(&buf) {
                        Payload::Zero { count: 1 }
                    } else {
                        Payload::Raw(Bytes::from(buf))
                    };
                    let chunk = Chunk {
                        disk: disk.clone(),
                        index,
                        digest: None,
                        verified: false,
                        payload,
                    };
                    if worker.send(Message::Chunk(chunk)).is_err() {
                        return Ok(());
                    }
                }
                first = last;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[17] = 0x80;
        assert!(!is_zero(&v));
    }
}
