//! The `cleanup` finaliser against a real repository: the scratch directory of a backup process
//! that was killed (`SIGKILL`, by pid) is removed after a run, whatever the run's outcome, while
//! the scratch of a live session, in this process or another, is left alone.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backflow_pipeline::{
    ByteSize, ChunkRef, Finaliser, OutcomeKind, Pipeline, PlacedStage, RunOptions, RunReport,
    Stage, StageError, StageIo, Worker, digest_of,
};
use backflow_repository::{Codec, DiskMeta, Repository};
use stage_cleanup::{Cleanup, CleanupOptions};
use stage_discard::{Discard, DiscardOptions};
use stage_generate::{Generate, GenerateOptions};

const CHUNK: u32 = 64 * 1024;
/// Set for the child process: the repository in which it holds a backup session.
const CHILD_REPO: &str = "BACKFLOW_CLEANUP_TEST_REPO";
/// Precedes the session id on the child's standard output.
const SESSION_MARKER: &str = "child-session-id=";
/// How long a child waits to be killed before giving up on its own (no orphan outlives a test).
const CHILD_LIFETIME: Duration = Duration::from_secs(30);

/// A session with a disk and an unfinished pack. Run as a test, it drops the session uncommitted
/// and checks that this leaves no snapshot, no scratch and a valid repository. Run as the child
/// process that `ChildSession::start` launches (`CHILD_REPO` set), it reports the session id and
/// waits to be killed, so that the tests below see what a killed backup leaves.
#[test]
fn session_holding_an_unfinished_pack() {
    let child_repo = std::env::var(CHILD_REPO).ok();
    let temp = tempfile::tempdir().unwrap();
    let path = match &child_repo {
        Some(path) => PathBuf::from(path),
        None => {
            let path = temp.path().join("repo");
            Repository::init(&path, CHUNK).unwrap();
            path
        }
    };
    let repo = Repository::open(&path).unwrap();
    let session = repo.begin_backup("killed-vm").unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: 4 * u64::from(CHUNK),
            chunk_size: CHUNK,
            location: "child".into(),
            cbt: None,
        })
        .unwrap();
    let mut packs = session.pack_writer();
    let data = vec![7u8; CHUNK as usize];
    let digest = digest_of(&data);
    packs.add(digest, Codec::None, CHUNK, &data).unwrap();
    session.set_chunk(slot, 0, ChunkRef::Data(digest)).unwrap();
    if child_repo.is_none() {
        drop(packs);
        drop(session);
        assert!(repo.list_snapshots().unwrap().is_empty());
        let scratch = std::fs::read_dir(path.join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(scratch, 0, "a dropped session left scratch behind");
        assert!(repo.verify(true).unwrap().is_ok());
        return;
    }
    let mut out = std::io::stdout().lock();
    // On a line of its own: the test runner may have printed the test's name without a newline.
    writeln!(out, "\n{SESSION_MARKER}{}", session.id()).unwrap();
    out.flush().unwrap();
    let started = Instant::now();
    while started.elapsed() < CHILD_LIFETIME {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not killed in time: leave as a crash would, without dropping the session.
    std::process::exit(3);
}

/// A child process holding a session; killed by pid when dropped if the test did not kill it.
struct ChildSession {
    child: Child,
    id: String,
}

impl ChildSession {
    fn start(repo: &Path) -> ChildSession {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "session_holding_an_unfinished_pack",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_REPO, repo)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut id = None;
        for line in stdout.lines() {
            if let Some(rest) = line.unwrap().strip_prefix(SESSION_MARKER) {
                id = Some(rest.trim().to_owned());
                break;
            }
        }
        let Some(id) = id else {
            let _ = child.kill();
            panic!(
                "the child exited without starting a session: {:?}",
                child.wait()
            );
        };
        ChildSession { child, id }
    }

    /// `kill -9` by pid, as the OOM killer or an operator would.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "the child was killed, not finished");
    }
}

impl Drop for ChildSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stage that fails at once: the finaliser must run anyway.
struct Fail;

