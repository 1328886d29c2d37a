//! `backflow files ls|get`: files of a restore point's filesystems through libguestfs, compared
//! with the trees the filesystems were made from (content by cmp, type, mode, owner, mtime,
//! symbolic link targets). Disks: GPT with ext4, ext4 and xfs partitions; MBR with one ext4.
//! Needs root (owners; the xfs image is filled through a loop mount) and libguestfs
//! (scripts/setup.sh; docs/files.md).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use backflow_testkit::disks::{self, MIB, Part, Tree};
use common::{backflow, backup_named, init_repo, snapshot_ids};

/// `backflow files ARGS` with the guest kernel scripts/setup.sh unpacked (machines without one
/// in /boot), for libguestfs's appliance.
fn files(repo: &Path, args: &[&str]) -> Output {
    let mut cmd = backflow();
    cmd.arg("files")
        .args(&args[..1])
        .arg("--repo")
        .arg(repo)
        .args(&args[1..]);
    disks::guestfs_env(&mut cmd);
    cmd.output().expect("running backflow files")
}

fn files_ok(repo: &Path, args: &[&str]) -> Output {
    let out = files(repo, args);
    assert!(
        out.status.success(),
        "files {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every entry under `dir`, by path relative to it (`/x/y`), but lost+found.
fn walk(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = format!("/{}", p.strip_prefix(dir).unwrap().display());
            if rel == "/lost+found" {
                continue;
            }
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.insert(rel, p);
        }
    }
    out
}

/// `got` holds exactly the entries of `tree` (below its root), each alike.
fn assert_same_tree(tree: &Tree, got: &Path) {
    let want = walk(&tree.dir);
    let have = walk(got);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        have.keys().collect::<Vec<_>>(),
        "entries of {}",
        got.display()
    );
    for (rel, w) in &want {
        let h = &have[rel];
        let (wm, hm) = (w.symlink_metadata().unwrap(), h.symlink_metadata().unwrap());
        assert_eq!(wm.file_type(), hm.file_type(), "{rel}: type");
        assert_eq!(wm.uid(), hm.uid(), "{rel}: uid");
        assert_eq!(wm.gid(), hm.gid(), "{rel}: gid");
        assert_eq!(wm.mtime(), hm.mtime(), "{rel}: mtime");
        if wm.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(w).unwrap(),
                std::fs::read_link(h).unwrap()
            );
            continue;
        }
        assert_eq!(wm.mode() & 0o7777, hm.mode() & 0o7777, "{rel}: mode");
        if wm.is_file() {
            common::assert_same_file(w, h);
        }
    }
}

/// `files ls -R --json` gave the entries of `tree`, under `prefix` (the listed directory).
fn assert_listing(tree: &Tree, json: &[u8]) {
    let entries: Vec<serde_json::Value> = serde_json::from_slice(json).unwrap();
    let listed: BTreeMap<String, &serde_json::Value> = entries
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_owned(), e))
        .filter(|(p, _)| !p.starts_with("/lost+found"))
        .collect();
    let want = walk(&tree.dir);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        listed.keys().collect::<Vec<_>>()
    );
    for (rel, w) in &want {
        let e = listed[rel];
        let m = w.symlink_metadata().unwrap();
        let kind = if m.is_dir() {
            "directory"
        } else if m.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
        };
        assert_eq!(e["type"], kind, "{rel}");
        assert_eq!(e["uid"], m.uid(), "{rel}");
        assert_eq!(e["gid"], m.gid(), "{rel}");
        assert_eq!(e["mtime"], m.mtime(), "{rel}");
        if kind == "symlink" {
            assert_eq!(
                e["target"].as_str().unwrap(),
                std::fs::read_link(w).unwrap().to_str().unwrap()
            );
        } else {
            assert_eq!(e["mode"], m.mode() & 0o7777, "{rel}");
        }
        if kind == "file" {
            assert_eq!(e["size"], m.len(), "{rel}");
        }
    }
}

struct Gpt {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    disk: PathBuf,
    small: Tree,
    tree: Tree,
    work: PathBuf,
}

/// GPT: 1 ext4 (a small tree), 2 ext4 (the known tree), 3 xfs (the known tree); backed up once.
fn gpt(with_xfs: bool) -> Gpt {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_path_buf();
    let small = disks::write_small_tree(&work.join("small"));
    let tree = disks::write_tree(&work.join("tree"), 0);
    disks::ext4_image(&small, &work.join("p1.img"), 8 * MIB);
    disks::ext4_image(&tree, &work.join("p2.img"), 32 * MIB);
    let p1 = work.join("p1.img");
    let p2 = work.join("p2.img");
    let p3 = work.join("p3.img");
    let mut parts = vec![
        Part {
            size: 8 * MIB,
            image: Some(&p1),
        },
        Part {
            size: 32 * MIB,
            image: Some(&p2),
        },
    ];
    if with_xfs {
        disks::xfs_image(&tree, &p3, 300 * MIB);
        parts.push(Part {
            size: 300 * MIB,
            image: Some(&p3),
        });
    }
    let disk = work.join("vda.img");
    disks::gpt_disk(&disk, &parts);
    let repo = work.join("repo");
    init_repo(&repo, "1M");
    backup_named(&disk, &repo, "vda");
    Gpt {
        _dir: dir,
        repo,
        disk,
        small,
        tree,
        work,
    }
}

