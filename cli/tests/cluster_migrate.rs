//! A VM live-migrated between two backups, on the three-host lab (testkit::cluster): the next
//! backup, on the VM's new host, stays incremental from the checkpoint the repository recorded
//! (redefined there, its bitmap checked in the image); when the bitmaps were lost on the way, it
//! reads the disk whole, deduplicated against the parent, with a warning saying so. A checkpoint
//! libvirt forgot on the same host is redefined the same way. Every restore point restores
//! identical to the disk as it was at its backup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use backflow_jobs::{Verdict, VmRecord};
use backflow_testkit::cluster::Lab;
use common::cluster::*;

/// The repository's chunk size (`backflow init`'s default): what a read is rounded to.
const CHUNK: u64 = 128 << 10;
const MIB: u64 = 1 << 20;

/// What the guest writes after the first backup: chunk-aligned, so that the incremental reads
/// exactly these bytes (1 MiB and 256 KiB).
const SECOND: &[(u64, u64, u8)] = &[(16 * MIB, MIB, 0xa1), (30 * MIB, 256 << 10, 0xa2)];
/// And after the second: 512 KiB, a byte of its own per chunk (chunks alike would be stored once).
const THIRD: &[(u64, u64, u8)] = &[
    (48 * MIB, CHUNK, 0xa3),
    (48 * MIB + CHUNK, CHUNK, 0xa4),
    (50 * MIB, CHUNK, 0xa5),
    (52 * MIB, CHUNK, 0xa6),
];

/// `backflow job run JOB` with the lab's store, which must succeed: `vm`'s record.
fn backup(lab: &Lab, job: &Path, vm: &str, report: &Path) -> VmRecord {
    let record = run_job(lab, job, report)
        .vms
        .into_iter()
        .find(|r| r.vm == vm)
        .unwrap_or_else(|| panic!("no record of {vm}"));
    assert!(record.snapshot.is_some(), "{record:#?}");
    record
}

/// A raw copy of `disk` as it is now (the VM runs no guest: it changes only when the test writes).
fn copy_of(disk: &Path, to: &Path) -> PathBuf {
    let status = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(disk)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert {}", disk.display());
    to.to_owned()
}

/// The bytes of `disk` that hold data (`qemu-img map`), in whole chunks: what a full read reads.
fn allocated_chunks(disk: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success());
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut chunks: Vec<u64> = map
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .flat_map(|e| {
            let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            start / CHUNK..(start + length).div_ceil(CHUNK)
        })
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks.len() as u64 * CHUNK
}

/// The raw bytes that reached the compressor: the chunks no earlier snapshot had (known chunks
/// go on without data).
fn bytes_compressed(record: &VmRecord) -> u64 {
    let report = record.report.as_ref().expect("the run's report");
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "zstd")
        .unwrap_or_else(|| panic!("no zstd stage in {report:#}"))["bytes_in"]
        .as_u64()
        .unwrap()
}

