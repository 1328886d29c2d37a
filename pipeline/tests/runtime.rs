//! Runtime behaviour with test-double stages: backpressure, failure, cancellation, finaliser.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backflow_pipeline::{
    CancelToken, Chunk, Disk, DiskSource, Finaliser, Message, MessageType, Outcome, OutcomeKind,
    Payload, Pipeline, PlacedStage, RunContext, RunOptions, SizeOnly, Stage, StageError, StageIo,
    Worker,
};

fn disk() -> Arc<Disk> {
    Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: "vm".into(),
            name: "d".into(),
            location: "test".into(),
            reader: Arc::new(SizeOnly(1 << 30)),
            tracking: None,
            definition: None,
        }),
        chunk_size: 65536,
        parent: None,
    })
}

/// Emits `count` small chunks, counting what it managed to send.
struct Source {
    count: u64,
    sent: Arc<AtomicU64>,
}

impl Stage for Source {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::Chunk),
        }
    }
    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let disk = disk();
        for index in 0..self.count {
            let chunk = Chunk {
                disk: disk.clone(),
                index,
                digest: None,
                verified: false,
                payload: Payload::Raw(bytes::Bytes::from(vec![index as u8; 16])),
            };
            if worker.send(Message::Chunk(chunk)).is_err() {
                return Ok(());
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Passes items on; fails on item `fail_at` if set.
struct Pass {
    fail_at: Option<u64>,
}

impl Stage for Pass {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Chunk),
            output: Some(MessageType::Chunk),
        }
    }
    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(m) = worker.recv() {
            if let (Some(at), Message::Chunk(c)) = (self.fail_at, &m)
                && c.index == at
            {
                return Err(StageError::Corrupt(format!("item {at} is bad")));
            }
            if worker.send(m).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Takes one item, then waits for `open` before taking the rest; records what it got and
/// whether `finish` ran.
#[derive(Default)]
struct Sink {
    open: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<u64>>>,
    finished: Arc<AtomicBool>,
}

impl Stage for Sink {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Chunk),
            output: None,
        }
    }
    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(m) = worker.recv() {
            while !self.open.load(Ordering::SeqCst) {
                if worker.is_cancelled() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Message::Chunk(c) = m {
                self.got.lock().unwrap().push(c.index);
            }
        }
        Ok(())
    }
    fn finish(&self, _ctx: &RunContext) -> Result<(), StageError> {
        self.finished.store(true, Ordering::SeqCst);
        Ok(())
    }
}

struct RecordOutcome(Arc<Mutex<Option<Outcome>>>);

impl Finaliser for RecordOutcome {
    fn finalise(&self, _ctx: &RunContext, outcome: &Outcome) -> Result<(), StageError> {
        *self.0.lock().unwrap() = Some(outcome.clone());
        Ok(())
    }
}

fn placed(name: &str, capacity: usize, stage: impl Stage) -> PlacedStage {
    PlacedStage {
        name: name.into(),
        kind: name.into(),
        workers: 1,
        capacity,
        stage: Arc::new(stage),
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_blocked_sink_stops_the_source_after_exactly_the_capacities() {
    const C1: usize = 3;
    const C2: usize = 5;
    const N: u64 = 100;
    let sent = Arc::new(AtomicU64::new(0));
    let sink = Sink::default();
    let (open, got, finished) = (sink.open.clone(), sink.got.clone(), sink.finished.clone());
    let outcome = Arc::new(Mutex::new(None));
    let pipeline = Pipeline {
        name: "backpressure".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                0,
                Source {
                    count: N,
                    sent: sent.clone(),
                },
            ),
            placed("pass", C1, Pass { fail_at: None }),
            placed("sink", C2, sink),
        ],
        finaliser: Some(Arc::new(RecordOutcome(outcome.clone()))),
    };
    std::thread::scope(|s| {
        let run = s.spawn(|| pipeline.run(RunOptions::default()));
        // Room for: C1 queued before `pass`, one in `pass`'s hands, C2 queued before the sink,
        // one in the sink's hands.
        let expected = (C1 + 1 + C2 + 1) as u64;
        wait_until("the pipeline to fill", || {
            sent.load(Ordering::SeqCst) >= expected
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            sent.load(Ordering::SeqCst),
            expected,
            "the source went on past the capacities"
        );
        assert!(got.lock().unwrap().is_empty());
        open.store(true, Ordering::SeqCst);
        let report = run.join().unwrap();
        assert_eq!(report.outcome, OutcomeKind::Succeeded);
        let mut got = got.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            (0..N).collect::<Vec<_>>(),
            "items were lost or duplicated"
        );
        assert!(finished.load(Ordering::SeqCst));
        assert_eq!(*outcome.lock().unwrap(), Some(Outcome::Succeeded));
        let source = &report.stages[0];
        assert_eq!(source.items_out, N);
        assert!(source.backpressured_seconds > 0.2, "{source:?}");
        assert_eq!(report.stages[2].items_in, N);
        // The channels were seen full (less the item just taken) and never above capacity.
        for (stage, capacity) in [(1, C1), (2, C2)] {
            let s = &report.stages[stage];
            assert_eq!(s.queue_capacity, capacity);
            assert!(
                s.queue_max as usize >= capacity - 1 && s.queue_max as usize <= capacity,
                "{s:?}"
            );
            assert!(s.queue_fill > 0.0 && s.queue_fill <= 1.0, "{s:?}");
        }
    });
}

