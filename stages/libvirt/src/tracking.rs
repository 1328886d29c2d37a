//! The checkpoint chain of one disk: what the manifest records, whether the parent's checkpoint can
//! still answer for the changes, and the [`ChangeTracking`] the `libvirt-checkpoint` map asks.
//!
//! # The rules (DESIGN.md, "Changed block tracking, safely")
//! - The state the parent snapshot recorded ([`State`]) names the checkpoint its backup created,
//!   and the disk's identity then: VM UUID, host, target, image and size.
//! - Before the job begins, [`base_for`] checks that checkpoint against libvirt and the disk as it
//!   is now. Any doubt is a reason for a full read, never a failed run.
//! - libvirt keeps a checkpoint's metadata per host, while its bitmaps live in the disk images.
//!   When the VM moved to another host since its parent snapshot, or libvirt here no longer knows
//!   the checkpoint, the checkpoint is redefined here from what the snapshot recorded
//!   ([`Checkpoints::redefine`]), its bitmaps checked in the images: where they survived, the run
//!   stays incremental; where they did not, the reason (moved, bitmaps lost) makes the read full.
//! - The new checkpoint becomes the base only when the snapshot is committed: until then the
//!   parent's checkpoint stays, and a failed or killed run leaves it in force.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backflow_pipeline::{ChangeTracking, Changes};
use backflow_qemu::NbdExport;
use serde::{Deserialize, Serialize};

/// The `method` recorded in the manifest's `cbt` for libvirt checkpoints.
pub const METHOD: &str = "libvirt-checkpoint";

/// What a snapshot records per disk (the manifest's `cbt`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct State {
    pub method: String,
    /// The checkpoint whose bitmap counts the changes after this snapshot; `None`: the backup made
    /// none (tracking off, or a raw disk), so the next run reads everything.
    pub checkpoint: Option<String>,
    pub domain_uuid: String,
    pub host: String,
    pub disk: String,
    /// The image the disk read from (path, or a description of a network source).
    pub source: String,
    pub size: u64,
}

/// The disk as it is now, to compare with what the parent recorded.
#[derive(Clone, Debug)]
pub struct DiskNow<'a> {
    pub domain_uuid: &'a str,
    pub host: &'a str,
    pub disk: &'a str,
    pub source: &'a str,
    pub size: u64,
    /// Whether the image can hold persistent bitmaps (qcow2).
    pub bitmaps: bool,
}

/// What libvirt says of a checkpoint, looked up only when the rest matches.
pub trait Checkpoints {
    /// Whether libvirt on this host knew the checkpoint before this run redefined any.
    fn known(&self, checkpoint: &str) -> bool;
    /// Redefines the checkpoint on this host from what the parent snapshot recorded, with a bitmap
    /// of `disk` (and of the other disks that recorded it), once its bitmap is checked in the
    /// disk's image; `moved_from`: the host the parent was taken on, when it was another.
    /// `Err(reason)` when the bitmap is not there (or libvirt refuses).
    fn redefine(
        &self,
        checkpoint: &str,
        disk: &str,
        moved_from: Option<&str>,
    ) -> Result<(), String>;
    /// Whether the checkpoint exists and holds a bitmap for `disk`; `Err(reason)` when not.
    fn covers(&self, checkpoint: &str, disk: &str) -> Result<(), String>;
}