/// The checkpoints of `vm` that libvirt on `host` knows.
fn checkpoints(lab: &Lab, host: &str, vm: &str) -> Vec<String> {
    lab.virsh(host, &["checkpoint-list", vm, "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Removes every dirty bitmap of `vm`'s disk in QEMU on `host` (QMP), as a migration that lost
/// them would leave it: libvirt's checkpoint metadata stays, the bitmaps are gone.
fn remove_bitmaps(lab: &Lab, host: &str, vm: &str) {
    let nodes = lab.virsh(
        host,
        &[
            "qemu-monitor-command",
            vm,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ],
    );
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let mut removed = 0;
    for node in nodes["return"].as_array().unwrap() {
        for bitmap in node["dirty-bitmaps"].as_array().into_iter().flatten() {
            let remove = serde_json::json!({
                "execute": "block-dirty-bitmap-remove",
                "arguments": {"node": node["node-name"], "name": bitmap["name"]},
            });
            let reply = lab.virsh(host, &["qemu-monitor-command", vm, &remove.to_string()]);
            assert!(reply.contains("\"return\""), "{remove}: {reply}");
            removed += 1;
        }
    }
    assert!(removed > 0, "{vm} on {host} had no bitmap: {nodes}");
}

#[test]
fn a_migrated_vm_stays_incremental_and_reads_whole_once_its_bitmaps_are_lost() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    let vm = lab.vms().iter().find(|v| v.host == "h1").unwrap().clone();
    let job = job_for(
        &lab,
        &lab.job_file(),
        &format!("job-{}", vm.name),
        &vm.name,
        "",
    );
    let report = scratch.path().join("session.json");
    let mut points = Vec::new();

    // The first backup, on h1: full.
    let first = backup(&lab, &job, &vm.name, &report);
    assert_eq!(first.result, Verdict::Success, "{first:#?}");
    assert_eq!(first.placement.as_ref().unwrap().vm_host, "h1");
    assert_eq!(first.bytes_read, allocated_chunks(&vm.disk), "{first:#?}");
    let s1 = first.snapshot.clone().unwrap();
    points.push((
        s1.clone(),
        copy_of(&vm.disk, &scratch.path().join("s1.raw")),
    ));

    // The guest writes 1.25 MiB; the VM moves to h2, whose libvirt has never heard of its
    // checkpoint; the bitmap moves with the image.
    for &(offset, len, byte) in SECOND {
        lab.write_in_vm(&vm.name, offset, len, byte);
    }
    lab.migrate(&vm.name, "h2");
    assert_eq!(lab.vm_host(&vm.name).unwrap().name, "h2");

    // The second backup, on h2: incremental, reading exactly what the guest wrote.
    let second = backup(&lab, &job, &vm.name, &report);
    let written: u64 = SECOND.iter().map(|w| w.1).sum();
    eprintln!(
        "after the migration: read {} bytes (the guest wrote {written}); the first, full, read {}",
        second.bytes_read, first.bytes_read
    );
    assert_eq!(second.result, Verdict::Success, "{second:#?}");
    assert!(second.warnings.is_empty(), "{:?}", second.warnings);
    let placement = second.placement.as_ref().unwrap();
    assert_eq!(
        (placement.vm_host.as_str(), placement.worker_host.as_str()),
        ("h2", "h2")
    );
    assert_eq!(second.bytes_read, written, "{second:#?}");
    assert!(
        second
            .notes
            .iter()
            .any(|n| n.contains("moved from host h1 to h2")
                && n.contains("redefined")
                && n.contains("incremental")),
        "{:?}",
        second.notes
    );
    // The chain goes on on h2: the checkpoint this backup made, and no other.
    let on_h2 = checkpoints(&lab, "h2", &vm.name);
    assert_eq!(on_h2.len(), 1, "{on_h2:?}");
    assert!(on_h2[0].starts_with("backflow."), "{on_h2:?}");
    let s2 = second.snapshot.clone().unwrap();
    points.push((
        s2.clone(),
        copy_of(&vm.disk, &scratch.path().join("s2.raw")),
    ));

    // The bitmaps are lost, the guest writes 512 KiB, and the VM moves back to h1.
    remove_bitmaps(&lab, "h2", &vm.name);
    for &(offset, len, byte) in THIRD {
        lab.write_in_vm(&vm.name, offset, len, byte);
    }
    lab.migrate(&vm.name, "h1");

    // The third backup, on h1: the whole disk read, deduplicated against the second, with a
    // warning saying why; never a failure.
    let third = backup(&lab, &job, &vm.name, &report);
    let allocated = allocated_chunks(&vm.disk);
    let new: u64 = THIRD.iter().map(|w| w.1).sum();
    eprintln!(
        "bitmaps lost: read {} bytes (allocated: {allocated}), compressed and stored {} new \
         bytes (the guest wrote {new})",
        third.bytes_read,
        bytes_compressed(&third)
    );
    assert_eq!(third.result, Verdict::Warning, "{third:#?}");
    assert_eq!(third.warnings.len(), 1, "{:?}", third.warnings);
    let warning = &third.warnings[0];
    for expected in [
        "moved from host h2 to h1",
        "lost",
        "missing or broken bitmap",
        "reading all of it",
        &format!("deduplicated against snapshot {s2}"),
    ] {
        assert!(warning.contains(expected), "{warning} lacks {expected}");
    }
    assert_eq!(third.bytes_read, allocated, "{third:#?}");
    assert_eq!(
        bytes_compressed(&third),
        new,
        "only the chunks the second backup lacks are stored"
    );
    let on_h1 = checkpoints(&lab, "h1", &vm.name);
    assert_eq!(on_h1.len(), 1, "{on_h1:?}");
    assert!(!on_h2.contains(&on_h1[0]), "{on_h1:?}");
    points.push((
        third.snapshot.clone().unwrap(),
        copy_of(&vm.disk, &scratch.path().join("s3.raw")),
    ));

    // The chain is whole again: the next backup, without a move, is incremental. Metadata of a
    // checkpoint of ours whose bitmaps are gone (as an earlier stay on h1, left without
    // --undefinesource, would leave) is forgotten with the older checkpoints.
    let stale = lab.dir().join("stale-checkpoint.xml");
    std::fs::write(
        &stale,
        "<domaincheckpoint><name>backflow.1-stale</name><creationTime>1700000000</creationTime>\
         <disks><disk name='vda' checkpoint='bitmap' bitmap='backflow.1-stale'/></disks>\
         </domaincheckpoint>",
    )
    .unwrap();
    lab.virsh(
        "h1",
        &[
            "checkpoint-create",
            &vm.name,
            stale.to_str().unwrap(),
            "--redefine",
        ],
    );
    assert_eq!(checkpoints(&lab, "h1", &vm.name).len(), 2);
    let fourth = backup(&lab, &job, &vm.name, &report);
    assert_eq!(fourth.result, Verdict::Success, "{fourth:#?}");
    assert_eq!(fourth.bytes_read, 0, "{fourth:#?}");
    let left = checkpoints(&lab, "h1", &vm.name);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        !left.contains(&on_h1[0]) && left[0].starts_with("backflow."),
        "{left:?}"
    );
    points.push((
        fourth.snapshot.clone().unwrap(),
        copy_of(&vm.disk, &scratch.path().join("s4.raw")),
    ));

    // libvirt on the same host forgets the checkpoint (its metadata deleted, the bitmap kept):
    // redefined from the record, the next backup stays incremental.
    lab.virsh(
        "h1",
        &["checkpoint-delete", &vm.name, &left[0], "--metadata"],
    );
    assert!(checkpoints(&lab, "h1", &vm.name).is_empty());
    lab.write_in_vm(&vm.name, 56 * MIB, CHUNK, 0xa7);
    let fifth = backup(&lab, &job, &vm.name, &report);
    assert_eq!(fifth.result, Verdict::Success, "{fifth:#?}");
    assert_eq!(fifth.bytes_read, CHUNK, "{fifth:#?}");
    assert!(
        fifth
            .notes
            .iter()
            .any(|n| n.contains("no longer knew it") && n.contains(&left[0])),
        "{:?}",
        fifth.notes
    );
    let last = checkpoints(&lab, "h1", &vm.name);
    assert_eq!(last.len(), 1, "{last:?}");
    assert_ne!(last, left);
    points.push((
        fifth.snapshot.clone().unwrap(),
        copy_of(&vm.disk, &scratch.path().join("s5.raw")),
    ));

    // Every restore point restores identical to the disk at its backup.
    for (snapshot, copy) in &points {
        assert_restores_to(&lab, snapshot, copy, "raw", scratch.path());
    }
}
