//! Disks with partition tables and filesystems of known files, for the file-level restore tests:
//! no OS, made with `mkfs.ext4 -d`, `mkfs.xfs` (filled through a loop mount: needs root), GPT by
//! `sgdisk`, MBR written here. Content, owners, modes and times are fixed, so a test compares what
//! it extracts with the tree the filesystem was made from ([`Tree`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// A directory of known files ([`write_tree`]).
pub struct Tree {
    pub dir: PathBuf,
}

/// Writes the known tree into `dir` (made, must not exist). `revision` 0 is the first content;
/// 1 changes `/hello.txt` and adds `/added.txt` (for a later restore point).
///
/// Entries: nested directories, a file with a hole (`sparse.bin`: data at 0 and at 3 MiB), a
/// symbolic link (relative and absolute), distinct modes (0600, 0640, 0755, setuid 04755, a 0700
/// directory), owners (0:0, 1000:1001, 33:44, 1234:5678), names with spaces and UTF-8, and every
/// mtime a whole second of its own (directories' set last).
pub fn write_tree(dir: &Path, revision: u32) -> Tree {
    std::fs::create_dir(dir).unwrap();
    let mut time = 1_600_000_000i64;
    let mut next_time = || {
        time += 1000;
        time
    };
    let file = |rel: &str, data: &[u8], mode: u32, uid: u32, gid: u32, t: i64| {
        let path = dir.join(rel);
        std::fs::write(&path, data).unwrap();
        set(&path, mode, uid, gid, t, false);
    };
    let hello: &[u8] = if revision == 0 {
        b"hello, backflow\n"
    } else {
        b"hello again, backflow: changed after the first backup\n"
    };
    file("hello.txt", hello, 0o644, 0, 0, next_time());
    file(
        "script.sh",
        b"#!/bin/sh\necho hi\n",
        0o755,
        1234,
        5678,
        next_time(),
    );
    file(
        "setuid-tool",
        b"not really a program\n",
        0o4755,
        0,
        0,
        next_time(),
    );
    std::fs::create_dir_all(dir.join("nested/deeper/deepest")).unwrap();
    let data: Vec<u8> = (0..100 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    file(
        "nested/deeper/deepest/data.bin",
        &data,
        0o640,
        33,
        44,
        next_time(),
    );
    file(
        "nested/deeper/notes.txt",
        b"notes\n",
        0o600,
        1000,
        1001,
        next_time(),
    );
    std::fs::create_dir(dir.join("a dir ü")).unwrap();
    file(
        "a dir ü/file with spaces é.txt",
        "grüße aus dem backup\n".as_bytes(),
        0o600,
        1000,
        1001,
        next_time(),
    );
    // A hole between two written ranges.
    let sparse = dir.join("sparse.bin");
    {
        let f = File::create(&sparse).unwrap();
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&[0xA5; 8192], 0).unwrap();
        f.write_all_at(&[0x5A; 8192], 3 * MIB).unwrap();
    }
    set(&sparse, 0o644, 0, 0, next_time(), false);
    std::os::unix::fs::symlink("nested/deeper", dir.join("link")).unwrap();
    set(&dir.join("link"), 0, 1000, 1001, next_time(), true);
    std::os::unix::fs::symlink("/hello.txt", dir.join("abs-link")).unwrap();
    set(&dir.join("abs-link"), 0, 0, 0, next_time(), true);
    std::fs::create_dir(dir.join("empty-dir")).unwrap();
    if revision > 0 {
        file(
            "added.txt",
            b"added for the second restore point\n",
            0o664,
            1000,
            1001,
            next_time(),
        );
    }
    // Directories last, deepest first: writing into one changes its mtime.
    for (rel, mode, uid, gid) in [
        ("nested/deeper/deepest", 0o750, 33, 44),
        ("nested/deeper", 0o755, 0, 0),
        ("nested", 0o755, 0, 0),
        ("a dir ü", 0o755, 1000, 1001),
        ("empty-dir", 0o700, 0, 0),
        ("", 0o755, 0, 0),
    ] {
        set(&dir.join(rel), mode, uid, gid, next_time(), false);
    }
    Tree {
        dir: dir.to_path_buf(),
    }
}

