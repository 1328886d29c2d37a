//! Runs one stage by itself on given input messages: for stage tests and benchmarks, which then
//! measure the stage's runtime value with the real channels and workers around it.

use std::sync::{Arc, Mutex};

use crate::message::{Message, MessageType};
use crate::runtime::{Pipeline, RunOptions, Worker};
use crate::stage::{PlacedStage, Stage, StageIo};
use crate::stats::RunReport;
use crate::{DEFAULT_CHANNEL_CAPACITY, StageError};

/// A source that emits prepared messages.
struct Feed {
    items: Mutex<std::vec::IntoIter<Message>>,
    output: MessageType,
}

impl Stage for Feed {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(self.output),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        loop {
            let next = self.items.lock().unwrap().next();
            let Some(message) = next else {
                return Ok(());
            };
            if worker.send(message).is_err() {
                return Ok(());
            }
        }
    }
}

/// A sink that keeps (or only counts) what it receives.
struct Collect {
    keep: bool,
    items: Arc<Mutex<Vec<Message>>>,
}

impl Stage for Collect {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Any),
            output: None,
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            if self.keep {
                self.items.lock().unwrap().push(message);
            }
        }
        Ok(())
    }
}

/// What to run and how.
pub struct Harness {
    pub stage: Arc<dyn Stage>,
    pub workers: usize,
    /// The repository's location; a path converts with `.into()`.
    pub repository: Option<backflow_repository::Location>,
    /// Keep the output messages (tests) or only count them (benchmarks).
    pub keep_output: bool,
}

impl Harness {
    pub fn new(stage: Arc<dyn Stage>) -> Self {
        Harness {
            stage,
            workers: 1,
            repository: None,
            keep_output: true,
        }
    }

    /// Feeds `input` to the stage (a source ignores it) and returns the run report and the output.
    pub fn run(&self, input: Vec<Message>) -> (RunReport, Vec<Message>) {
        let io = self.stage.io();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stages = Vec::new();
        if let Some(input_type) = io.input {
            stages.push(PlacedStage {
                name: "feed".into(),
                kind: "feed".into(),
                workers: 1,
                capacity: 0,
                stage: Arc::new(Feed {
                    items: Mutex::new(input.into_iter()),
                    output: input_type,
                }),
            });
        }
        stages.push(PlacedStage {
            name: "stage".into(),
            kind: "stage".into(),
            workers: self.workers,
            capacity: DEFAULT_CHANNEL_CAPACITY,
            stage: self.stage.clone(),
        });
        if io.output.is_some() {
            stages.push(PlacedStage {
                name: "collect".into(),
                kind: "collect".into(),
                workers: 1,
                capacity: DEFAULT_CHANNEL_CAPACITY,
                stage: Arc::new(Collect {
                    keep: self.keep_output,
                    items: out.clone(),
                }),
            });
        }
        let pipeline = Pipeline {
            name: "harness".into(),
            repository: self.repository.clone(),
            stages,
            finaliser: None,
        };
        let report = pipeline.run(RunOptions::default());
        let items = std::mem::take(&mut *out.lock().unwrap());
        (report, items)
    }
}
