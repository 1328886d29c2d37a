//! Faults of a backup job over a cluster, on the three-host lab (testkit::cluster): a worker killed
//! mid-backup, a worker's host cut off the network mid-backup, the daemon stopped with SIGTERM
//! mid-session. After each, nothing is left on the VMs' hosts (no backup job, no scratch file, no
//! worker), every restore point restores identical, and the next backup succeeds.
//!
//! "Mid-backup" is exact: the controller hands `BACKFLOW_PAUSE_MID_TRANSFER` (a test hook, in test
//! builds only) on to its workers, whose reads then pause once something was read; the test acts,
//! then lets them go on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backflow_jobs::placement::Transport;
use backflow_jobs::{SessionRecord, Verdict};
use backflow_testkit::cluster::Lab;
use common::cluster::*;
use common::*;

/// How long a worker may take to reach its pause (a loaded machine, a retry after the controller
/// gave a lost host up: ssh's 15 s).
const REACH: Duration = Duration::from_secs(180);

/// Waits until `pause` exists (a worker's read paused), at most [`REACH`].
fn wait_paused(pause: &Path, job: &mut Child) {
    let deadline = Instant::now() + REACH;
    while !pause.exists() {
        if let Some(status) = job.try_wait().unwrap() {
            panic!("the job ended ({status}) before a worker paused");
        }
        assert!(
            Instant::now() < deadline,
            "no worker paused within {REACH:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// From now on, lets every paused worker go on (removes the pause file whenever it appears) until
/// the returned flag is set.
fn release_pauses(pause: &Path) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, pause) = (stop.clone(), pause.to_owned());
    std::thread::spawn(move || {
        while !seen.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&pause);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    stop
}

/// A `job run` of the lab whose workers pause mid-transfer ([`wait_paused`] has seen one pause).
struct PausedJob {
    run: Child,
    report: PathBuf,
    pause: PathBuf,
}

impl PausedJob {
    /// Starts `job` with `BACKFLOW_PAUSE_MID_TRANSFER` for its workers, and waits for a pause.
    fn start(lab: &Lab, job: &Path, scratch: &Path) -> PausedJob {
        let (report, pause) = (scratch.join("session.json"), scratch.join("paused"));
        let mut run = job_command(lab, job, &report)
            .env("BACKFLOW_PAUSE_MID_TRANSFER", &pause)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_paused(&pause, &mut run);
        PausedJob { run, report, pause }
    }

    /// Waits for the run to end (at most 5 minutes): its exit status, what it said on stderr and
    /// its session record.
    fn finish(mut self) -> (std::process::ExitStatus, String, SessionRecord) {
        let status = wait_exit(&mut self.run, Duration::from_secs(300));
        let mut stderr = String::new();
        std::io::Read::read_to_string(self.run.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let session = session_in(&self.report, stderr.as_bytes());
        (status, stderr, session)
    }
}

/// Waits until no process on any host of the lab runs `backflow worker` (at most `limit`).
fn assert_no_workers_within(lab: &Lab, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<(String, Vec<u32>)> = lab
            .hosts()
            .iter()
            .map(|h| (h.name.clone(), lab.pids_on(&h.name, "backflow worker")))
            .filter(|(_, pids)| !pids.is_empty())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "workers still run: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The snapshots of `vm` in the lab's repository.
fn snapshots_of(lab: &Lab, vm: &str) -> Vec<String> {
    let mut cmd = backflow();
    lab.apply(&mut cmd)
        .args(["snapshots", "--json", "--repo", lab.repository()]);
    let out = run_ok(&mut cmd);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["vm"] == vm)
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The next backup of the whole cluster succeeds, and every VM's latest restore point restores
/// identical to its disk.
fn assert_next_backup_succeeds(lab: &Lab, scratch: &Path) {
    let session = run_job(lab, &lab.job_file(), &scratch.join("after.json"));
    assert_eq!(session.result, Verdict::Success, "{session:#?}");
    for vm in lab.vms() {
        let record = session.vms.iter().find(|r| r.vm == vm.name).unwrap();
        assert_restores_to_disk(lab, record.snapshot.as_deref().unwrap(), &vm.disk, scratch);
    }
}

/// The record of `vm` in `session`.
fn record_of<'s>(session: &'s SessionRecord, vm: &str) -> &'s backflow_jobs::VmRecord {
    session
        .vms
        .iter()
        .find(|r| r.vm == vm)
        .unwrap_or_else(|| panic!("no record of {vm}: {session:#?}"))
}

/// A worker killed (SIGKILL) mid-backup: that attempt fails, the worker that started it ends the
/// backup job its run left, and the VM is backed up by another host's worker over TLS.
#[test]
fn a_worker_killed_mid_backup_is_retried_elsewhere_and_leaves_nothing() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    let vm = lab.vms().iter().find(|v| v.host == "h1").unwrap().clone();
    let job = job_for(&lab, &lab.job_file(), "one-vm", &vm.name, "");
    let run = PausedJob::start(&lab, &job, scratch.path());
    let runs = lab.pids_on("h1", "worker --run");
    assert_eq!(runs.len(), 1, "the worker's run on h1: {runs:?}");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &runs[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let released = release_pauses(&run.pause);
    let (status, stderr, session) = run.finish();
    released.store(true, Ordering::SeqCst);
    assert!(status.success(), "{status}: {stderr}\n{session:#?}");
    let record = record_of(&session, &vm.name);
    assert_eq!(record.result, Verdict::Success, "{record:#?}");
    assert_eq!(record.attempts.len(), 1, "{record:#?}");
    assert!(
        record.attempts[0].contains("h1's worker") && record.attempts[0].contains("killed"),
        "{record:#?}"
    );
    let placement = record.placement.as_ref().unwrap();
    assert_ne!(placement.worker_host, "h1", "{record:#?}");
    assert_eq!(placement.transport, Transport::NbdTls, "{record:#?}");
    // One snapshot: the killed attempt committed nothing.
    assert_eq!(snapshots_of(&lab, &vm.name).len(), 1);
    assert_restores_to_disk(
        &lab,
        record.snapshot.as_deref().unwrap(),
        &vm.disk,
        scratch.path(),
    );
    assert_no_workers_within(&lab, Duration::from_secs(30));
    assert_nothing_left(&lab, &vm.name);
    assert_next_backup_succeeds(&lab, scratch.path());
}

/// The network of a worker's host cut mid-backup: the controller gives that worker up, the VM is
/// retried on the third host, which takes the VM's backup job over from the lost worker. Once the
/// cable is back, the lost worker ends too, and nothing is left.
#[test]
fn a_worker_host_cut_off_mid_backup_loses_the_vm_to_a_retry_and_leaves_nothing() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    // h2's VM, h2's worker off: another host reads it over TLS, and that host is cut.
    let vm = lab.vms().iter().find(|v| v.host == "h2").unwrap().clone();
    let without = job_without_worker(&lab, "h2");
    let job = job_for(&lab, &without, "one-vm", &vm.name, "");
    let run = PausedJob::start(&lab, &job, scratch.path());
    let cut = ["h1", "h3"]
        .into_iter()
        .find(|h| !lab.pids_on(h, "worker --run").is_empty())
        .expect("a worker runs on h1 or h3");
    lab.cut_network(cut);
    let released = release_pauses(&run.pause);
    let (status, stderr, session) = run.finish();
    // The lost worker is still there, cut off; it ends once its sshd gives the controller up.
    lab.restore_network(cut);
    assert_no_workers_within(&lab, Duration::from_secs(120));
    released.store(true, Ordering::SeqCst);
    assert!(status.success(), "{status}: {stderr}\n{session:#?}");
    let record = record_of(&session, &vm.name);
    // Succeeded, with the take-over's warning.
    assert_eq!(record.result, Verdict::Warning, "{record:#?}");
    assert_eq!(record.attempts.len(), 1, "{record:#?}");
    assert!(
        record.attempts[0].contains(&format!("{cut}'s worker")),
        "{record:#?}"
    );
    let placement = record.placement.as_ref().unwrap();
    assert!(
        placement.worker_host != cut && placement.worker_host != "h2",
        "{record:#?}"
    );
    assert!(
        record
            .warnings
            .iter()
            .any(|w| w.contains("took over from a lost run")),
        "{record:#?}"
    );
    assert_eq!(snapshots_of(&lab, &vm.name).len(), 1);
    assert_restores_to_disk(
        &lab,
        record.snapshot.as_deref().unwrap(),
        &vm.disk,
        scratch.path(),
    );
    // Cut off from the VM's host, the lost run could not end its job (the retry did) and kept its
    // job directory, saying why; the next worker on its host sweeps it away.
    assert_next_backup_succeeds(&lab, scratch.path());
    assert_nothing_left(&lab, &vm.name);
}

/// `backflow daemon` stopped with SIGTERM while its workers back up the lab's VMs: every worker
/// exits, every backup job is ended, the session is recorded cancelled, and a VM has a snapshot
/// only if its record says it succeeded.
#[test]
fn sigterm_to_the_daemon_mid_session_ends_every_worker_and_backup_job() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    let jobs = scratch.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let job = std::fs::read_to_string(lab.job_file()).unwrap();
    let name = job
        .lines()
        .find_map(|l| l.strip_prefix("name: "))
        .unwrap()
        .to_owned();
    std::fs::write(
        jobs.join(format!("{name}.yaml")),
        format!("{job}schedule: [\"* * * * *\"]\n"),
    )
    .unwrap();
    let pause = scratch.path().join("paused");
    let mut cmd = backflow();
    lab.apply(&mut cmd)
        .env("BACKFLOW_PAUSE_MID_TRANSFER", &pause)
        .args(["--log", "info", "daemon", "--http", "127.0.0.1:0", "--jobs"])
        .arg(&jobs)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.path().join("daemon.log")).unwrap());
    let mut daemon = cmd.spawn().unwrap();
    // The first session starts at the next minute.
    wait_paused(&pause, &mut daemon);
    // Every VM's worker at its pause, or as far as it gets.
    std::thread::sleep(Duration::from_secs(3));
    let running: usize = lab
        .hosts()
        .iter()
        .map(|h| lab.pids_on(&h.name, "worker --run").len())
        .sum();
    assert!(running >= 1, "no worker runs");
    sigterm(&daemon);
    // Let the paused reads go on once the stop reached the workers: they stop as cancelled.
    std::thread::sleep(Duration::from_secs(3));
    let released = release_pauses(&pause);
    let status = wait_exit(&mut daemon, Duration::from_secs(180));
    released.store(true, Ordering::SeqCst);
    assert_eq!(status.code(), Some(0), "{status}");
    assert_no_workers_within(&lab, Duration::from_secs(30));
    for vm in lab.vms() {
        assert!(
            !lab.has_backup_job(&vm.name),
            "{} has a backup job",
            vm.name
        );
    }
    let mut cmd = backflow();
    lab.apply(&mut cmd).args([
        "sessions",
        "--json",
        "--job",
        &name,
        "--repo",
        lab.repository(),
    ]);
    let sessions: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(sessions[0]["result"], "cancelled", "{:#}", sessions[0]);
    let mut cancelled = 0;
    for record in sessions[0]["vms"].as_array().unwrap() {
        let vm = record["vm"].as_str().unwrap();
        let result = record["result"].as_str().unwrap();
        cancelled += usize::from(result == "cancelled");
        assert_eq!(
            snapshots_of(&lab, vm).len(),
            usize::from(result == "success" || result == "warning"),
            "{record:#}"
        );
    }
    assert!(cancelled >= 1, "{:#}", sessions[0]);
    eprintln!(
        "daemon's log:\n{}",
        std::fs::read_to_string(scratch.path().join("daemon.log")).unwrap()
    );
    for vm in lab.vms() {
        assert_nothing_left(&lab, &vm.name);
    }
    assert_next_backup_succeeds(&lab, scratch.path());
}

