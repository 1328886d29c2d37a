//! Hostile input: disk and VM names that would be paths, specs, job files and sources that never
//! end or never open. Each is refused with a clear error and the exit code of the README's table
//! (2: bad input, nothing ran; 1: the run failed), within a timeout: a hang fails the test.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Longest any of these commands may take; they all end in milliseconds when they work.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `backflow ARGS` under [`TIMEOUT`]: its exit code and stderr.
fn run_bounded<I, S>(args: I) -> (Option<i32>, String)
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut child = backflow()
        .args(args.into_iter().map(Into::into))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, TIMEOUT);
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

fn var(key: &str, value: impl AsRef<std::ffi::OsStr>) -> [OsString; 2] {
    let mut pair = OsString::from(format!("{key}="));
    pair.push(value.as_ref());
    ["--var".into(), pair]
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// Every file under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn disk_and_vm_names_that_could_be_paths_are_refused_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 1 << 20, 1).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let backup_image = spec("backup-image.yaml");
    let long = "d".repeat(129);
    // The line of the image stage's `disk:` option in the spec, where the errors point.
    let disk_line = std::fs::read_to_string(&backup_image)
        .unwrap()
        .lines()
        .position(|l| l.trim() == "disk: ${disk}")
        .expect("backup-image.yaml sets the image stage's disk")
        + 1;
    for (name, problem) in [
        ("../x", "contains `/`"),
        ("../../escape", "contains `/`"),
        ("/etc/x", "contains `/`"),
        ("a\nb", "contains '\\n'"),
        (".", "names a directory"),
        ("..", "names a directory"),
        (".hidden", "starts with `.`"),
        ("-x", "starts with `-`"),
        (long.as_str(), "has 129 characters"),
    ] {
        for command in ["validate", "run"] {
            let mut args: Vec<OsString> = vec![command.into(), backup_image.clone().into()];
            args.extend(var("source", &image));
            args.extend(var("repo", &repo));
            args.extend(var("disk", name));
            let (code, stderr) = run_bounded(args);
            assert_eq!(code, Some(2), "{command} disk={name:?}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "specs/backup-image.yaml:{disk_line}:11: stages[0] (image).disk: disk name"
                )) && stderr.contains(problem),
                "{command} disk={name:?}: {stderr}"
            );
        }
    }
    // A name taken from the file name is checked too, and reported at `path`.
    let hidden = dir.path().join(".hidden.img");
    std::fs::copy(&image, &hidden).unwrap();
    let mut args: Vec<OsString> = vec!["run".into(), backup_image.clone().into()];
    args.extend(var("source", &hidden));
    args.extend(var("repo", &repo));
    let (code, stderr) = run_bounded(args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("stages[0] (image).path: the file name gives the disk its name")
            && stderr.contains("set `disk`"),
        "{stderr}"
    );
    assert!(snapshot_ids(&repo).is_empty());

    // VM names: the libvirt source's domain, the name a restore defines a domain under.
    let mut args: Vec<OsString> = vec!["validate".into(), spec("backup-vm.yaml").into()];
    args.extend(var("domain", "../web01"));
    args.extend(var("repo", &repo));
    let (code, stderr) = run_bounded(args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("stages[0] (libvirt).domain: VM name \"../web01\" contains `/`"),
        "{stderr}"
    );
    let mut args: Vec<OsString> = vec!["validate".into(), spec("restore-vm.yaml").into()];
    args.extend(var("repo", &repo));
    args.extend(var("to", dir.path()));
    args.extend(var("name", "copy\nof web01"));
    let (code, stderr) = run_bounded(args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cleanup.name: VM name \"copy\\nof web01\" contains '\\n'"),
        "{stderr}"
    );
}

