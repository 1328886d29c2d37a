//! The `generate` source through the harness: exact stream sizes, every index once whatever the
//! worker count, digests when asked, and the same stream for the same seed.

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ByteSize, Chunk, Message, MessageType, OutcomeKind, Payload, Stage, digest_of,
};
use bytes::Bytes;
use stage_generate::{Generate, GenerateOptions, Mix};

const CHUNK: u64 = 64 * 1024;
/// 100 full chunks and one of 1000 bytes.
const SIZE: u64 = 100 * CHUNK + 1000;

fn options(data: Mix, seed: u64, hashed: bool) -> GenerateOptions {
    GenerateOptions {
        size: ByteSize(SIZE),
        chunk_size: ByteSize(CHUNK),
        data,
        seed,
        hashed,
    }
}

/// Runs the source and returns its chunks by index (each index exactly once).
fn stream(options: GenerateOptions, workers: usize) -> BTreeMap<u64, Chunk> {
    let harness = Harness {
        workers,
        ..Harness::new(Arc::new(Generate::new(options).unwrap()))
    };
    let (report, out) = harness.run(Vec::new());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let source = &report.stages[0];
    assert_eq!(source.items_out, SIZE.div_ceil(CHUNK));
    assert_eq!(source.bytes_out, SIZE);
    let mut chunks = BTreeMap::new();
    for m in out {
        let Message::Chunk(c) = m else {
            panic!("generate emitted a {}", m.variant())
        };
        let index = c.index;
        assert!(
            chunks.insert(index, c).is_none(),
            "chunk {index} emitted twice"
        );
    }
    chunks
}

fn bytes(c: &Chunk) -> &Bytes {
    match &c.payload {
        Payload::Raw(b) => b,
        other => panic!("chunk {}: {other:?}", c.index),
    }
}

#[test]
fn streams_the_exact_size_once_per_index_whatever_the_workers() {
    let one = stream(options(Mix::Mixed, 7, false), 1);
    let three = stream(options(Mix::Mixed, 7, false), 3);
    assert_eq!(
        one.keys().copied().collect::<Vec<_>>(),
        (0..101).collect::<Vec<_>>()
    );
    let total: u64 = one.values().map(|c| bytes(c).len() as u64).sum();
    assert_eq!(total, SIZE);
    assert_eq!(bytes(&one[&100]).len(), 1000);
    for (index, c) in &one {
        assert_eq!(
            bytes(c),
            bytes(&three[index]),
            "chunk {index} depends on the workers"
        );
        assert!(c.digest.is_none() && !c.verified);
        assert_eq!((c.disk.size(), u64::from(c.disk.chunk_size)), (SIZE, CHUNK));
    }
    // The mixed pool has zero chunks and distinct non-zero ones.
    let zero = one
        .values()
        .filter(|c| bytes(c).iter().all(|&b| b == 0))
        .count();
    assert!(zero > 0 && zero < 40, "{zero} zero chunks");
}

#[test]
fn same_seed_same_stream_other_seed_other_stream() {
    let a = stream(options(Mix::Text, 1, true), 2);
    let b = stream(options(Mix::Text, 1, true), 2);
    let c = stream(options(Mix::Text, 2, true), 2);
    let mut differ = 0;
    for (index, chunk) in &a {
        assert_eq!(bytes(chunk), bytes(&b[index]));
        assert_eq!(chunk.digest, b[index].digest);
        if bytes(chunk) != bytes(&c[index]) {
            differ += 1;
        }
    }
    assert_eq!(differ, a.len());
}

#[test]
fn hashed_chunks_carry_the_digest_of_their_bytes() {
    let generate = Generate::new(options(Mix::Random, 3, true)).unwrap();
    assert_eq!(generate.io().output, Some(MessageType::HashedChunk));
    let plain = Generate::new(options(Mix::Random, 3, false)).unwrap();
    assert_eq!(plain.io().output, Some(MessageType::Chunk));
    // The full chunks; the short last one is `the_short_last_chunk_carries_its_own_digest`.
    for (index, c) in stream(options(Mix::Random, 3, true), 2).range(..100) {
        assert_eq!(c.digest, Some(digest_of(bytes(c))), "chunk {index}");
    }
    for (_, c) in stream(options(Mix::Zeros, 3, false), 1) {
        assert!(bytes(&c).iter().all(|&b| b == 0));
    }
}

/// `Generate::chunk` cuts the pool chunk to the disk's last, shorter chunk but keeps the digest
/// of the whole pool chunk: a hashed stream whose size is not a multiple of the chunk size ends
/// with a chunk whose digest is not the BLAKE3 of its bytes (stored so, it would fail every
/// restore's verification).
#[test]
fn the_short_last_chunk_carries_its_own_digest() {
    let chunks = stream(options(Mix::Text, 3, true), 1);
    let last = &chunks[&100];
    assert_eq!(bytes(last).len(), 1000);
    assert_eq!(last.digest, Some(digest_of(bytes(last))));
}
