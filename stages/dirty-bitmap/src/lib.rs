//! Changed-block map `dirty-bitmap`: reads only what was written since the parent snapshot, as the
//! source's change tracking (a qcow2 persistent dirty bitmap through `qemu-nbd`) reports it.
//!
//! For each disk:
//! 1. The parent is the machine's newest snapshot holding the disk with the same size and chunk
//!    size (as for `full`).
//! 2. The parent's manifest holds the tracking state it was taken with; the source is asked what
//!    changed since that state ([`ChangeTracking::changed_since`]).
//! 3. Chunks touched by a change are read (or marked zero when they now read as zeros); every
//!    other chunk is `Unchanged`, referenced from the parent without being read, except the
//!    parent's chunks marked damaged in the repository with no healthy copy: those are read and
//!    stored again ([`reread_damaged`]), which heals every snapshot that references them.
//!
//! Whenever the changes cannot be known for certain (no parent, a parent without tracking state,
//! a bitmap that is missing, disabled, inconsistent or from another chain, a resized disk, a source
//! without tracking) the disk is read in full with the parent attached for deduplication, and the
//! run's report carries a warning saying why; the run does not fail. The snapshot then records the
//! source's new state, so the chain starts again from it.
//!
//! # Two kinds, one plan
//! The same stage serves two kinds, which differ only in the tracking they expect from the source
//! and the hint when a disk has none:
//! - `dirty-bitmap`, after the `qemu-nbd` source (qcow2 bitmaps it rotates itself);
//! - `libvirt-checkpoint`, after the `libvirt` source: the changes are the
//!   `qemu:dirty-bitmap:backup-DISK` context of libvirt's incremental backup job. The chain checks
//!   (checkpoint still there, same VM, host, image and size) happen in the source, before the job
//!   begins, since the job must be begun incremental or full; what they decide reaches this stage
//!   as `Changes::Unknown(reason)`.
//!
//! [`ChangeTracking::changed_since`]: backflow_pipeline::ChangeTracking::changed_since
//! [`reread_damaged`]: backflow_planner::reread_damaged

use std::sync::Arc;

use backflow_pipeline::describe::{Build, KindRow, RepositoryUse, build_stage, option_docs};
use backflow_pipeline::{
    Changes, Disk, InvalidOption, Message, MessageType, ParentChunks, Stage, StageError, StageIo,
    Work, Worker, stage::unexpected,
};
use backflow_planner::{
    MapSettings, OpenedDisk, plan_chunks, plan_incremental, reread_damaged, send_plan,
};

pub const KIND: &str = "dirty-bitmap";

/// The kind of the same map after the `libvirt` source.
pub const LIBVIRT_KIND: &str = "libvirt-checkpoint";

/// The same options as `full`: where the chunk size comes from, and how long an extent may be.
pub use backflow_planner::MapOptions as DirtyBitmapOptions;

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "changed-block map: only the chunks the source's change tracking (qcow2 bitmap) says were written since the parent snapshot (the rest is referenced, not read); a full read deduplicated against the parent, with a warning, whenever that is not certain",
    input: Some(MessageType::Disk),
    output: Some(MessageType::Extent),
    repository: RepositoryUse::No,
    options: option_docs::<DirtyBitmapOptions>,
    build: Build::Stage(|options| build_stage(options, DirtyBitmap::new)),
};

/// The `libvirt-checkpoint` kind: the same map after the `libvirt` source.
pub const LIBVIRT_ROW: KindRow = KindRow {
    kind: LIBVIRT_KIND,
    summary: "changed-block map: `dirty-bitmap`'s plan on the `libvirt` source's changes (the checkpoint's `qemu:dirty-bitmap:backup-DISK` context); a full read with a warning when the checkpoint cannot be trusted",
    input: Some(MessageType::Disk),
    output: Some(MessageType::Extent),
    repository: RepositoryUse::No,
    options: option_docs::<DirtyBitmapOptions>,
    build: Build::Stage(|options| build_stage(options, DirtyBitmap::libvirt)),
};

#[derive(Debug)]
pub struct DirtyBitmap {
    settings: MapSettings,
    /// Why a disk without tracking has none, for the warning.
    untracked: &'static str,
}

impl DirtyBitmap {
    pub fn new(options: DirtyBitmapOptions) -> Result<Self, InvalidOption> {
        Ok(DirtyBitmap {
            settings: MapSettings::new(options)?,
            untracked: "its source offers no change tracking (set `bitmap` on the qemu-nbd source)",
        })
    }

    /// The `libvirt-checkpoint` kind.
    pub fn libvirt(options: DirtyBitmapOptions) -> Result<Self, InvalidOption> {
        Ok(DirtyBitmap {
            settings: MapSettings::new(options)?,
            untracked: "its source offers no change tracking (the libvirt source's `checkpoint` is empty)",
        })
    }
}

impl Stage for DirtyBitmap {
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
            let name = source.name.clone();
            let OpenedDisk {
                chunk_size,
                parent,
                allocated,
            } = self.settings.open(worker, &source)?;
            // What changed since the parent, or why that cannot be known.
            let changes = match (&source.tracking, &parent) {
                (None, _) => Changes::Unknown(self.untracked.into()),
                // The first backup of the disk (or the parent was unusable, already reported).
                (Some(_), None) => Changes::Unknown(String::new()),
                (Some(tracking), Some(parent)) => match parent.cbt() {
                    None => Changes::Unknown(format!(
                        "snapshot {} recorded no change tracking for it",
                        parent.snapshot_id()
                    )),
                    Some(state) => tracking
                        .changed_since(state)
                        .map_err(|e| StageError::io(format!("reading the changes of {name}"), e))?,
                },
            };
            let size = source.reader.size();
            let plan = match changes {
                Changes::Since(dirty) => {
                    let bytes: u64 = dirty.iter().map(|r| r.1).sum();
                    tracing::info!(disk = %name, dirty_bytes = bytes, extents = dirty.len(), "Incremental read.");
                    let plan = plan_incremental(
                        size,
                        chunk_size,
                        &dirty,
                        allocated.as_deref(),
                        self.settings.max_extent_chunks,
                    );
                    let store_again = parent.as_ref().map_or(&[][..], |p| &p.store_again);
                    reread_damaged(plan, store_again, self.settings.max_extent_chunks)
                }
                Changes::Unknown(reason) => {
                    if !reason.is_empty() {
                        let compared = match &parent {
                            Some(p) => {
                                format!(", deduplicated against snapshot {}", p.snapshot_id())
                            }
                            None => String::new(),
                        };
                        worker.ctx().warn(format!(
                            "disk {name}: {reason}; reading all of it{compared}"
                        ));
                    }
                    plan_chunks(
                        size,
                        chunk_size,
                        allocated.as_deref(),
                        self.settings.max_extent_chunks,
                    )
                }
            };
            let disk = Arc::new(Disk {
                source: source.clone(),
                chunk_size,
                parent: parent.map(|p| p as Arc<dyn ParentChunks>),
            });
            if send_plan(worker, &disk, plan).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}
