//! The `libvirt` source alone, against a real libvirtd and QEMU (`scripts/setup.sh` starts them):
//! a throwaway domain with two qcow2 disks, read through the source, `full` and `reader`, without
//! a repository. What it emits reads back as the disks' bytes, carries the domain's definition and
//! the tracking state, and the run leaves no job, no directory and (nothing was committed) no
//! checkpoint of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use backflow_pipeline::units::ByteSize;
use backflow_pipeline::{Message, OutcomeKind, Payload, Pipeline, RunOptions};
use backflow_testkit::libvirt::{Domain, URI};
use backflow_testkit::{Collect, placed};
use stage_full_map::{FullMap, FullMapOptions};
use stage_libvirt::{LibvirtOptions, LibvirtSource};
use stage_reader::{Reader, ReaderOptions};

const CHUNK: u64 = 128 << 10;

/// Runs source -> full -> reader -> collect on `vm`, with the job directories under `tmp`.
fn read_vm(vm: &Domain, tmp: &Path, options: LibvirtOptions) -> (OutcomeKind, Vec<Message>) {
    let source = LibvirtSource::new(LibvirtOptions {
        domain: vm.name().to_owned(),
        uri: URI.to_owned(),
        freeze: "off".into(),
        socket_dir: Some(tmp.to_owned()),
        ..options
    })
    .unwrap();
    let map = FullMap::new(FullMapOptions {
        chunk_size: Some(ByteSize(CHUNK)),
        ..Default::default()
    })
    .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline {
        name: "libvirt-source".into(),
        repository: None,
        stages: vec![
            placed("libvirt", Arc::new(source), 1),
            placed("full", Arc::new(map), 1),
            placed(
                "reader",
                Arc::new(Reader::new(ReaderOptions {}).unwrap()),
                2,
            ),
            placed("collect", Arc::new(Collect(out.clone())), 1),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let messages = std::mem::take(&mut *out.lock().unwrap());
    (report.outcome, messages)
}

/// Each disk's bytes as the chunks rebuild them.
fn rebuild(messages: &[Message]) -> BTreeMap<String, Vec<u8>> {
    let mut disks: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for message in messages {
        let Message::Chunk(chunk) = message else {
            panic!("the reader emits chunks, not {}", message.variant());
        };
        let image = disks
            .entry(chunk.disk.name().to_owned())
            .or_insert_with(|| vec![0; chunk.disk.size() as usize]);
        let at = chunk.offset() as usize;
        match &chunk.payload {
            Payload::Raw(data) => image[at..at + data.len()].copy_from_slice(data),
            Payload::Zero { .. } => {}
            other => panic!("unexpected payload {other:?}"),
        }
    }
    disks
}

#[test]
fn a_running_vm_reads_as_its_disks_with_definition_and_tracking() {
    let vm = Domain::start("bf-source", &[("vda", "16M"), ("vdb", "8M")]);
    vm.guest_write("vda", "write -P 0x5a 1M 3M");
    vm.guest_write("vdb", "write -P 0xa5 0 640k");
    let checkpoints_before = vm.checkpoints();
    let tmp = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (outcome, messages) = read_vm(&vm, tmp.path(), LibvirtOptions::default());
    assert_eq!(outcome, OutcomeKind::Succeeded);

    // Every disk, identical to the image (read by qemu-img beside the running VM).
    let disks = rebuild(&messages);
    assert_eq!(disks.keys().collect::<Vec<_>>(), ["vda", "vdb"]);
    for (target, bytes) in &disks {
        let copy = tmp.path().join(format!("{target}.raw"));
        vm.copy_disk(target, &copy);
        assert!(
            std::fs::read(&copy).unwrap() == *bytes,
            "disk {target} read through the backup job differs from the image"
        );
        std::fs::remove_file(&copy).unwrap();
    }

    // The disks carry the definition and what the snapshot would record.
    let Message::Chunk(first) = &messages[0] else {
        unreachable!()
    };
    let source = &first.disk.source;
    assert_eq!(source.vm, vm.name());
    let definition = source.definition.as_deref().expect("the domain XML");
    assert!(definition.contains(&format!("<name>{}</name>", vm.name())));
    let state = source.tracking.as_ref().expect("tracking").next_state();
    assert_eq!(state["method"], "libvirt-checkpoint");
    assert!(
        state["checkpoint"]
            .as_str()
            .unwrap()
            .starts_with("backflow.")
    );
    assert_eq!(state["size"], source.reader.size());

    // Nothing was committed: the run's checkpoint is gone with the job and its directory.
    assert_eq!(vm.checkpoints(), checkpoints_before);
    assert!(!vm.has_backup_job());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn a_chosen_disk_alone_and_an_unknown_one_refused() {
    let vm = Domain::start("bf-source", &[("vda", "8M"), ("vdb", "8M")]);
    let tmp = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (outcome, messages) = read_vm(
        &vm,
        tmp.path(),
        LibvirtOptions {
            disks: vec!["vdb".into()],
            checkpoint: String::new(),
            ..Default::default()
        },
    );
    assert_eq!(outcome, OutcomeKind::Succeeded);
    let disks = rebuild(&messages);
    assert_eq!(disks.keys().collect::<Vec<_>>(), ["vdb"]);
    assert!(vm.checkpoints().is_empty(), "checkpoint: \"\" makes none");

    let source = LibvirtSource::new(LibvirtOptions {
        domain: vm.name().to_owned(),
        uri: URI.to_owned(),
        disks: vec!["vdz".into()],
        ..Default::default()
    })
    .unwrap();
    let report = Pipeline {
        name: "unknown-disk".into(),
        repository: None,
        stages: vec![placed("libvirt", Arc::new(source), 1)],
        finaliser: None,
    }
    .run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    let error = report.errors.join("\n");
    assert!(
        error.contains("has no disk vdz") && error.contains("vda, vdb"),
        "{error}"
    );
    assert!(!vm.has_backup_job());
}
