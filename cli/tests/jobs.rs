//! `backflow job run` and `backflow sessions` against real libvirt domains (`qemu:///system`,
//! started by `scripts/setup.sh`): VMs chosen by glob with exclusions, per-disk exclusion, stage
//! overrides, one VM failing without stopping the others, the recorded history, and a VM without
//! a guest agent (a note, not a warning; a failure with `freeze: required`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use backflow_testkit::libvirt::Domain;
use backflow_testkit::qemu::compare_images;
use common::*;

fn job_file(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A new repository in a scratch directory, and a job file there whose text `body` makes from
/// the repository's path.
fn job_in_new_repo(body: impl FnOnce(&Path) -> String) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    let file = job_file(work.path(), &body(&repo));
    (work, repo, file)
}

fn job_run(file: &Path, report: &Path) -> Command {
    let mut cmd = backflow();
    cmd.args(["job", "run", "--quiet", "--report"])
        .arg(report)
        .arg(file);
    cmd
}

fn run_job(file: &Path, report: &Path) -> std::process::Output {
    job_run(file, report).output().unwrap()
}

#[test]
fn a_job_backs_up_the_vms_it_selects_and_records_the_session() {
    let (vms, glob) = Domain::start_many("bf-job", 4, &[("vda", "16M"), ("vdb", "8M")]);
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 1M 2M", 10 + i));
        vm.guest_write("vdb", &format!("write -P {} 0 1M", 20 + i));
    }
    // vms[3] excluded by name; vdb excluded on vms[1] only; zstd overridden.
    let (work, repo, file) = job_in_new_repo(|repo| {
        format!(
            "name: nightly\nrepository: {}\nvms: [\"{glob}\"]\nexclude: [{}]\n\
             exclude_disks: [\"{}:vdb\"]\nvariables: {{freeze: \"off\"}}\n\
             overrides: {{zstd: {{level: 3}}, reader: {{workers: 1}}}}\nparallel: 2\n",
            repo.display(),
            vms[3].name(),
            vms[1].name()
        )
    });
    let report = work.path().join("session.json");
    run_ok(&mut job_run(&file, &report));
    let session = read_report(&report);
    assert_eq!(session["result"], "success", "{session}");
    let records = session["vms"].as_array().unwrap();
    let names: Vec<&str> = records.iter().map(|v| v["vm"].as_str().unwrap()).collect();
    assert_eq!(names, [vms[0].name(), vms[1].name(), vms[2].name()]);
    assert_eq!(records[1]["disks"], serde_json::json!(["vda"]));
    assert_eq!(records[1]["excluded_disks"], serde_json::json!(["vdb"]));
    // The override reached the pipeline: one reader worker.
    let stages = records[0]["report"]["stages"].as_array().unwrap();
    let reader = stages.iter().find(|s| s["kind"] == "reader").unwrap();
    assert_eq!(reader["workers"], 1);

    // Each snapshot restores identical to its VM's disks (vms[1] without vdb).
    for (record, vm) in records.iter().zip(&vms) {
        let id = record["snapshot"].as_str().unwrap();
        let out_dir = work.path().join(format!("restored-{id}"));
        std::fs::create_dir(&out_dir).unwrap();
        let restored = restore(&repo, id, &out_dir);
        assert!(restored.status.success());
        let disks = record["disks"].as_array().unwrap();
        assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), disks.len());
        for disk in disks {
            let target = disk.as_str().unwrap();
            let copy = work.path().join(format!("{}-{target}.raw", vm.name()));
            vm.copy_disk(target, &copy);
            if let Err(e) =
                compare_images(&out_dir.join(format!("{target}.raw")), "raw", &copy, "raw")
            {
                panic!("{} {target}: {e}", vm.name());
            }
        }
    }

    // One VM failing does not stop (or cancel) the others running beside it: vms[2] shut off,
    // its vda image gone, all three at once.
    vms[2].destroy();
    std::fs::remove_file(vms[2].disk("vda")).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("parallel: 2", "parallel: 3")).unwrap();
    let out = run_job(&file, &report);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 3 VMs failed") && stderr.contains(vms[2].name()),
        "{stderr}"
    );
    let session = read_report(&report);
    assert_eq!(session["result"], "failure");
    let results: Vec<&str> = session["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["success", "success", "failure"]);

    // Both sessions are in the history.
    let listed = run_ok(backflow().args(["sessions", "--json", "--repo"]).arg(&repo));
    let history: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["result"], "success");
    assert_eq!(history[1]["result"], "failure");
    assert_eq!(history[1]["vms"][2]["vm"], vms[2].name());
    let table = run_ok(backflow().args(["sessions", "--repo"]).arg(&repo));
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        table.lines().filter(|l| l.contains("nightly")).count(),
        2,
        "{table}"
    );
}