/// A full restore point, then an incremental one after partition 2 changed (a file changed, one
/// added): `ls -R` and `get` of partition 2 give its tree each time; `get` of a single file and of
/// a symbolic link; the first partition's file.
#[test]
fn gpt_ext4_full_and_incremental() {
    let g = gpt(false);
    let listed = files_ok(&g.repo, &["ls", "--json"]);
    let fs: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<(&str, &str)> = fs
        .iter()
        .map(|f| (f["device"].as_str().unwrap(), f["type"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("/dev/sda1", "ext4"), ("/dev/sda2", "ext4")]);

    let ls = files_ok(&g.repo, &["ls", "-R", "--json", "2:/"]);
    assert_listing(&g.tree, &ls.stdout);

    let out = g.work.join("out-full");
    files_ok(
        &g.repo,
        &["get", "/dev/sda2:/", "--to", out.to_str().unwrap()],
    );
    assert_same_tree(&g.tree, &out);

    // Single file from the first partition, and a symbolic link kept as one.
    let one = g.work.join("out-one");
    files_ok(
        &g.repo,
        &["get", "sda1:/first.txt", "--to", one.to_str().unwrap()],
    );
    common::assert_same_file(&g.small.dir.join("first.txt"), &one.join("first.txt"));
    let m = one.join("first.txt").metadata().unwrap();
    assert_eq!((m.mtime(), m.mode() & 0o7777), (1_500_000_000, 0o644));

    // Second restore point: partition 2 rebuilt with revision 1 of the tree.
    let tree2 = disks::write_tree(&g.work.join("tree2"), 1);
    disks::ext4_image(&tree2, &g.work.join("p2b.img"), 32 * MIB);
    let p2b = g.work.join("p2b.img");
    let p1 = g.work.join("p1.img");
    disks::gpt_disk(
        &g.disk,
        &[
            Part {
                size: 8 * MIB,
                image: Some(&p1),
            },
            Part {
                size: 32 * MIB,
                image: Some(&p2b),
            },
        ],
    );
    backup_named(&g.disk, &g.repo, "vda");
    let ids = snapshot_ids(&g.repo);
    assert_eq!(ids.len(), 2);
    let out2 = g.work.join("out-incremental");
    files_ok(&g.repo, &["get", "2:/", "--to", out2.to_str().unwrap()]);
    assert_same_tree(&tree2, &out2);
    // The first restore point still has the first tree's hello.txt; a directory by name.
    let old = g.work.join("out-old");
    files_ok(
        &g.repo,
        &[
            "get",
            "--snapshot",
            &ids[0],
            "2:/nested",
            "--to",
            old.to_str().unwrap(),
        ],
    );
    let nested = Tree {
        dir: g.tree.dir.join("nested"),
    };
    assert_same_tree(&nested, &old.join("nested"));
}

/// xfs in the third partition, and the errors: a missing path, an unknown filesystem, several
/// filesystems and none named, an existing target.
#[test]
fn gpt_xfs_and_errors() {
    let g = gpt(true);
    let out = g.work.join("out-xfs");
    files_ok(&g.repo, &["get", "3:/", "--to", out.to_str().unwrap()]);
    assert_same_tree(&g.tree, &out);

    let missing = files(&g.repo, &["ls", "2:/no/such/file"]);
    common::assert_failed(
        &missing,
        2,
        "/dev/sda2:/no/such/file: no such file or directory",
    );
    let unknown = files(
        &g.repo,
        &[
            "get",
            "7:/hello.txt",
            "--to",
            g.work.join("x").to_str().unwrap(),
        ],
    );
    common::assert_failed(&unknown, 2, "no filesystem 7 on the disk");
    let ambiguous = files(&g.repo, &["ls", "/hello.txt"]);
    common::assert_failed(&ambiguous, 2, "/dev/sda3 (xfs)");
    // Checked before the appliance starts.
    let exists = files(&g.repo, &["get", "3:/", "--to", out.to_str().unwrap()]);
    common::assert_failed(&exists, 2, "--force replaces");
}

/// MBR, one ext4 partition: no FS needed; a single file with its owner, mode and mtime; `ls` of a
/// directory.
#[test]
fn mbr_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let tree = disks::write_tree(&work.join("tree"), 0);
    disks::ext4_image(&tree, &work.join("p1.img"), 32 * MIB);
    let p1 = work.join("p1.img");
    let disk = work.join("vda.img");
    disks::mbr_disk(
        &disk,
        &[Part {
            size: 32 * MIB,
            image: Some(&p1),
        }],
    );
    let repo = work.join("repo");
    init_repo(&repo, "1M");
    backup_named(&disk, &repo, "vda");
    let out = work.join("out");
    files_ok(&repo, &["get", "/", "--to", out.to_str().unwrap()]);
    assert_same_tree(&tree, &out);
    let ls = files_ok(&repo, &["ls", "/nested"]);
    let text = String::from_utf8(ls.stdout).unwrap();
    assert!(
        text.contains("drwxr-xr-x     0     0") && text.ends_with(" /nested/deeper\n"),
        "{text}"
    );
}

/// LVM: an ext4 logical volume in a volume group on partition 1 of an MBR disk.
#[test]
fn lvm_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let tree = disks::write_tree(&work.join("tree"), 0);
    let disk = work.join("vda.img");
    disks::lvm_disk(&disk, &tree, 64 * MIB);
    let repo = work.join("repo");
    init_repo(&repo, "1M");
    backup_named(&disk, &repo, "vda");
    let listed = files_ok(&repo, &["ls"]);
    let text = String::from_utf8(listed.stdout).unwrap();
    assert!(
        text.contains("/dev/vg0/root") && text.contains("ext4"),
        "{text}"
    );
    let out = work.join("out");
    files_ok(&repo, &["get", "vg0/root:/", "--to", out.to_str().unwrap()]);
    assert_same_tree(&tree, &out);
}