/// Backs `image` up as disk `abcd`, then rewrites its manifest so that the disk is named `../x`
/// (same length), with the checksum made right again: what an older or hostile tool could have
/// written. Returns the snapshot id.
fn manifest_with_disk_named_dot_dot_x(image: &Path, repo: &Path) -> String {
    let report = backup_named(image, repo, "abcd");
    let id = report["snapshot"].as_str().unwrap().to_owned();
    let path = repo.join("snapshots").join(format!("{id}.snap"));
    let mut bytes = std::fs::read(&path).unwrap();
    let (from, to) = (br#""name":"abcd""#, br#""name":"../x""#);
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the disk's name in the manifest's metadata");
    bytes[at..at + from.len()].copy_from_slice(to);
    let body = bytes.len() - 32;
    let sum = *blake3::hash(&bytes[..body]).as_bytes();
    bytes[body..].copy_from_slice(&sum);
    std::fs::write(&path, bytes).unwrap();
    id
}

#[test]
fn a_manifest_naming_a_disk_by_a_path_restores_nothing_outside_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 4 << 20, 2).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let id = manifest_with_disk_named_dot_dot_x(&image, &repo);
    // The crafted manifest reads as a valid one: only its name is hostile.
    assert!(verify(&repo, true).status.success());

    let work = dir.path().join("work");
    let target = work.join("restore");
    std::fs::create_dir_all(&target).unwrap();
    for format in ["raw", "qcow2"] {
        let (code, stderr) = run_bounded([
            "restore".as_ref(),
            "--quiet".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
            "--to".as_ref(),
            target.as_os_str(),
            "--format".as_ref(),
            format.as_ref(),
        ]);
        // Refused by the disk writer's preflight, before anything was read: bad input.
        assert_eq!(code, Some(2), "{format}: {stderr}");
        assert!(
            stderr.contains(&format!("snapshot {id}: refusing to restore into"))
                && stderr.contains("disk name \"../x\" contains `/`"),
            "{format}: {stderr}"
        );
        assert_eq!(tree(&work), vec![target.clone()], "{format}: files written");
    }

    // As a new VM: the images are refused before anything is defined.
    let name = format!("backflow-hostile-{}", std::process::id());
    let mut args: Vec<OsString> = vec!["run".into(), spec("restore-vm.yaml").into(), "-q".into()];
    args.extend(var("repo", &repo));
    args.extend(var("to", &target));
    args.extend(var("name", &name));
    args.extend(var("format", "raw"));
    let (code, stderr) = run_bounded(args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("snapshot {id}: refusing to restore into")),
        "{stderr}"
    );
    assert_eq!(tree(&work), vec![target.clone()], "files written");
    assert!(!backflow_testkit::libvirt::domain_names().contains(&name));

    // The data is not lost: that disk alone restores to a file.
    let file = target.join("disk.raw");
    let (code, stderr) = run_bounded([
        "restore".as_ref(),
        "--quiet".as_ref(),
        "--repo".as_ref(),
        repo.as_os_str(),
        "--disk".as_ref(),
        "../x".as_ref(),
        "--to".as_ref(),
        file.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_same_file(&image, &file);
}

#[test]
fn specs_and_job_files_that_never_end_or_block_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("spec.fifo");
    mkfifo(&fifo);
    let too_large = dir.path().join("large.yaml");
    let shipped = std::fs::read_to_string(spec("backup-image.yaml")).unwrap();
    let padding = "# padding\n".repeat((1 << 20) / 10);
    std::fs::write(&too_large, format!("{shipped}{padding}")).unwrap();
    let cases = [
        (
            PathBuf::from("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (fifo.clone(), "is a FIFO (named pipe), not a regular file"),
        (too_large.clone(), "is larger than 1048576 bytes"),
    ];
    for (path, problem) in &cases {
        for command in [
            &["validate"][..],
            &["run"],
            &["job", "validate"],
            &["job", "run"],
        ] {
            let mut args: Vec<OsString> = command.iter().map(OsString::from).collect();
            args.push(path.into());
            let (code, stderr) = run_bounded(args);
            let what = if command[0] == "job" {
                "the job file"
            } else {
                "the spec"
            };
            assert_eq!(code, Some(2), "{command:?} {}: {stderr}", path.display());
            assert!(
                stderr.contains(&path.display().to_string())
                    && stderr.contains(&format!("{what} {problem}")),
                "{command:?} {}: {stderr}",
                path.display()
            );
        }
    }
}

#[test]
fn sources_that_are_not_files_or_block_devices_are_refused_before_opening() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let fifo = dir.path().join("source.fifo");
    mkfifo(&fifo);
    for (source, problem) in [
        (fifo.clone(), "is a FIFO (named pipe)"),
        (PathBuf::from("/dev/zero"), "is a character device"),
        (dir.path().to_owned(), "is a directory"),
    ] {
        for backup in ["backup-image.yaml", "backup-qcow2.yaml"] {
            let mut args: Vec<OsString> = vec!["run".into(), spec(backup).into(), "-q".into()];
            args.extend(var("source", &source));
            args.extend(var("repo", &repo));
            args.extend(var("disk", "d"));
            let (code, stderr) = run_bounded(args);
            assert_eq!(code, Some(1), "{backup} {}: {stderr}", source.display());
            assert!(
                stderr.contains(&source.display().to_string())
                    && stderr.contains(&format!("{problem}, not a regular file or a block device")),
                "{backup} {}: {stderr}",
                source.display()
            );
        }
    }
    assert!(snapshot_ids(&repo).is_empty());
    assert_eq!(std::fs::read_dir(repo.join("tmp")).unwrap().count(), 0);
}
