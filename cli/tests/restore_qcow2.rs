//! `backflow restore --format qcow2`: the real binary writes a qcow2 that QEMU reads back equal to
//! the backed-up image. Needs `qemu-img` and `qemu-nbd` on the PATH.

mod common;

use std::path::Path;
use std::process::Output;

use backflow_testkit::qemu::{assert_images_equal, image_info};
use common::*;

fn restore_as(repo: &Path, to: &Path, format: &str) -> Output {
    backflow()
        .args(["restore", "--quiet", "--repo"])
        .arg(repo)
        .args(["--snapshot", "latest", "--format", format, "--to"])
        .arg(to)
        .output()
        .unwrap()
}

/// `qcow2` is a qcow2 image of the same size as `raw` that QEMU reads back equal to it.
fn assert_qcow2_equals_raw(raw: &Path, qcow2: &Path) {
    let info = image_info(qcow2);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(
        info["virtual-size"],
        std::fs::metadata(raw).unwrap().len(),
        "{info}"
    );
    assert_images_equal(raw, "raw", qcow2, "qcow2");
}

#[test]
fn restore_format_qcow2_to_a_file_and_into_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 24 << 20, 5).unwrap();
    init_repo(&repo, "64K");
    backup(&image, &repo);

    let out = dir.path().join("restored.qcow2");
    let restored = restore_as(&repo, &out, "qcow2");
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_qcow2_equals_raw(&image, &out);

    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let restored = restore_as(&repo, &out_dir, "qcow2");
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let names: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["disk0.qcow2"]);
    assert_qcow2_equals_raw(&image, &out_dir.join("disk0.qcow2"));

    // The default stays raw.
    let raw = dir.path().join("restored.raw");
    let restored = restore(&repo, "latest", &raw);
    assert!(restored.status.success());
    assert_same_file(&image, &raw);
}

#[test]
fn an_unknown_format_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let out = dir.path().join("x.vmdk");
    let refused = restore_as(&repo, &out, "vmdk");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("qcow2"), "{stderr}");
    assert!(!out.exists());
}
