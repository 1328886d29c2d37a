//! The checkpoint chain of one disk: what the manifest records, whether the parent's checkpoint can
//! still answer for the changes, and the [`ChangeTracking`] the `libvirt-checkpoint` map asks.
//!
//! # The rules (DESIGN.md, "Changed block tracking, safely")
//! - The state the parent snapshot recorded ([`State`]) names the checkpoint its backup created,
//!   and the disk's identity then: VM UUID, host, target, image and size.
//! - Before the job begins, [`base_for`] checks that checkpoint against libvirt and the disk as it
//!   is now. Any doubt is a reason for a full read, never a failed run.
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
    let state = match State::deserialize(recorded) {
        Ok(state) if state.method == METHOD => state,
        Ok(state) => {
            return Err(format!(
                "snapshot {parent} tracked it by {}, not by libvirt checkpoints",
                state.method
            ));
        }
        Err(_) => {
            let method = recorded.get("method").and_then(|m| m.as_str());
            return Err(match method {
                Some(m) if m != METHOD => {
                    format!("snapshot {parent} tracked it by {m}, not by libvirt checkpoints")
                }
                _ => format!("the tracking state of snapshot {parent} is not understood"),
            });
        }
    };
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
    if state.host != now.host {
        return Err(format!(
            "the VM moved from host {} to {}",
            state.host, now.host
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
    checkpoints.covers(&checkpoint, now.disk)?;
    Ok(checkpoint)
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

    struct Known(&'static [(&'static str, &'static str)]);

    impl Checkpoints for Known {
        fn covers(&self, checkpoint: &str, disk: &str) -> Result<(), String> {
            if self.0.contains(&(checkpoint, disk)) {
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

    #[test]
    fn the_recorded_checkpoint_is_the_base_when_everything_matches() {
        let known = Known(&[("backflow.1", "vda")]);
        assert_eq!(
            base_for(&recorded(), "s1", &now(), &known),
            Ok("backflow.1".into())
        );
    }

    #[test]
    fn every_doubt_is_a_reason() {
        let known = Known(&[("backflow.1", "vda")]);
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
                    host: "h2",
                    ..now()
                },
                "moved from host h1 to h2",
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
        ];
        for (disk, expected) in cases {
            let reason = base_for(&recorded(), "s1", &disk, &known).unwrap_err();
            assert!(reason.contains(expected), "{reason} lacks {expected}");
        }
        let gone = base_for(&recorded(), "s1", &now(), &Known(&[])).unwrap_err();
        assert!(gone.contains("backflow.1"), "{gone}");
        let qcow2 = json!({"method": "qcow2-bitmap", "bitmap": "b.1"});
        let reason = base_for(&qcow2, "s1", &now(), &known).unwrap_err();
        assert!(reason.contains("qcow2-bitmap"), "{reason}");
        let mut none = recorded();
        none["checkpoint"] = serde_json::Value::Null;
        let reason = base_for(&none, "s1", &now(), &known).unwrap_err();
        assert!(reason.contains("without a checkpoint"), "{reason}");
        let reason = base_for(&json!(3), "s1", &now(), &known).unwrap_err();
        assert!(reason.contains("not understood"), "{reason}");
    }
}
