//! Reader stage: reads the chunks of `Data` extents from the disk and recognises all-zero chunks.
//!
//! Extents arrive chunk-aligned from a changed-block map, so each chunk is read exactly once and
//! several workers can read one disk in parallel. Zero and unchanged extents are passed on as
//! one data-less message per run: their cost does not grow with their size.

use std::sync::atomic::Ordering;

use backflow_pipeline::{
    Chunk, ExtentClass, InvalidOption, Message, MessageType, Payload, Stage, StageError, StageIo,
    Work, Worker, stage::unexpected,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "reader";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderOptions {}

pub const OPTION_DOCS: &[(&str, &str)] = &[];

#[derive(Debug, Default)]
pub struct Reader;

impl Reader {
    pub fn new(_options: ReaderOptions) -> Result<Self, InvalidOption> {
        Ok(Reader)
    }
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
            for index in extent.first..extent.first + extent.count {
                let len = disk.chunk_len(index) as usize;
                let mut buf = vec![0u8; len];
                let offset = index * u64::from(disk.chunk_size);
                disk.source
                    .reader
                    .read_exact_at(&mut buf, offset)
                    .map_err(|e| {
                        StageError::io(
                            format!("reading disk {} at offset {offset}", disk.name()),
                            e,
                        )
                    })?;
                worker
                    .ctx()
                    .source_bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
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