#[test]
fn job_file_mistakes_are_reported_with_file_line_and_column() {
    let work = tempfile::tempdir().unwrap();
    let file = job_file(
        work.path(),
        "name: nightly\nrepository: /srv/b\nvms: [web01]\nschedule: [\"0 25 * * *\"]\n",
    );
    let out = backflow()
        .args(["job", "validate"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4:", file.display())) && stderr.contains("cron expression"),
        "{stderr}"
    );
    let file = job_file(
        work.path(),
        "name: nightly\nrepository: /srv/b\nvms: [no-such-vm-anywhere]\n",
    );
    let out = run_job(&file, &work.path().join("r.json"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no VM named `no-such-vm-anywhere`"),
        "{stderr}"
    );
}

#[test]
fn retention_keeps_what_it_says_and_the_sessions_are_mailed() {
    use backflow_testkit::smtp::{Options, SmtpServer};
    let server = SmtpServer::start(Options::default());
    let (vms, glob) = Domain::start_many("bf-keep", 2, &[("vda", "16M")]);
    let (work, repo, file) = job_in_new_repo(|repo| {
        format!(
            "name: keep2\nrepository: {}\nvms: [\"{glob}\"]\nvariables: {{freeze: \"off\"}}\n\
             retention: {{keep_last: 2}}\nnotify:\n  server: 127.0.0.1\n  port: {}\n  \
             security: none\n  from: backflow@test.invalid\n  to: [ops@test.invalid]\n  \
             when: [success, failure]\n",
            repo.display(),
            server.port
        )
    });
    let report = work.path().join("session.json");
    let mut kept: Vec<Vec<String>> = vec![Vec::new(); vms.len()];
    for round in 0..3 {
        for vm in &vms {
            vm.guest_write("vda", &format!("write -P {} {}M 1M", 40 + round, round));
        }
        run_ok(&mut job_run(&file, &report));
        let session = read_report(&report);
        assert_eq!(session["notified"], true, "{session}");
        for (i, record) in session["vms"].as_array().unwrap().iter().enumerate() {
            kept[i].push(record["snapshot"].as_str().unwrap().to_owned());
            let forgotten: Vec<&str> = record["forgotten"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            if round == 2 {
                // The third backup of each VM retires its first.
                assert_eq!(forgotten, [kept[i][0].as_str()]);
            } else {
                assert!(forgotten.is_empty(), "{forgotten:?}");
            }
        }
    }
    // Exactly the two newest of each VM remain, and they restore.
    let mut remaining = snapshot_ids(&repo);
    remaining.sort();
    let mut expected: Vec<String> = kept.iter().flat_map(|k| k[1..].to_vec()).collect();
    expected.sort();
    assert_eq!(remaining, expected);
    assert_verifies(&repo, "after the job runs");

    // A failing VM: a failure mail naming it and the error.
    vms[1].destroy();
    std::fs::remove_file(vms[1].disk("vda")).unwrap();
    let out = run_job(&file, &report);
    assert_eq!(out.status.code(), Some(1));
    let mail = server.messages();
    assert_eq!(mail.len(), 4, "three successes and a failure");
    for m in &mail[..3] {
        let subject = m["subject"].as_str().unwrap();
        assert_eq!(subject, "[backflow] job keep2: success (2 VMs backed up)");
        let body = m["body"].as_str().unwrap();
        assert!(
            body.contains(vms[0].name()) && body.contains(vms[1].name()),
            "{body}"
        );
    }
    let failure = &mail[3];
    let subject = failure["subject"].as_str().unwrap();
    assert_eq!(subject, "[backflow] job keep2: failure (1 of 2 VMs failed)");
    let body = failure["body"].as_str().unwrap();
    assert!(
        body.contains(vms[1].name()) && body.contains("vda"),
        "{body}"
    );
    assert_eq!(
        snapshot_ids(&repo).len(),
        4,
        "a failed backup forgets nothing: {:?}",
        snapshot_ids(&repo)
    );
}

#[test]
fn a_vm_without_a_guest_agent_is_a_note_not_a_warning_unless_the_job_requires_a_freeze() {
    use backflow_testkit::smtp::{Options, SmtpServer};
    let server = SmtpServer::start(Options::default());
    // The test domains have no guest agent; the job leaves `freeze` at its default (auto) and
    // mails warnings and failures only.
    let (vms, _) = Domain::start_many("bf-note", 1, &[("vda", "16M")]);
    let vm = &vms[0];
    vm.guest_write("vda", "write -P 7 1M 1M");
    let (work, _repo, file) = job_in_new_repo(|repo| {
        format!(
            "name: agentless\nrepository: {}\nvms: [{}]\nnotify:\n  server: 127.0.0.1\n  \
             port: {}\n  security: none\n  from: backflow@test.invalid\n  \
             to: [ops@test.invalid]\n  when: [warning, failure]\n",
            repo.display(),
            vm.name(),
            server.port
        )
    });
    let report = work.path().join("session.json");
    run_ok(&mut job_run(&file, &report));
    let session = read_report(&report);
    assert_eq!(session["result"], "success", "{session:#}");
    let record = &session["vms"][0];
    assert_eq!(record["warnings"], serde_json::json!([]), "{record:#}");
    let notes = record["notes"].as_array().unwrap();
    assert!(
        notes.len() == 1 && notes[0].as_str().unwrap().contains("crash-consistent"),
        "{record:#}"
    );
    assert_eq!(session["notified"], serde_json::Value::Null, "{session:#}");
    assert!(server.messages().is_empty(), "a quiet night mails no one");

    // `freeze: required`: the same VM fails, and that is mailed.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}freeze: required\n")).unwrap();
    let out = run_job(&file, &report);
    assert_eq!(out.status.code(), Some(1));
    let session = read_report(&report);
    assert_eq!(session["result"], "failure", "{session:#}");
    let error = session["vms"][0]["error"].as_str().unwrap();
    assert!(error.contains("cannot be frozen"), "{error}");
    let mail = server.messages();
    assert_eq!(mail.len(), 1);
    assert_eq!(
        mail[0]["subject"],
        "[backflow] job agentless: failure (1 of 1 VM failed)"
    );
    assert!(!vm.has_backup_job());
}