/// The checkpoint a run may count `now`'s changes from, given the state its parent recorded, or
/// why it may not (a full read follows, with that reason as the warning).
pub fn base_for(
    recorded: &serde_json::Value,
    parent: &str,
    now: &DiskNow<'_>,
    checkpoints: &dyn Checkpoints,
) -> Result<String, String> {
    let state = recorded_state(recorded, parent)?;
    if !now.bitmaps {
        return Err("its image is not qcow2, which alone holds checkpoint bitmaps".into());
    }
    let Some(checkpoint) = state.checkpoint else {
        return Err(format!(
            "snapshot {parent} was taken without a checkpoint (the VM was shut off, or tracking was off)"
        ));
    };
    if state.domain_uuid != now.domain_uuid {
        return Err(format!(
            "the VM was redefined (UUID {} now, {} in snapshot {parent})",
            now.domain_uuid, state.domain_uuid
        ));
    }
    if state.source != now.source {
        return Err(format!(
            "it now reads from {}, not {} as in snapshot {parent}",
            now.source, state.source
        ));
    }
    if state.size != now.size {
        return Err(format!(
            "it was resized from {} to {} bytes",
            state.size, now.size
        ));
    }
    // libvirt's metadata stays on the host that made it; the bitmaps travel with the image.
    let moved_from = (state.host != now.host).then_some(state.host.as_str());
    let moved = |reason: String| match moved_from {
        Some(from) => format!(
            "the VM moved from host {from} to {} since snapshot {parent}, and {reason}",
            now.host
        ),
        None => reason,
    };
    if moved_from.is_some() || !checkpoints.known(&checkpoint) {
        checkpoints
            .redefine(&checkpoint, now.disk, moved_from)
            .map_err(|e| {
                moved(match moved_from {
                    Some(_) => format!(
                        "its bitmap of checkpoint {checkpoint} was lost on the way, so the checkpoint cannot be redefined there ({e})"
                    ),
                    None => format!(
                        "checkpoint {checkpoint} no longer exists, nor can it be redefined from snapshot {parent} ({e})"
                    ),
                })
            })?;
    }
    checkpoints.covers(&checkpoint, now.disk).map_err(moved)?;
    Ok(checkpoint)
}

/// The state the parent recorded, if it is a libvirt checkpoint's.
fn recorded_state(recorded: &serde_json::Value, parent: &str) -> Result<State, String> {
    match State::deserialize(recorded) {
        Ok(state) if state.method == METHOD => Ok(state),
        Ok(state) => Err(format!(
            "snapshot {parent} tracked it by {}, not by libvirt checkpoints",
            state.method
        )),
        Err(_) => {
            let method = recorded.get("method").and_then(|m| m.as_str());
            Err(match method {
                Some(m) if m != METHOD => {
                    format!("snapshot {parent} tracked it by {m}, not by libvirt checkpoints")
                }
                _ => format!("the tracking state of snapshot {parent} is not understood"),
            })
        }
    }
}

/// The checkpoint the parent recorded for a disk, to redefine it with all the disks that share
/// it; `None` when the state is not a libvirt checkpoint's or names none.
pub fn recorded_checkpoint(recorded: &serde_json::Value) -> Option<String> {
    recorded_state(recorded, "").ok()?.checkpoint
}

/// Set once the snapshot is committed; shared by the disks of one run and its cleanup action.
pub type Committed = Arc<AtomicBool>;

/// The tracking a disk of a running job offers the map stage.
#[derive(Debug)]
pub struct CheckpointTracking {
    /// What this run's snapshot records.
    pub next: State,
    /// The checkpoint the job counts this disk's changes from, or why there is none.
    pub base: Result<String, String>,
    /// The export, and the name of the dirty bitmap exported with it (incremental disks only).
    pub export: Arc<NbdExport>,
    pub bitmap: Option<String>,
    pub committed: Committed,
}

