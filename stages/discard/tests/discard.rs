//! The `discard` sink, through the harness and behind the real `generate` source: it takes every
//! message of any kind, counts every byte, and keeps nothing.

use std::path::PathBuf;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ByteSize, Disk, DiskSource, Extent, ExtentClass, Message, OutcomeKind, Pipeline, PlacedStage,
    RunOptions, SizeOnly,
};
use stage_discard::{Discard, DiscardOptions};
use stage_generate::{Generate, GenerateOptions, Mix};

const CHUNK: u64 = 64 * 1024;
const SIZE: u64 = 300 * CHUNK + 12345;

fn generate(seed: u64) -> Generate {
    Generate::new(GenerateOptions {
        size: ByteSize(SIZE),
        chunk_size: ByteSize(CHUNK),
        data: Mix::Mixed,
        seed,
        hashed: false,
    })
    .unwrap()
}

#[test]
fn counts_every_byte_of_a_generated_stream() {
    for (gen_workers, discard_workers) in [(1, 1), (2, 3)] {
        let pipeline = Pipeline {
            name: "generate-discard".into(),
            repository: None,
            stages: vec![
                PlacedStage {
                    name: "generate".into(),
                    kind: "generate".into(),
                    workers: gen_workers,
                    capacity: 0,
                    stage: Arc::new(generate(5)),
                },
                PlacedStage {
                    name: "discard".into(),
                    kind: "discard".into(),
                    workers: discard_workers,
                    capacity: 4,
                    stage: Arc::new(Discard::new(DiscardOptions {}).unwrap()),
                },
            ],
            finaliser: None,
        };
        let report = pipeline.run(RunOptions::default());
        assert_eq!(
            report.outcome,
            OutcomeKind::Succeeded,
            "{:?}",
            report.errors
        );
        let chunks = SIZE.div_ceil(CHUNK);
        let (source, sink) = (&report.stages[0], &report.stages[1]);
        assert_eq!((source.items_out, source.bytes_out), (chunks, SIZE));
        assert_eq!((sink.items_in, sink.bytes_in), (chunks, SIZE));
        assert_eq!(sink.bytes_out, SIZE, "discard counts what it consumed");
        assert_eq!(sink.items_out, 0);
    }
}

#[test]
fn takes_messages_of_every_kind() {
    let source = Arc::new(DiskSource {
        vm: "m".into(),
        name: "d".into(),
        location: PathBuf::from("d"),
        reader: Arc::new(SizeOnly(CHUNK)),
        tracking: None,
        definition: None,
    });
    let disk = Arc::new(Disk {
        source: source.clone(),
        chunk_size: CHUNK as u32,
        parent: None,
    });
    let g = generate(1);
    let input = vec![
        Message::Disk(source),
        Message::Extent(Extent {
            disk,
            first: 0,
            count: 1,
            class: ExtentClass::Data,
        }),
        Message::Chunk(g.chunk(0)),
        Message::Chunk(g.chunk(1)),
    ];
    let expected: u64 = input.iter().map(Message::payload_len).sum();
    assert_eq!(expected, 2 * CHUNK);
    let (report, out) = Harness::new(Arc::new(Discard::new(DiscardOptions {}).unwrap())).run(input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert!(out.is_empty());
    let sink = report.stages.iter().find(|s| s.name == "stage").unwrap();
    assert_eq!(
        (sink.items_in, sink.bytes_in, sink.bytes_out),
        (4, expected, expected)
    );
}
