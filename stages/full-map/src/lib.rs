//! Changed-block map `full`: plans a full read of each disk.
//!
//! Every chunk that overlaps an allocated range is read; chunks entirely inside holes are marked
//! zero without reading. The planning, the chunk size and the parent lookup are
//! [`backflow_planner`]'s, shared with the incremental maps.

use std::sync::Arc;

use backflow_pipeline::describe::{Build, KindRow, RepositoryUse, build_stage, option_docs};
use backflow_pipeline::{
    Disk, InvalidOption, Message, MessageType, ParentChunks, Stage, StageError, StageIo, Work,
    Worker, stage::unexpected,
};
use backflow_planner::{MapSettings, OpenedDisk, plan_chunks, send_plan};

pub use backflow_planner::MapOptions as FullMapOptions;

pub const KIND: &str = "full";

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "changed-block map: every allocated range (SEEK_DATA/SEEK_HOLE, NBD block status); holes cost nothing; attaches the parent snapshot",
    input: Some(MessageType::Disk),
    output: Some(MessageType::Extent),
    repository: RepositoryUse::No,
    options: option_docs::<FullMapOptions>,
    build: Build::Stage(|options| build_stage(options, FullMap::new)),
};

#[derive(Debug)]
pub struct FullMap {
    settings: MapSettings,
}

impl FullMap {
    pub fn new(options: FullMapOptions) -> Result<Self, InvalidOption> {
        Ok(FullMap {
            settings: MapSettings::new(options)?,
        })
    }
}

impl Stage for FullMap {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Disk),
            output: Some(MessageType::Extent),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            let Message::Disk(source) = message else {
                return Err(unexpected(KIND, &message));
            };
            let OpenedDisk {
                chunk_size,
                parent,
                allocated,
            } = self.settings.open(worker, &source)?;
            let disk = Arc::new(Disk {
                source: source.clone(),
                chunk_size,
                parent: parent.map(|p| p as Arc<dyn ParentChunks>),
            });
            tracing::debug!(disk = %source.name, size = disk.size(), chunk_size, "Planning a full read.");
            let plan = plan_chunks(
                disk.size(),
                chunk_size,
                allocated.as_deref(),
                self.settings.max_extent_chunks,
            );
            if send_plan(worker, &disk, plan).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}