impl ChangeTracking for CheckpointTracking {
    fn next_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.next).expect("a tracking state serialises")
    }

    fn changed_since(&self, state: &serde_json::Value) -> io::Result<Changes> {
        let base = match &self.base {
            Ok(base) => base,
            Err(reason) => return Ok(Changes::Unknown(reason.clone())),
        };
        let recorded = state.get("checkpoint").and_then(|c| c.as_str());
        if recorded != Some(base.as_str()) {
            // The map stage found another parent than the source did: never trust a mismatch.
            return Ok(Changes::Unknown(format!(
                "the parent snapshot recorded checkpoint {}, the backup job counted changes since {base}",
                recorded.unwrap_or("none")
            )));
        }
        let Some(bitmap) = &self.bitmap else {
            return Ok(Changes::Unknown(format!(
                "libvirt exported no dirty bitmap for checkpoint {base}"
            )));
        };
        Ok(Changes::Since(self.export.dirty_ranges(bitmap)?))
    }

    fn committed(&self, _snapshot: &str) {
        self.committed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    /// libvirt on this host: the checkpoints it knows, with the disks each holds a bitmap of; the
    /// bitmaps in the images (what a redefinition finds); and what was redefined.
    struct Host {
        known: &'static [(&'static str, &'static str)],
        /// What libvirt holds now: what it knew, and what was redefined since.
        holds: RefCell<Vec<(&'static str, &'static str)>>,
        bitmaps: &'static [(&'static str, &'static str)],
        redefined: RefCell<Vec<(String, String, Option<String>)>>,
    }

    fn host(
        known: &'static [(&'static str, &'static str)],
        bitmaps: &'static [(&'static str, &'static str)],
    ) -> Host {
        Host {
            known,
            holds: RefCell::new(known.to_vec()),
            bitmaps,
            redefined: RefCell::default(),
        }
    }

    impl Checkpoints for Host {
        fn known(&self, checkpoint: &str) -> bool {
            self.known.iter().any(|(c, _)| *c == checkpoint)
        }

        fn redefine(
            &self,
            checkpoint: &str,
            disk: &str,
            moved_from: Option<&str>,
        ) -> Result<(), String> {
            let Some(&found) = self.bitmaps.iter().find(|b| **b == (checkpoint, disk)) else {
                return Err(format!(
                    "missing or broken bitmap '{checkpoint}' for disk '{disk}'"
                ));
            };
            self.holds.borrow_mut().push(found);
            self.redefined.borrow_mut().push((
                checkpoint.into(),
                disk.into(),
                moved_from.map(str::to_owned),
            ));
            Ok(())
        }

        fn covers(&self, checkpoint: &str, disk: &str) -> Result<(), String> {
            if self.holds.borrow().contains(&(checkpoint, disk)) {
                Ok(())
            } else {
                Err(format!("checkpoint {checkpoint} has no bitmap of {disk}"))
            }
        }
    }

    fn recorded() -> serde_json::Value {
        json!({"method": METHOD, "checkpoint": "backflow.1", "domain_uuid": "u1", "host": "h1",
               "disk": "vda", "source": "/img/vda.qcow2", "size": 1024})
    }

    fn now() -> DiskNow<'static> {
        DiskNow {
            domain_uuid: "u1",
            host: "h1",
            disk: "vda",
            source: "/img/vda.qcow2",
            size: 1024,
            bitmaps: true,
        }
    }

    /// The same host as the parent's, which knows backflow.1 with a bitmap of vda.
    fn same() -> Host {
        host(&[("backflow.1", "vda")], &[("backflow.1", "vda")])
    }

    #[test]
    fn the_recorded_checkpoint_is_the_base_when_everything_matches() {
        let same = same();
        assert_eq!(
            base_for(&recorded(), "s1", &now(), &same),
            Ok("backflow.1".into())
        );
        assert!(same.redefined.borrow().is_empty(), "nothing to redefine");
    }

    #[test]
    fn a_vm_that_moved_keeps_its_checkpoint_where_the_bitmaps_survived() {
        // h2 has never heard of backflow.1; the bitmap is in the image.
        let h2 = host(&[], &[("backflow.1", "vda")]);
        let moved = DiskNow {
            host: "h2",
            ..now()
        };
        assert_eq!(
            base_for(&recorded(), "s1", &moved, &h2),
            Ok("backflow.1".into())
        );
        assert_eq!(
            *h2.redefined.borrow(),
            [("backflow.1".into(), "vda".into(), Some("h1".into()))]
        );
        // A host that knows the checkpoint already (the VM came back, or libvirt carried the
        // metadata) still has it checked against the bitmap: redefined, not trusted.
        let back = host(&[("backflow.1", "vda")], &[("backflow.1", "vda")]);
        assert_eq!(
            base_for(&recorded(), "s1", &moved, &back),
            Ok("backflow.1".into())
        );
        assert_eq!(back.redefined.borrow().len(), 1);
    }

    #[test]
    fn a_vm_that_moved_without_its_bitmaps_is_read_whole_saying_so() {
        let moved = DiskNow {
            host: "h2",
            ..now()
        };
        for h2 in [host(&[], &[]), host(&[("backflow.1", "vda")], &[])] {
            let reason = base_for(&recorded(), "s1", &moved, &h2).unwrap_err();
            assert!(
                reason.contains("moved from host h1 to h2")
                    && reason.contains("lost")
                    && reason.contains("missing or broken bitmap 'backflow.1'"),
                "{reason}"
            );
        }
        // Another disk's bitmap does not stand in for this one's.
        let other = host(&[], &[("backflow.1", "vdb")]);
        let reason = base_for(&recorded(), "s1", &moved, &other).unwrap_err();
        assert!(reason.contains("lost"), "{reason}");
    }

    #[test]
    fn a_checkpoint_libvirt_forgot_is_redefined_when_its_bitmap_is_there() {
        // Same host, metadata gone (deleted with --metadata, or libvirt's state lost).
        let forgot = host(&[], &[("backflow.1", "vda")]);
        assert_eq!(
            base_for(&recorded(), "s1", &now(), &forgot),
            Ok("backflow.1".into())
        );
        assert_eq!(
            *forgot.redefined.borrow(),
            [("backflow.1".into(), "vda".into(), None)]
        );
        // Deleted for good, bitmaps included.
        let reason = base_for(&recorded(), "s1", &now(), &host(&[], &[])).unwrap_err();
        assert!(
            reason.contains("backflow.1 no longer exists") && !reason.contains("moved"),
            "{reason}"
        );
    }

    #[test]
    fn disks_sharing_a_redefined_checkpoint_each_get_their_own_verdict() {
        // vda's bitmap survived, vdb's did not: once vda's redefinition made the checkpoint
        // known, vdb still learns that its bitmap is gone, not merely that it is not covered.
        let h2 = host(&[], &[("backflow.1", "vda")]);
        let moved = |disk| DiskNow {
            host: "h2",
            disk,
            ..now()
        };
        let mut vdb = recorded();
        vdb["disk"] = json!("vdb");
        assert_eq!(
            base_for(&recorded(), "s1", &moved("vda"), &h2),
            Ok("backflow.1".into())
        );
        let reason = base_for(&vdb, "s1", &moved("vdb"), &h2).unwrap_err();
        assert!(
            reason.contains("moved from host h1 to h2")
                && reason.contains("missing or broken bitmap 'backflow.1' for disk 'vdb'"),
            "{reason}"
        );
    }

    #[test]
    fn every_doubt_is_a_reason() {
        let cases: Vec<(DiskNow<'static>, &str)> = vec![
            (
                DiskNow {
                    domain_uuid: "u2",
                    ..now()
                },
                "redefined",
            ),
            (
                DiskNow {
                    source: "/img/other.qcow2",
                    ..now()
                },
                "now reads from /img/other.qcow2",
            ),
            (
                DiskNow {
                    size: 2048,
                    ..now()
                },
                "resized from 1024 to 2048",
            ),
            (
                DiskNow {
                    bitmaps: false,
                    ..now()
                },
                "not qcow2",
            ),
            (
                DiskNow {
                    disk: "vdb",
                    ..now()
                },
                "no bitmap of vdb",
            ),
            // Moved and resized: nothing is redefined for a disk that is not the same.
            (
                DiskNow {
                    host: "h2",
                    size: 2048,
                    ..now()
                },
                "resized",
            ),
        ];
        for (disk, expected) in cases {
            let same = same();
            let reason = base_for(&recorded(), "s1", &disk, &same).unwrap_err();
            assert!(reason.contains(expected), "{reason} lacks {expected}");
            assert!(same.redefined.borrow().is_empty(), "{reason}");
        }
        let qcow2 = json!({"method": "qcow2-bitmap", "bitmap": "b.1"});
        let reason = base_for(&qcow2, "s1", &now(), &same()).unwrap_err();
        assert!(reason.contains("qcow2-bitmap"), "{reason}");
        let mut none = recorded();
        none["checkpoint"] = serde_json::Value::Null;
        let reason = base_for(&none, "s1", &now(), &same()).unwrap_err();
        assert!(reason.contains("without a checkpoint"), "{reason}");
        let reason = base_for(&json!(3), "s1", &now(), &same()).unwrap_err();
        assert!(reason.contains("not understood"), "{reason}");
    }

    #[test]
    fn the_checkpoint_to_redefine_is_read_from_the_record() {
        assert_eq!(
            recorded_checkpoint(&recorded()).as_deref(),
            Some("backflow.1")
        );
        let mut none = recorded();
        none["checkpoint"] = serde_json::Value::Null;
        assert_eq!(recorded_checkpoint(&none), None);
        assert_eq!(
            recorded_checkpoint(&json!({"method": "qcow2-bitmap"})),
            None
        );
    }
}
