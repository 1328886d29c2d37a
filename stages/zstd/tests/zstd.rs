//! The compressor on the chunks of a real image and on random data: every encoded chunk decodes
//! with the repository's decoder to exactly its input, and incompressible data is stored raw.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ByteSize, Chunk, Codec, Disk, DiskSource, Message, OutcomeKind, Payload, SizeOnly, digest_of,
};
use bytes::Bytes;
use stage_generate::{Generate, GenerateOptions, Mix};
use stage_zstd::{Zstd, ZstdOptions};

const CHUNK: u32 = 64 * 1024;
/// 8 MiB and a partial last chunk.
const IMAGE_SIZE: u64 = (8 << 20) + 3 * 4096;

/// The non-zero chunks of a generated image, as hashed chunks.
fn image_chunks() -> (Arc<Disk>, Vec<Chunk>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&path, IMAGE_SIZE, 21).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let disk = Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: "web01".into(),
            name: "vda".into(),
            location: PathBuf::from("vda.raw"),
            reader: Arc::new(SizeOnly(IMAGE_SIZE)),
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK,
        parent: None,
    });
    let mut chunks = Vec::new();
    for index in 0..disk.chunk_count() {
        let mut buf = vec![0u8; disk.chunk_len(index) as usize];
        file.read_exact_at(&mut buf, index * u64::from(CHUNK))
            .unwrap();
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        chunks.push(Chunk {
            disk: disk.clone(),
            index,
            digest: Some(digest_of(&buf)),
            verified: false,
            payload: Payload::Raw(Bytes::from(buf)),
        });
    }
    (disk, chunks)
}

fn compress(level: i32, input: Vec<Chunk>) -> HashMap<u64, Chunk> {
    let harness = Harness {
        workers: 2,
        ..Harness::new(Arc::new(Zstd::new(ZstdOptions { level }).unwrap()))
    };
    let sent = input.len();
    let (report, out) = harness.run(input.into_iter().map(Message::Chunk).collect());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert_eq!(out.len(), sent);
    out.into_iter()
        .map(|m| match m {
            Message::Chunk(c) => (c.index, c),
            other => panic!("zstd emitted a {}", other.variant()),
        })
        .collect()
}

#[test]
fn every_encoded_chunk_of_an_image_decodes_to_its_input() {
    let (disk, chunks) = image_chunks();
    assert!(chunks.len() > 50);
    let inputs: HashMap<u64, Chunk> = chunks.iter().map(|c| (c.index, c.clone())).collect();
    for level in [1, -7, 6] {
        let out = compress(level, chunks.clone());
        let (mut zstd, mut raw, mut stored, mut plain) = (0, 0, 0u64, 0u64);
        for (index, c) in &out {
            let Payload::Raw(input) = &inputs[index].payload else {
                unreachable!()
            };
            assert_eq!(c.digest, inputs[index].digest, "the digest travels along");
            assert!(Arc::ptr_eq(&c.disk, &disk));
            let Payload::Encoded {
                codec,
                data,
                raw_len,
            } = &c.payload
            else {
                panic!("chunk {index} was not encoded: {:?}", c.payload);
            };
            assert_eq!(*raw_len as usize, input.len());
            let decoded = backflow_repository::decode(*codec, data, *raw_len).unwrap();
            assert_eq!(&decoded[..], &input[..], "level {level}, chunk {index}");
            match codec {
                Codec::Zstd => {
                    assert!(
                        data.len() < input.len(),
                        "zstd is kept only when it shrinks"
                    );
                    zstd += 1;
                }
                Codec::None => {
                    assert_eq!(data, input);
                    raw += 1;
                }
                Codec::Lz4 => panic!("zstd stored chunk {index} as lz4"),
            }
            stored += data.len() as u64;
            plain += input.len() as u64;
        }
        // The fixture mixes text and binary (compressible) with compressed and random content.
        assert!(zstd > 0 && raw > 0, "level {level}: {zstd} zstd, {raw} raw");
        assert!(
            stored < plain * 9 / 10,
            "level {level}: {stored} of {plain}"
        );
    }
}

#[test]
fn random_data_is_stored_raw_and_runs_pass_through() {
    let generate = Generate::new(GenerateOptions {
        size: ByteSize(40 * u64::from(CHUNK)),
        chunk_size: ByteSize(u64::from(CHUNK)),
        data: Mix::Random,
        seed: 4,
        hashed: true,
    })
    .unwrap();
    let mut input: Vec<Chunk> = (0..generate.chunk_count())
        .map(|i| generate.chunk(i))
        .collect();
    let disk = input[0].disk.clone();
    let runless = |index, payload| Chunk {
        disk: disk.clone(),
        index,
        digest: None,
        verified: false,
        payload,
    };
    input.push(runless(40, Payload::Zero { count: 3 }));
    input.push(runless(43, Payload::Unchanged { count: 2 }));
    let mut known = runless(45, Payload::Known);
    known.digest = Some(digest_of(b"known"));
    input.push(known);
    let expected: HashMap<u64, Chunk> = input.iter().map(|c| (c.index, c.clone())).collect();

    let out = compress(1, input);
    for index in 0..40 {
        let Payload::Raw(plain) = &expected[&index].payload else {
            unreachable!()
        };
        match &out[&index].payload {
            Payload::Encoded {
                codec: Codec::None,
                data,
                raw_len,
            } => {
                assert_eq!(data, plain);
                assert_eq!(*raw_len, CHUNK);
            }
            other => panic!("random chunk {index} should be stored raw: {other:?}"),
        }
    }
    assert!(matches!(out[&40].payload, Payload::Zero { count: 3 }));
    assert!(matches!(out[&43].payload, Payload::Unchanged { count: 2 }));
    assert!(matches!(out[&45].payload, Payload::Known));
    assert_eq!(out[&45].digest, Some(digest_of(b"known")));
}
