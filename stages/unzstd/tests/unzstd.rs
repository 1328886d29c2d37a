//! The decompressor on chunks read from a real repository: plaintext equal to the image, digests
//! passed along, and a damaged frame fails the run naming the disk, chunk and offset.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{Chunk, Codec, Message, OutcomeKind, Payload, RunReport, digest_of};
use backflow_repository::Repository;
use stage_repo_reader::{RepoReader, RepoReaderOptions};
use stage_unzstd::{Unzstd, UnzstdOptions};

use backflow_testkit::backup_files as backup;

const CHUNK: u32 = 64 * 1024;
/// 8 MiB and a partial last chunk.
const IMAGE_SIZE: u64 = (8 << 20) + 6 * 4096;

/// A backed-up image and the chunks the repository reader emits for it.
fn stored_chunks(dir: &Path) -> (Vec<u8>, Vec<Message>) {
    let repo_path = dir.join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 41).unwrap();
    let (id, _) = backup(&repo, "web01", &[("vda", &image)]);
    let harness = Harness {
        repository: Some(repo_path.into()),
        ..Harness::new(Arc::new(
            RepoReader::new(RepoReaderOptions {
                snapshot: id,
                disk: String::new(),
                ..Default::default()
            })
            .unwrap(),
        ))
    };
    let (report, out) = harness.run(Vec::new());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    (std::fs::read(&image).unwrap(), out)
}

fn unzstd(input: Vec<Message>) -> (RunReport, Vec<Chunk>) {
    let harness = Harness {
        workers: 2,
        ..Harness::new(Arc::new(Unzstd::new(UnzstdOptions {}).unwrap()))
    };
    let (report, out) = harness.run(input);
    let chunks = out
        .into_iter()
        .map(|m| match m {
            Message::Chunk(c) => c,
            other => panic!("unzstd emitted a {}", other.variant()),
        })
        .collect();
    (report, chunks)
}

fn encoded(m: &Message) -> Option<(&Chunk, Codec)> {
    match m {
        Message::Chunk(c) => match &c.payload {
            Payload::Encoded { codec, .. } => Some((c, *codec)),
            _ => None,
        },
        _ => None,
    }
}

#[test]
fn stored_chunks_decode_to_the_image_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (image, input) = stored_chunks(dir.path());
    let codecs: HashSet<Codec> = input.iter().filter_map(encoded).map(|(_, c)| c).collect();
    assert_eq!(
        codecs.len(),
        2,
        "the image has both compressible and incompressible chunks"
    );
    let sent = input.len();

    let (report, out) = unzstd(input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert_eq!(out.len(), sent);
    let mut zero_chunks = 0;
    let mut data_chunks = 0;
    for c in &out {
        match &c.payload {
            Payload::Raw(plain) => {
                let offset = c.offset() as usize;
                assert_eq!(plain.len(), c.disk.chunk_len(c.index) as usize);
                assert_eq!(
                    &plain[..],
                    &image[offset..offset + plain.len()],
                    "chunk {}",
                    c.index
                );
                // The digest travels unchecked; here it is right because the data is intact.
                assert_eq!(c.digest, Some(digest_of(plain)));
                assert!(!c.verified);
                data_chunks += 1;
            }
            Payload::Zero { count } => zero_chunks += count,
            other => panic!("chunk {}: {other:?}", c.index),
        }
    }
    assert_eq!(
        data_chunks + zero_chunks,
        IMAGE_SIZE.div_ceil(u64::from(CHUNK))
    );
}

#[test]
fn a_damaged_frame_fails_naming_disk_chunk_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut input) = stored_chunks(dir.path());
    let at = input
        .iter()
        .position(|m| matches!(encoded(m), Some((_, Codec::Zstd))))
        .unwrap();
    let Message::Chunk(c) = &mut input[at] else {
        unreachable!()
    };
    let (index, offset) = (c.index, c.offset());
    if let Payload::Encoded { data, .. } = &mut c.payload {
        *data = data.slice(..data.len() / 2);
    }
    let (report, _) = unzstd(input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    let error = &report.errors[0];
    let expected = format!("disk vda, chunk {index} at offset {offset}");
    assert!(error.contains(&expected), "{expected:?} not in {error}");
}

#[test]
fn a_raw_chunk_of_the_wrong_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut input) = stored_chunks(dir.path());
    let at = input
        .iter()
        .position(|m| matches!(encoded(m), Some((_, Codec::None))))
        .unwrap();
    let Message::Chunk(c) = &mut input[at] else {
        unreachable!()
    };
    let index = c.index;
    if let Payload::Encoded { raw_len, .. } = &mut c.payload {
        *raw_len -= 1;
    }
    let (report, out) = unzstd(input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        out.iter().all(|c| c.index != index),
        "the bad chunk went on"
    );
    assert!(
        report.errors[0].contains(&format!("chunk {index} ")),
        "{:?}",
        report.errors
    );
}
