//! The `libvirt-define` finaliser: after a restore, defines the restored VM as a new libvirt domain.
//!
//! A restore spec ends with it instead of `cleanup` (specs/restore-vm.yaml). When the run
//! succeeded it reads what the data stages recorded on the run context: the snapshot the
//! `repo-reader` stage restored (`restored_snapshot`) and the images the `disk-writer` stage
//! wrote (`restored`: disk, path, format). It takes the domain XML the snapshot holds (the VM's
//! inactive definition at backup time), rewrites it with [`backflow_libvirt::new_definition`]
//! (new name, no UUID, no MACs, each disk on its restored image, disks not restored left out),
//! defines it, starts it when asked, and records `domain` (name and UUID) in the run's results.
//!
//! The original VM is never touched: a domain that already has the name is an error, checked
//! before anything is defined. When the run failed or was cancelled nothing is defined (the disk
//! writer left no image in place). Either way it then does what the plain `cleanup` finaliser
//! does (removes scratch that killed runs left), so a restore spec loses nothing by using it.
//!
//! The images' paths are made absolute, as libvirt needs them, on this machine: `uri` should name
//! the hypervisor of this machine (or one that sees the images at the same paths).

use std::path::Path;

use backflow_libvirt::{Connection, LibvirtError, RestoredDisk, new_definition};
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_finaliser, option_docs,
};
use backflow_pipeline::{Finaliser, InvalidOption, Outcome, RunContext, StageError};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "libvirt-define";

/// The connection a restore defines on when the spec does not say: the local system daemon.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct LibvirtDefineOptions {
    /// The libvirt connection to define the new domain on.
    #[serde(default = "default_uri")]
    pub uri: String,
    /// The new domain's name; a domain of that name must not exist (required).
    #[serde(default)]
    pub name: Option<String>,
    /// Start the new domain once it is defined.
    #[serde(default)]
    pub start: bool,
    /// Remove scratch directories that killed runs left in the repository (as `cleanup` does).
    #[serde(default = "yes")]
    pub remove_stale_scratch: bool,
}

impl Default for LibvirtDefineOptions {
    fn default() -> Self {
        LibvirtDefineOptions {
            uri: default_uri(),
            name: None,
            start: false,
            remove_stale_scratch: true,
        }
    }
}

fn default_uri() -> String {
    DEFAULT_URI.to_owned()
}

fn yes() -> bool {
    true
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "finaliser: after a successful restore, defines the snapshot's domain XML as a new libvirt domain (new name, UUID and MACs) on the restored images; then does what `cleanup` does",
    input: None,
    output: None,
    repository: RepositoryUse::Required,
    options: option_docs::<LibvirtDefineOptions>,
    build: Build::Finaliser(|options| build_finaliser(options, LibvirtDefine::new)),
};

#[derive(Debug)]
pub struct LibvirtDefine {
    uri: String,
    name: String,
    start: bool,
    remove_stale_scratch: bool,
}

impl LibvirtDefine {
    pub fn new(options: LibvirtDefineOptions) -> Result<Self, InvalidOption> {
        let name = options
            .name
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| InvalidOption::new("name", "is required: the name of the new domain"))?;
        backflow_repository::check_vm_name(&name)
            .map_err(|e| InvalidOption::new("name", e.to_string()))?;
        if options.uri.trim().is_empty() {
            return Err(InvalidOption::new(
                "uri",
                "must name a libvirt connection, such as qemu:///system",
            ));
        }
        Ok(LibvirtDefine {
            uri: options.uri,
            name,
            start: options.start,
            remove_stale_scratch: options.remove_stale_scratch,
        })
    }

    /// Defines (and starts) the new domain from what the restore recorded.
    fn define(&self, ctx: &RunContext) -> Result<(), StageError> {
        let results = ctx.results();
        let snapshot_id = results
            .get("restored_snapshot")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                StageError::Config(format!(
                    "{KIND}: no restored snapshot recorded: the pipeline needs a `repo-reader` stage"
                ))
            })?;
        let disks = restored_disks(results.get("restored"))?;
        // Targets come from the manifest: one that is not a disk name never reaches the new XML.
        for disk in &disks {
            backflow_repository::check_disk_name(&disk.target).map_err(|e| {
                StageError::Config(format!(
                    "snapshot {snapshot_id}: cannot define the domain: {e}"
                ))
            })?;
        }
        let snapshot = ctx.repository()?.open_snapshot(snapshot_id)?;
        let xml = snapshot.meta().domain_xml.as_deref().ok_or_else(|| {
            StageError::Config(format!(
                "snapshot {snapshot_id} has no domain definition: it was not taken from a libvirt VM"
            ))
        })?;
        let new = new_definition(xml, &self.name, &disks).map_err(|e| {
            StageError::Config(format!("snapshot {snapshot_id}: {}", LibvirtError::from(e)))
        })?;
        for note in &new.notes {
            ctx.warn(format!("{KIND}: {note}"));
        }

        let conn = Connection::open(Some(&self.uri)).map_err(libvirt_error)?;
        let vm = conn.define_vm(&new.xml).map_err(libvirt_error)?;
        tracing::info!(vm = %vm.name, uuid = %vm.uuid, snapshot = %snapshot_id, "Domain defined.");
        if self.start {
            conn.start_vm(&vm.name).map_err(|e| {
                StageError::Config(format!(
                    "{e} (the domain `{}` is defined and stays so; start it with `virsh start`)",
                    vm.name
                ))
            })?;
            tracing::info!(vm = %vm.name, "Domain started.");
        }
        ctx.set_result(
            "domain",
            serde_json::json!({
                "name": vm.name,
                "uuid": vm.uuid,
                "uri": conn.uri(),
                "started": self.start,
                "snapshot": snapshot_id,
            }),
        );
        Ok(())
    }
}