impl Stage for Fail {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(backflow_pipeline::MessageType::Chunk),
        }
    }

    fn run(&self, _worker: &mut Worker<'_>) -> Result<(), StageError> {
        Err(StageError::Config("failing on purpose".into()))
    }
}

fn run(repo: &Path, fail: bool, finaliser: Option<Arc<dyn Finaliser>>) -> RunReport {
    let source: Arc<dyn Stage> = if fail {
        Arc::new(Fail)
    } else {
        Arc::new(
            Generate::new(GenerateOptions {
                size: ByteSize(1 << 20),
                chunk_size: ByteSize(u64::from(CHUNK)),
                ..Default::default()
            })
            .unwrap(),
        )
    };
    let pipeline = Pipeline {
        name: "with-cleanup".into(),
        repository: Some(repo.to_owned().into()),
        stages: vec![
            PlacedStage {
                name: "source".into(),
                kind: "source".into(),
                workers: 1,
                capacity: 0,
                stage: source,
            },
            PlacedStage {
                name: "discard".into(),
                kind: "discard".into(),
                workers: 1,
                capacity: 4,
                stage: Arc::new(Discard::new(DiscardOptions {}).unwrap()),
            },
        ],
        finaliser,
    };
    pipeline.run(RunOptions::default())
}

fn cleanup(remove_stale_scratch: bool) -> Option<Arc<dyn Finaliser>> {
    Some(Arc::new(
        Cleanup::new(CleanupOptions {
            remove_stale_scratch,
        })
        .unwrap(),
    ))
}

fn scratch(repo: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn new_repo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    Repository::init(&path, CHUNK).unwrap();
    (dir, path)
}

#[test]
fn a_killed_sessions_scratch_is_removed_and_a_live_ones_is_kept() {
    let (_dir, repo_path) = new_repo();
    let mut child = ChildSession::start(&repo_path);
    let repo = Repository::open(&repo_path).unwrap();
    let live_here = repo.begin_backup("live-vm").unwrap();

    // Both sessions alive (one in another process): nothing is stale.
    let report = run(&repo_path, false, cleanup(true));
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let mut both = vec![child.id.clone(), live_here.id().to_owned()];
    both.sort();
    assert_eq!(scratch(&repo_path), both);

    child.kill();
    assert!(
        scratch(&repo_path).contains(&child.id),
        "a killed process leaves its scratch"
    );
    let report = run(&repo_path, false, cleanup(true));
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert_eq!(scratch(&repo_path), vec![live_here.id().to_owned()]);

    // The surviving session is intact: it still commits.
    let info = live_here.commit(None).unwrap();
    assert_eq!(repo.list_snapshots().unwrap()[0].id, info.id);
    assert!(scratch(&repo_path).is_empty());
    assert!(repo.verify(true).unwrap().is_ok());
}

#[test]
fn stale_scratch_is_removed_after_a_failed_run_too() {
    let (_dir, repo_path) = new_repo();
    let mut child = ChildSession::start(&repo_path);
    child.kill();
    let report = run(&repo_path, true, cleanup(true));
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("failing on purpose"))
    );
    assert!(scratch(&repo_path).is_empty(), "{:?}", scratch(&repo_path));
}

#[test]
fn stale_scratch_stays_when_the_option_is_off_or_there_is_no_finaliser() {
    let (_dir, repo_path) = new_repo();
    let mut child = ChildSession::start(&repo_path);
    child.kill();
    for finaliser in [cleanup(false), None] {
        let report = run(&repo_path, false, finaliser);
        assert_eq!(
            report.outcome,
            OutcomeKind::Succeeded,
            "{:?}",
            report.errors
        );
        assert_eq!(scratch(&repo_path), vec![child.id.clone()]);
    }
}

#[test]
fn a_session_dropped_without_commit_leaves_nothing_to_clean() {
    let (_dir, repo_path) = new_repo();
    let repo = Repository::open(&repo_path).unwrap();
    let session = repo.begin_backup("web01").unwrap();
    assert_eq!(scratch(&repo_path), vec![session.id().to_owned()]);
    drop(session);
    assert!(scratch(&repo_path).is_empty());
    let report = run(&repo_path, false, cleanup(true));
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert!(report.errors.is_empty());
}