/// A second, smaller tree (the first partition of the GPT disk): distinct content.
pub fn write_small_tree(dir: &Path) -> Tree {
    std::fs::create_dir(dir).unwrap();
    std::fs::write(dir.join("first.txt"), b"first partition\n").unwrap();
    set(&dir.join("first.txt"), 0o644, 0, 0, 1_500_000_000, false);
    set(dir, 0o755, 0, 0, 1_500_000_100, false);
    Tree {
        dir: dir.to_path_buf(),
    }
}

fn set(path: &Path, mode: u32, uid: u32, gid: u32, time: i64, link: bool) {
    use rustix::fs::{AtFlags, CWD, Gid, Timespec, Timestamps, Uid};
    let flags = if link {
        AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::empty()
    };
    rustix::fs::chownat(
        CWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        flags,
    )
    .unwrap();
    if !link {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let t = Timespec {
        tv_sec: time,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        flags,
    )
    .unwrap();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 filesystem image of `size` bytes holding `tree` (`mkfs.ext4 -d`), fixed UUID.
pub fn ext4_image(tree: &Tree, image: &Path, size: u64) {
    let _ = std::fs::remove_file(image);
    File::create(image).unwrap().set_len(size).unwrap();
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-U",
            "6b1f5b8e-0f4c-4d36-9f6c-15d3b7e2a001",
            "-L",
            "backflow",
            "-d",
        ])
        .arg(&tree.dir)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", "1600000000"));
}

/// An xfs filesystem image of `size` bytes (300 MiB at least) holding `tree`: `mkfs.xfs`, then
/// a loop mount of it into which `cp -a` copies the tree (owners, modes, times kept).
pub fn xfs_image(tree: &Tree, image: &Path, size: u64) {
    let _ = std::fs::remove_file(image);
    File::create(image).unwrap().set_len(size).unwrap();
    run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(image));
    let mnt = image.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(image)
        .arg(&mnt));
    let copied = Command::new("cp")
        .arg("-a")
        .arg(tree.dir.join("."))
        .arg(&mnt)
        .status();
    let unmounted = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    assert!(copied.unwrap().success(), "cp -a into the xfs image");
    assert!(unmounted.unwrap().success(), "umount {}", mnt.display());
}

/// A partition: its size and the filesystem image written into it (none: left empty).
pub struct Part<'a> {
    pub size: u64,
    pub image: Option<&'a Path>,
}

/// Where the partitions of [`gpt_disk`] and [`mbr_disk`] start: at 1 MiB, one after another.
pub fn starts(parts: &[Part]) -> Vec<u64> {
    let mut at = MIB;
    parts
        .iter()
        .map(|p| {
            let start = at;
            at += p.size;
            start
        })
        .collect()
}

fn disk_size(parts: &[Part]) -> u64 {
    // 1 MiB before, and room for GPT's backup table after.
    MIB + parts.iter().map(|p| p.size).sum::<u64>() + MIB
}

fn write_images(disk: &Path, parts: &[Part]) {
    let out = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    for (part, start) in parts.iter().zip(starts(parts)) {
        let Some(image) = part.image else { continue };
        let mut from = File::open(image).unwrap();
        // Sparse: only the image's non-zero blocks are written.
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0u64;
        loop {
            let n = std::io::Read::read(&mut from, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|b| *b != 0) {
                out.write_all_at(&buf[..n], start + off).unwrap();
            }
            off += n as u64;
        }
        assert!(
            off <= part.size,
            "{} is larger than its partition",
            image.display()
        );
    }
}