impl Finaliser for LibvirtDefine {
    /// Refuses a name in use before anything is restored (the definition checks it again).
    fn prepare(&self, _ctx: &RunContext) -> Result<(), StageError> {
        let conn = Connection::open(Some(&self.uri)).map_err(libvirt_error)?;
        match conn.domain(&self.name) {
            Ok(_) => Err(libvirt_error(LibvirtError::VmExists {
                uri: conn.uri().to_owned(),
                name: self.name.clone(),
            })),
            Err(LibvirtError::NoSuchVm { .. }) => Ok(()),
            Err(e) => Err(libvirt_error(e)),
        }
    }

    fn finalise(&self, ctx: &RunContext, outcome: &Outcome) -> Result<(), StageError> {
        let defined = match outcome {
            Outcome::Succeeded => self.define(ctx),
            Outcome::Failed(_) | Outcome::Cancelled => {
                tracing::debug!(?outcome, "The restore did not succeed: no domain defined.");
                Ok(())
            }
        };
        // What the plain `cleanup` finaliser does, whatever happened above. Repeated here rather
        // than called: finalisers, like stages, do not depend on each other's crates.
        let cleaned = if self.remove_stale_scratch {
            remove_stale_scratch(ctx)
        } else {
            Ok(())
        };
        defined.and(cleaned)
    }
}

/// Removes the scratch directories that interrupted runs left in the repository, if the run has
/// one.
fn remove_stale_scratch(ctx: &RunContext) -> Result<(), StageError> {
    if ctx.repository_location().is_some()
        && let Ok(repo) = ctx.repository()
    {
        let removed = repo.remove_stale_scratch()?;
        if removed > 0 {
            tracing::info!(removed, "Removed scratch directories of interrupted runs.");
        }
    }
    Ok(())
}

/// The disk writer's `restored` result as the rewrite takes it, each path made absolute.
fn restored_disks(value: Option<&serde_json::Value>) -> Result<Vec<RestoredDisk>, StageError> {
    let missing = || {
        StageError::Config(format!(
            "{KIND}: no restored images recorded: the pipeline needs a `disk-writer` stage"
        ))
    };
    let items = value.and_then(|v| v.as_array()).ok_or_else(missing)?;
    items
        .iter()
        .map(|item| {
            let field = |name: &str| {
                item.get(name).and_then(|v| v.as_str()).ok_or_else(|| {
                    StageError::Internal(format!(
                        "{KIND}: the disk writer's `restored` entry {item} has no string `{name}`"
                    ))
                })
            };
            let path = Path::new(field("path")?);
            let absolute = std::fs::canonicalize(path).map_err(|e| {
                StageError::io(format!("finding the restored image {}", path.display()), e)
            })?;
            Ok(RestoredDisk {
                target: field("disk")?.to_owned(),
                path: absolute.display().to_string(),
                format: field("format")?.to_owned(),
            })
        })
        .collect()
}

/// A libvirt error as a stage error: retryable ones (a daemon that does not answer) as I/O.
fn libvirt_error(e: LibvirtError) -> StageError {
    if e.is_retryable() {
        StageError::io(KIND, std::io::Error::other(e))
    } else {
        StageError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_required_and_defaults_are_documented() {
        let err = LibvirtDefine::new(LibvirtDefineOptions::default()).unwrap_err();
        assert_eq!(err.option, "name");
        let opts = LibvirtDefineOptions {
            name: Some("copy".into()),
            ..Default::default()
        };
        let stage = LibvirtDefine::new(opts).unwrap();
        assert_eq!(stage.uri, DEFAULT_URI);
        assert!(!stage.start);
        let defaults = serde_json::to_value(LibvirtDefineOptions::default()).unwrap();
        for key in defaults.as_object().unwrap().keys() {
            assert!(
                LibvirtDefineOptions::OPTION_DOCS
                    .iter()
                    .any(|(n, _)| n == key),
                "option {key} undocumented"
            );
        }
    }

    #[test]
    fn restored_entries_become_absolute_disks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vda.qcow2");
        std::fs::write(&image, b"x").unwrap();
        let value = serde_json::json!([
            {"disk": "vda", "path": image.display().to_string(), "size": 1, "format": "qcow2"}
        ]);
        let disks = restored_disks(Some(&value)).unwrap();
        assert_eq!(
            disks,
            vec![RestoredDisk {
                target: "vda".into(),
                path: std::fs::canonicalize(&image).unwrap().display().to_string(),
                format: "qcow2".into(),
            }]
        );
        let err = restored_disks(None).unwrap_err().to_string();
        assert!(err.contains("needs a `disk-writer` stage"), "{err}");
    }
}
