//! `backflow job run` and `backflow sessions` against real libvirt domains (`qemu:///system`,
//! started by `scripts/setup.sh`): VMs chosen by glob with exclusions, per-disk exclusion, stage
//! overrides, one VM failing without stopping the others, and the recorded history.

mod common;

use std::path::Path;

use backflow_testkit::libvirt::Domain;
use backflow_testkit::qemu::compare_images;
use common::*;

fn job_file(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

fn run_job(file: &Path, report: &Path) -> std::process::Output {
    backflow()
        .args(["job", "run", "--quiet", "--report"])
        .arg(report)
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn a_job_backs_up_the_vms_it_selects_and_records_the_session() {
    let vms: Vec<Domain> = (0..4)
        .map(|_| Domain::start("bf-job", &[("vda", "16M"), ("vdb", "8M")]))
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 1M 2M", 10 + i));
        vm.guest_write("vdb", &format!("write -P {} 0 1M", 20 + i));
    }
    let prefix = vms[0].name().rsplit_once('-').unwrap().0.to_owned();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    // vms[3] excluded by name; vdb excluded on vms[1] only; zstd overridden.
    let file = job_file(
        work.path(),
        &format!(
            "name: nightly\nrepository: {}\nvms: [\"{prefix}-*\"]\nexclude: [{}]\n\
             exclude_disks: [\"{}:vdb\"]\nvariables: {{freeze: \"off\"}}\n\
             overrides: {{zstd: {{level: 3}}, reader: {{workers: 1}}}}\nparallel: 2\n",
            repo.display(),
            vms[3].name(),
            vms[1].name()
        ),
    );
    let report = work.path().join("session.json");
    let out = run_job(&file, &report);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    // One VM failing does not stop the others: vms[2] shut off, its vda image gone.
    vms[2].destroy();
    std::fs::remove_file(vms[2].disk("vda")).unwrap();
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