#[test]
fn a_failing_stage_fails_the_run_skips_finish_and_runs_cleanup() {
    let sink = Sink {
        open: Arc::new(AtomicBool::new(true)),
        ..Default::default()
    };
    let finished = sink.finished.clone();
    let outcome = Arc::new(Mutex::new(None));
    let pipeline = Pipeline {
        name: "failing".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                0,
                Source {
                    count: 1000,
                    sent: Arc::default(),
                },
            ),
            placed("pass", 4, Pass { fail_at: Some(10) }),
            placed("sink", 4, sink),
        ],
        finaliser: Some(Arc::new(RecordOutcome(outcome.clone()))),
    };
    let report = pipeline.run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert_eq!(report.errors, vec!["pass: item 10 is bad".to_owned()]);
    assert!(
        !finished.load(Ordering::SeqCst),
        "a sink committed after a failure"
    );
    assert!(matches!(*outcome.lock().unwrap(), Some(Outcome::Failed(_))));
}

#[test]
fn cancelling_stops_every_stage_and_commits_nothing() {
    let sink = Sink::default(); // blocks forever unless cancelled
    let finished = sink.finished.clone();
    let outcome = Arc::new(Mutex::new(None));
    let pipeline = Pipeline {
        name: "cancel".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                0,
                Source {
                    count: u64::MAX,
                    sent: Arc::default(),
                },
            ),
            placed("pass", 4, Pass { fail_at: None }),
            placed("sink", 4, sink),
        ],
        finaliser: Some(Arc::new(RecordOutcome(outcome.clone()))),
    };
    let cancel = CancelToken::new();
    let trigger = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        trigger.cancel();
    });
    let report = pipeline.run(RunOptions {
        cancel,
        on_progress: None,
    });
    assert_eq!(report.outcome, OutcomeKind::Cancelled);
    assert!(!finished.load(Ordering::SeqCst));
    assert_eq!(*outcome.lock().unwrap(), Some(Outcome::Cancelled));
}

#[test]
fn cleanup_actions_run_newest_first_with_the_outcome() {
    struct Registers(Arc<Mutex<Vec<String>>>);
    impl Stage for Registers {
        fn io(&self) -> StageIo {
            StageIo {
                input: None,
                output: None,
            }
        }
        fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
            for name in ["first", "second"] {
                let log = self.0.clone();
                worker.ctx().on_cleanup(
                    name,
                    Box::new(move |outcome| {
                        log.lock().unwrap().push(format!("{name}:{outcome:?}"));
                        Ok(())
                    }),
                );
            }
            Ok(())
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline {
        name: "cleanup".into(),
        repository: None,
        stages: vec![placed("only", 0, Registers(log.clone()))],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Succeeded);
    assert_eq!(
        *log.lock().unwrap(),
        vec!["second:Succeeded", "first:Succeeded"]
    );
}

#[test]
fn several_workers_share_the_input_and_statistics_add_up() {
    let sink = Sink {
        open: Arc::new(AtomicBool::new(true)),
        ..Default::default()
    };
    let got = sink.got.clone();
    let mut pass = placed("pass", 2, Pass { fail_at: None });
    pass.workers = 4;
    let pipeline = Pipeline {
        name: "workers".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                0,
                Source {
                    count: 500,
                    sent: Arc::default(),
                },
            ),
            pass,
            placed("sink", 2, sink),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Succeeded);
    assert_eq!(got.lock().unwrap().len(), 500);
    assert_eq!(report.stages[1].items_in, 500);
    assert_eq!(report.stages[1].bytes_in, 500 * 16);
    assert_eq!(report.stages[1].bytes_out, 500 * 16);
}

/// A finaliser whose preparation fails, recording the outcome it is finally given.
struct RefuseToStart(Arc<Mutex<Option<Outcome>>>);

impl Finaliser for RefuseToStart {
    fn prepare(&self, _ctx: &RunContext) -> Result<(), StageError> {
        Err(StageError::Config("the target name is taken".into()))
    }

    fn finalise(&self, _ctx: &RunContext, outcome: &Outcome) -> Result<(), StageError> {
        *self.0.lock().unwrap() = Some(outcome.clone());
        Ok(())
    }
}

#[test]
fn a_failed_preparation_runs_no_stage_and_still_finalises() {
    let sent = Arc::new(AtomicU64::new(0));
    let outcome = Arc::new(Mutex::new(None));
    let pipeline = Pipeline {
        name: "refused".into(),
        repository: None,
        stages: vec![
            placed(
                "source",
                0,
                Source {
                    count: 10,
                    sent: sent.clone(),
                },
            ),
            placed("sink", 4, Sink::default()),
        ],
        finaliser: Some(Arc::new(RefuseToStart(outcome.clone()))),
    };
    let report = pipeline.run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert_eq!(
        report.errors,
        vec!["before the run: the target name is taken".to_owned()]
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0, "no stage ran");
    assert!(matches!(*outcome.lock().unwrap(), Some(Outcome::Failed(_))));
}