/// A GPT disk (`sgdisk`, fixed GUIDs) with `parts` in order, each image written at its start.
pub fn gpt_disk(disk: &Path, parts: &[Part]) {
    let _ = std::fs::remove_file(disk);
    File::create(disk)
        .unwrap()
        .set_len(disk_size(parts))
        .unwrap();
    let mut cmd = Command::new("sgdisk");
    cmd.args(["-o", "-U", "8c3e1f0a-5b2d-4e6f-9a7b-1c2d3e4f5a60"]);
    for (i, (part, start)) in parts.iter().zip(starts(parts)).enumerate() {
        let n = i + 1;
        cmd.arg(format!(
            "-n{n}:{}:{}",
            start / 512,
            (start + part.size) / 512 - 1
        ))
        .arg(format!("-u{n}:8c3e1f0a-5b2d-4e6f-9a7b-1c2d3e4f5a6{n}"));
    }
    run(cmd.arg(disk));
    write_images(disk, parts);
}

/// An MBR (DOS) disk with up to four primary Linux (0x83) partitions, the table written here.
pub fn mbr_disk(disk: &Path, parts: &[Part]) {
    assert!(parts.len() <= 4);
    let _ = std::fs::remove_file(disk);
    let f = File::create(disk).unwrap();
    f.set_len(disk_size(parts)).unwrap();
    let mut sector = [0u8; 512];
    sector[440..444].copy_from_slice(&0x4241_4346u32.to_le_bytes()); // disk signature
    for (i, (part, start)) in parts.iter().zip(starts(parts)).enumerate() {
        let e = 446 + 16 * i;
        // CHS fields unused (LBA): 0xFE 0xFF 0xFF as tools write for large disks.
        sector[e + 1..e + 4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        sector[e + 4] = 0x83;
        sector[e + 5..e + 8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        sector[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        sector[e + 12..e + 16].copy_from_slice(&((part.size / 512) as u32).to_le_bytes());
    }
    sector[510] = 0x55;
    sector[511] = 0xAA;
    f.write_all_at(&sector, 0).unwrap();
    drop(f);
    write_images(disk, parts);
}

/// libguestfs's environment on machines like the test machines (docs/files.md): the guest kernel
/// scripts/setup.sh unpacked (`$BACKFLOW_TOOLS/kernel/current/env`) unless SUPERMIN_KERNEL is set.
pub fn guestfs_env(cmd: &mut Command) {
    if std::env::var_os("SUPERMIN_KERNEL").is_some() {
        return;
    }
    let tools = std::env::var("BACKFLOW_TOOLS").unwrap_or_else(|_| "/opt/backflow-tools".into());
    if let Ok(text) = std::fs::read_to_string(Path::new(&tools).join("kernel/current/env")) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
}

/// An MBR disk of `size` bytes whose partition 1 is an LVM physical volume of volume group `vg0`
/// with one logical volume `root` (48 MiB, ext4) holding `tree`: made in libguestfs's appliance
/// (guestfish; `tar-in` of a tar made with `--numeric-owner` keeps owners, modes and times), since
/// LVM on the host would show the volume group to the host's own LVM.
pub fn lvm_disk(disk: &Path, tree: &Tree, size: u64) {
    let _ = std::fs::remove_file(disk);
    File::create(disk).unwrap().set_len(size).unwrap();
    let tarball = disk.with_extension("tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree.dir)
        .args(["--numeric-owner", "-cf"])
        .arg(&tarball)
        .arg("."));
    let mut cmd = Command::new("guestfish");
    cmd.args(["--rw", "--format=raw", "-a"]).arg(disk).arg("--");
    let tar = tarball.display().to_string();
    let script = [
        "run",
        "part-disk /dev/sda mbr",
        "pvcreate /dev/sda1",
        "vgcreate vg0 /dev/sda1",
        "lvcreate root vg0 48",
        "mkfs ext4 /dev/vg0/root",
        "mount /dev/vg0/root /",
        &format!("tar-in {tar} /"),
        "umount-all",
    ];
    for (i, line) in script.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(line.split(' '));
    }
    guestfs_env(&mut cmd);
    if std::env::var_os("LIBGUESTFS_BACKEND").is_none() {
        cmd.env("LIBGUESTFS_BACKEND", "direct");
    }
    if Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_amd").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
    {
        cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    }
    run(&mut cmd);
    let _ = std::fs::remove_file(&tarball);
}