/// The network of a VM's own host cut while its worker there backs it up: the controller gives the
/// worker up and does not retry (the VM's host does not answer), the VM fails; the worker, cut off,
/// stops by itself and ends the backup job. Once the host is back nothing is left, the chain did not
/// move (no snapshot), and the next backup succeeds.
#[test]
fn a_vm_host_cut_off_mid_backup_fails_the_vm_cleanly() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    let vm = lab.vms().iter().find(|v| v.host == "h3").unwrap().clone();
    let job = job_for(&lab, &lab.job_file(), "one-vm", &vm.name, "");
    let run = PausedJob::start(&lab, &job, scratch.path());
    assert_eq!(lab.pids_on("h3", "worker --run").len(), 1);
    lab.cut_network("h3");
    let released = release_pauses(&run.pause);
    let (status, _, session) = run.finish();
    assert!(!status.success(), "{session:#?}");
    let record = record_of(&session, &vm.name);
    assert_eq!(record.result, Verdict::Failure, "{record:#?}");
    assert!(record.snapshot.is_none(), "{record:#?}");
    assert_eq!(record.attempts.len(), 2, "{record:#?}");
    assert!(
        record.attempts[0].contains("h3's worker")
            && record.attempts[1].contains("not retried")
            && record.attempts[1].contains("h3"),
        "{record:#?}"
    );
    // Cut off, the worker stops by itself (its sshd drops the dead session) and ends the job.
    assert_no_workers_within(&lab, Duration::from_secs(120));
    released.store(true, Ordering::SeqCst);
    lab.restore_network("h3");
    assert_nothing_left(&lab, &vm.name);
    assert!(snapshots_of(&lab, &vm.name).is_empty());
    assert_next_backup_succeeds(&lab, scratch.path());
}
