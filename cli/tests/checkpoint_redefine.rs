//! A checkpoint libvirt no longer knows (its metadata deleted, as on a host the VM just moved to)
//! is redefined from the parent snapshot's record, per disk: a disk whose bitmap is still in its
//! image stays incremental, one whose bitmap is gone is read whole with a warning. The machine's
//! libvirtd, a throwaway VM with two qcow2 disks, guest writes through QEMU's monitor.

mod common;

use backflow_testkit::libvirt::Domain;
use common::vm::*;
use common::*;

/// Removes `vm`'s dirty bitmap `name` from the qcow2 node of disk `target` (QMP), libvirt's
/// metadata untouched: a bitmap lost behind libvirt's back.
fn remove_bitmap(vm: &Domain, target: &str, name: &str) {
    let nodes = vm.virsh(&[
        "qemu-monitor-command",
        vm.name(),
        r#"{"execute":"query-block"}"#,
    ]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    // libvirt names a disk's device after its alias: virtio-disk0 is vda, virtio-disk1 vdb.
    let qdev = format!("virtio-disk{}/", target.as_bytes()[2] - b'a');
    let device = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["qdev"].as_str().is_some_and(|q| q.contains(&qdev)))
        .unwrap_or_else(|| panic!("no device {qdev} in {nodes}"));
    let node = device["inserted"]["node-name"].as_str().unwrap();
    let remove = serde_json::json!({
        "execute": "block-dirty-bitmap-remove",
        "arguments": {"node": node, "name": name},
    });
    let reply = vm.virsh(&["qemu-monitor-command", vm.name(), &remove.to_string()]);
    assert!(reply.contains("\"return\""), "{remove}: {reply}");
}

#[test]
fn a_forgotten_checkpoint_is_redefined_per_disk_where_its_bitmap_survived() {
    let vm = Domain::start("bf-redef", &[("vda", "64M"), ("vdb", "32M")]);
    let (dir, repo, tmp) = vm_dirs();
    let report = dir.path().join("report.json");
    guest_writes(&vm, "vda", VDA_FIRST, 1);
    guest_writes(&vm, "vdb", VDB_FIRST, 2);
    let mut points = Vec::new();
    let backup = |points: &mut Vec<Point>| {
        let disks: Vec<(String, std::path::PathBuf)> = ["vda", "vdb"]
            .iter()
            .map(|t| {
                let copy = dir.path().join(format!("at-{}-{t}.raw", points.len()));
                vm.copy_disk(t, &copy);
                (t.to_string(), copy)
            })
            .collect();
        run_ok(
            backup_vm_command(&tmp, vm.name(), &repo)
                .arg("--report")
                .arg(&report),
        );
        let report = read_report(&report);
        points.push(Point {
            id: report["snapshot"].as_str().unwrap().to_owned(),
            disks,
        });
        assert_nothing_left(&vm, &tmp);
        report
    };
    backup(&mut points);
    let checkpoint = vm.checkpoints();
    assert_eq!(checkpoint.len(), 1, "{checkpoint:?}");
    let checkpoint = &checkpoint[0];

    // libvirt forgets the checkpoint; vdb's bitmap goes too, vda's stays.
    vm.virsh(&["checkpoint-delete", vm.name(), checkpoint, "--metadata"]);
    remove_bitmap(&vm, "vdb", checkpoint);
    const VDA: &[(u64, u64)] = &[(20 * MIB, 256 << 10)];
    const VDB: &[(u64, u64)] = &[(8 * MIB, 128 << 10)];
    guest_writes(&vm, "vda", VDA, 21);
    guest_writes(&vm, "vdb", VDB, 22);
    let second = backup(&mut points);
    let warnings = warnings(&second);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("disk vdb:")
            && warnings[0].contains(&format!("{checkpoint} no longer exists"))
            && warnings[0].contains("missing or broken bitmap")
            && warnings[0].contains("reading all of it"),
        "{warnings:?}"
    );
    let notes = second["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| {
            let n = n.as_str().unwrap();
            n.contains("no longer knew it") && n.contains("(vda)")
        }),
        "{notes:?}"
    );
    // vda: only its new chunks; vdb: all of its data.
    let vdb_all = chunk_bytes(&[VDB_FIRST, VDB].concat());
    assert_eq!(bytes_read(&second), chunk_bytes(VDA) + vdb_all, "{second}");
    let left = vm.checkpoints();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(&left[0], checkpoint);

    // Both disks incremental again.
    guest_writes(&vm, "vdb", VDB, 23);
    let third = backup(&mut points);
    assert!(self::warnings(&third).is_empty(), "{third}");
    assert_eq!(bytes_read(&third), chunk_bytes(VDB), "{third}");
    for point in &points {
        restore_point(&repo, point, dir.path());
    }
}
