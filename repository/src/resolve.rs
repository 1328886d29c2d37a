//! What a person types to name a snapshot, resolved to one id: the single rule behind `restore --snapshot`,
//! `forget --snapshot`, the `snapshot` option of `repo-reader` and [`Repository::open_snapshot`].
//!
//! - A whole id names itself.
//! - Any other non-empty text names the one snapshot whose id starts with it (restic's and git's short ids);
//!   when several do, the error lists each (id, VM, time) so that the next try can be exact.
//! - `latest` names the newest snapshot of the VM given. Without a VM it names the newest snapshot only when
//!   the repository holds a single VM: with several, "the newest of any" is a guess (restic takes it, and a
//!   restore then silently brings back the wrong machine), so it is an error listing the VMs instead.
//! - With a VM, ids and prefixes only match that VM's snapshots, which also disambiguates a short prefix.
//!
//! Manifests whose metadata cannot be read take part as ids (so that `forget` reaches them), never as the
//! `latest` of anything, and not when a VM is given (their VM is unknown).

use crate::error::{RepoError, Result};
use crate::{Repository, SnapshotInfo};

/// The word that names the newest snapshot.
pub const LATEST: &str = "latest";

/// One manifest that may be meant: its id, and its metadata when it could be read.
struct Candidate {
    id: String,
    info: Option<SnapshotInfo>,
}

impl Candidate {
    fn describe(&self) -> String {
        match &self.info {
            Some(info) => format!("{} (vm {}, {})", self.id, info.vm, info.time_utc),
            None => format!("{} (damaged manifest)", self.id),
        }
    }
}

impl Repository {
    /// The id of the snapshot `given` names (a whole id, a unique prefix of one, or [`LATEST`]), among the
    /// snapshots of `vm` when one is given. See the module documentation for the rules; errors are
    /// [`RepoError::SnapshotNotFound`], [`RepoError::AmbiguousSnapshot`], [`RepoError::LatestNeedsVm`] and
    /// [`RepoError::NoSnapshotOfVm`], each a complete sentence for the person who typed it.
    pub fn resolve_snapshot(&self, given: &str, vm: Option<&str>) -> Result<String> {
        let repo = self.path().to_owned();
        let not_found = || RepoError::SnapshotNotFound {
            repo: repo.clone(),
            id: given.to_owned(),
        };
        let listed = self.list_snapshots()?;
        let vms = || {
            let mut vms: Vec<String> = listed.iter().map(|s| s.vm.clone()).collect();
            vms.sort();
            vms.dedup();
            vms
        };
        let no_snapshot_of = |vm: &str, detail: String| RepoError::NoSnapshotOfVm {
            repo: repo.clone(),
            vm: vm.to_owned(),
            detail,
        };
        if given == LATEST {
            return match vm {
                Some(vm) => listed
                    .iter()
                    .rev()
                    .find(|s| s.vm == vm)
                    .map(|s| s.id.clone())
                    .ok_or_else(|| no_snapshot_of(vm, vms_with_snapshots(&vms()))),
                None => match &vms()[..] {
                    [] => Err(not_found()),
                    [_] => Ok(listed.last().map(|s| s.id.clone()).expect("one VM")),
                    several => Err(RepoError::LatestNeedsVm {
                        repo: repo.clone(),
                        vms: several.to_vec(),
                    }),
                },
            };
        }
        if given.is_empty() {
            return Err(not_found());
        }
        let infos: std::collections::HashMap<&str, &SnapshotInfo> =
            listed.iter().map(|s| (s.id.as_str(), s)).collect();
        let candidates: Vec<Candidate> = self
            .manifest_ids()?
            .into_iter()
            .filter(|id| id.starts_with(given))
            .map(|id| Candidate {
                info: infos.get(id.as_str()).map(|s| (*s).clone()),
                id,
            })
            .collect();
        if let Some(exact) = candidates.iter().find(|c| c.id == given) {
            return match (vm, &exact.info) {
                (Some(vm), Some(info)) if info.vm != vm => Err(no_snapshot_of(
                    vm,
                    format!("snapshot {} is of VM {:?}", exact.id, info.vm),
                )),
                (Some(vm), None) => Err(no_snapshot_of(
                    vm,
                    format!("snapshot {} cannot be read", exact.id),
                )),
                _ => Ok(exact.id.clone()),
            };
        }
        let matching: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| vm.is_none_or(|vm| c.info.as_ref().is_some_and(|i| i.vm == vm)))
            .collect();
        match &matching[..] {
            [one] => Ok(one.id.clone()),
            [] => match vm {
                Some(vm) if !candidates.is_empty() => Err(no_snapshot_of(
                    vm,
                    format!(
                        "{given:?} starts the ids of: {}",
                        candidates
                            .iter()
                            .map(Candidate::describe)
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                )),
                _ => Err(not_found()),
            },
            several => Err(RepoError::AmbiguousSnapshot {
                repo,
                given: given.to_owned(),
                candidates: several.iter().map(|c| c.describe()).collect(),
            }),
        }
    }
}

fn vms_with_snapshots(vms: &[String]) -> String {
    if vms.is_empty() {
        "it holds no snapshots".into()
    } else {
        format!("VMs with snapshots: {}", vms.join(", "))
    }
}
