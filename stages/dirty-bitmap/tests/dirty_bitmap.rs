//! The `dirty-bitmap` map against a real repository holding the parent snapshot, with a test
//! double for the source's change tracking (the real qcow2 bitmaps are exercised end to end by
//! cli/tests/qcow2_chain.rs): what it plans, what it asks the tracking, and what it warns about.

use std::path::Path;
use std::sync::{Arc, Mutex};

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ChangeTracking, Changes, DiskSource, ExtentClass, Message, OutcomeKind, SizeOnly,
};
use backflow_repository::{ChunkRef, DiskMeta, Repository};
use serde_json::json;
use stage_dirty_bitmap::{DirtyBitmap, DirtyBitmapOptions};

const C: u64 = 64 * 1024;
const CHUNKS: u64 = 8;

/// Answers `changed_since` with a fixed answer and remembers the state it was asked about.
#[derive(Debug)]
struct Fake {
    answer: Changes,
    asked: Mutex<Vec<serde_json::Value>>,
}

impl ChangeTracking for Fake {
    fn next_state(&self) -> serde_json::Value {
        json!({"method": "fake", "generation": 2})
    }

    fn changed_since(&self, state: &serde_json::Value) -> std::io::Result<Changes> {
        self.asked.lock().unwrap().push(state.clone());
        Ok(self.answer.clone())
    }

    fn committed(&self, _snapshot: &str) {}
}

/// A repository with one snapshot of vm1/vda (all zero chunks) recording `cbt`.
fn repo_with_parent(dir: &Path, cbt: Option<serde_json::Value>) -> (std::path::PathBuf, String) {
    let root = dir.join("repo");
    let repo = Repository::init(&root, C as u32).unwrap();
    let session = repo.begin_backup("vm1").unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: CHUNKS * C,
            chunk_size: C as u32,
            location: "/images/vda.qcow2".into(),
            cbt,
        })
        .unwrap();
    for i in 0..CHUNKS {
        session.set_chunk(slot, i, ChunkRef::Zero).unwrap();
    }
    session.pack_writer().finish().unwrap();
    let id = session.commit(None).unwrap().id;
    (root, id)
}

/// Runs the map on one disk; returns the planned runs and the warnings.
fn plan(
    repo: &Path,
    tracking: Option<Arc<dyn ChangeTracking>>,
) -> (Vec<(u64, u64, ExtentClass)>, Vec<String>) {
    plan_with(
        DirtyBitmap::new(DirtyBitmapOptions::default()).unwrap(),
        repo,
        tracking,
    )
}

/// [`plan`] with the map of either kind.
fn plan_with(
    map: DirtyBitmap,
    repo: &Path,
    tracking: Option<Arc<dyn ChangeTracking>>,
) -> (Vec<(u64, u64, ExtentClass)>, Vec<String>) {
    let mut harness = Harness::new(Arc::new(map));
    harness.repository = Some(repo.to_owned().into());
    let source = DiskSource {
        vm: "vm1".into(),
        name: "vda".into(),
        location: "/images/vda.qcow2".into(),
        reader: Arc::new(SizeOnly(CHUNKS * C)),
        tracking,
        definition: None,
    };
    let (report, out) = harness.run(vec![Message::Disk(Arc::new(source))]);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let mut runs: Vec<_> = out
        .into_iter()
        .map(|m| match m {
            Message::Extent(e) => {
                assert!(e.disk.parent.is_some() || report.warnings.is_empty());
                (e.first, e.count, e.class)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    runs.sort_by_key(|r| r.0);
    (runs, report.warnings)
}

fn fake(answer: Changes) -> Arc<Fake> {
    Arc::new(Fake {
        answer,
        asked: Mutex::new(Vec::new()),
    })
}

#[test]
fn known_changes_are_read_and_the_rest_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let state = json!({"method": "fake", "generation": 1});
    let (repo, _) = repo_with_parent(dir.path(), Some(state.clone()));
    let tracking = fake(Changes::Since(vec![(2 * C + 5, 10), (5 * C, 2 * C)]));
    let (runs, warnings) = plan(&repo, Some(tracking.clone()));
    use ExtentClass::{Data, Unchanged};
    assert_eq!(
        runs,
        vec![
            (0, 2, Unchanged),
            (2, 1, Data),
            (3, 2, Unchanged),
            (5, 2, Data),
            (7, 1, Unchanged)
        ]
    );
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(*tracking.asked.lock().unwrap(), vec![state]);
}

#[test]
fn uncertain_changes_mean_a_full_read_and_a_warning_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, parent) = repo_with_parent(dir.path(), Some(json!({"method": "fake"})));
    let tracking = fake(Changes::Unknown("bitmap b.1 is disabled".into()));
    let (runs, warnings) = plan(&repo, Some(tracking));
    assert_eq!(runs, vec![(0, CHUNKS, ExtentClass::Data)]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(
        w.contains("vda") && w.contains("bitmap b.1 is disabled"),
        "{w}"
    );
    assert!(
        w.contains("reading all of it") && w.contains(&parent),
        "{w}"
    );
}

#[test]
fn a_parent_without_tracking_state_means_a_full_read_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, parent) = repo_with_parent(dir.path(), None);
    let tracking = fake(Changes::Since(Vec::new()));
    let (runs, warnings) = plan(&repo, Some(tracking.clone()));
    assert_eq!(runs, vec![(0, CHUNKS, ExtentClass::Data)]);
    assert!(
        warnings.len() == 1 && warnings[0].contains(&parent),
        "{warnings:?}"
    );
    assert!(tracking.asked.lock().unwrap().is_empty());
}

#[test]
fn a_source_without_tracking_means_a_full_read_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = repo_with_parent(dir.path(), Some(json!({"method": "fake"})));
    let (runs, warnings) = plan(&repo, None);
    assert_eq!(runs, vec![(0, CHUNKS, ExtentClass::Data)]);
    assert!(
        warnings.len() == 1 && warnings[0].contains("no change tracking"),
        "{warnings:?}"
    );
}

#[test]
fn the_libvirt_kind_plans_the_same_and_names_its_own_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = repo_with_parent(dir.path(), Some(json!({"method": "fake"})));
    let libvirt = || DirtyBitmap::libvirt(DirtyBitmapOptions::default()).unwrap();
    let dirty = Changes::Since(vec![(3 * C + 5, 10), (10 * C, 2 * C)]);
    let expected = plan(&repo, Some(fake(dirty.clone()))).0;
    assert!(
        expected.iter().any(|r| r.2 == ExtentClass::Unchanged),
        "{expected:?}"
    );
    let (runs, warnings) = plan_with(libvirt(), &repo, Some(fake(dirty)));
    assert_eq!(runs, expected);
    assert!(warnings.is_empty(), "{warnings:?}");
    let (runs, warnings) = plan_with(libvirt(), &repo, None);
    assert_eq!(runs, vec![(0, CHUNKS, ExtentClass::Data)]);
    assert!(
        warnings.len() == 1 && warnings[0].contains("libvirt source's `checkpoint` is empty"),
        "{warnings:?}"
    );
}

#[test]
fn the_first_backup_reads_everything_without_warning() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    Repository::init(&repo, C as u32).unwrap();
    let tracking = fake(Changes::Since(Vec::new()));
    let (runs, warnings) = plan(&repo, Some(tracking.clone()));
    assert_eq!(runs, vec![(0, CHUNKS, ExtentClass::Data)]);
    assert_eq!(warnings, Vec::<String>::new());
    assert!(tracking.asked.lock().unwrap().is_empty());
}
