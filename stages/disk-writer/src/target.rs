//! Whether a restore may write a target, checked before any data is read (the stage's preflight)
//! and again just before each image is made.
//!
//! A restore never writes an image that something uses, `force` or not: not one a running (or
//! paused) libvirt domain of the connection names as a disk or in its backing chain (compared by
//! file identity, so symlinks, `..` and other device nodes of one block device match), and not one
//! a process holds open with QEMU's image locking. QEMU and `qemu-nbd` take open-file-description
//! (OFD) locks on bytes of every image they open ("image locking"); `fcntl(F_OFD_GETLK)` asking
//! for a write lock over the whole file finds any of them, without libvirt and whoever started
//! the process. An existing target (a file, a block device, a shut-off domain's image) is
//! replaced only with `force`.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use backflow_libvirt::{Connection, VmState};
use backflow_pipeline::StageError;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

/// How the user forces a restore over an existing target, for messages: the command's flag and
/// the specs' variable.
const FORCE_HINT: &str = "--force (spec variable force=true)";

/// One file: a block device by its device number (any node of it matches), anything else by
/// its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileId {
    Device(u64),
    Inode { dev: u64, ino: u64 },
}

impl FileId {
    fn of(meta: &Metadata) -> FileId {
        if meta.file_type().is_block_device() {
            FileId::Device(meta.rdev())
        } else {
            FileId::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }
}

/// An image a libvirt domain uses.
#[derive(Debug)]
pub(crate) struct UsedImage {
    vm: String,
    state: VmState,
    /// As the domain XML names it.
    path: String,
    id: FileId,
}

/// The images the domains of one libvirt connection use, listed once per run.
#[derive(Debug)]
pub(crate) enum Domains {
    Listed {
        uri: String,
        images: Vec<UsedImage>,
    },
    /// The connection could not be opened or listed (why): the domain check is skipped, the
    /// lock probe still runs.
    Unavailable(String),
}

impl Domains {
    /// The domains of `uri` (libvirt's default when `None`) and their local images. An image
    /// that does not exist here (another host's path, a deleted file) cannot be a target.
    pub(crate) fn list(uri: Option<&str>) -> Domains {
        let listed = Connection::open_read_only(uri).and_then(|conn| {
            let domains = conn.domain_images()?;
            Ok((conn.uri().to_owned(), domains))
        });
        let (uri, domains) = match listed {
            Ok(listed) => listed,
            Err(e) => return Domains::Unavailable(e.to_string()),
        };
        let mut images = Vec::new();
        for domain in domains {
            for path in domain.images {
                if let Ok(meta) = std::fs::metadata(&path) {
                    images.push(UsedImage {
                        vm: domain.name.clone(),
                        state: domain.state,
                        path,
                        id: FileId::of(&meta),
                    });
                }
            }
        }
        Domains::Listed { uri, images }
    }

    /// The note for the run's warnings when the domain check could not run.
    pub(crate) fn skipped_note(&self) -> Option<String> {
        match self {
            Domains::Listed { .. } => None,
            Domains::Unavailable(why) => Some(format!(
                "the restore targets were not checked against libvirt domains ({why}); only \
                 images locked by a running QEMU or qemu-nbd are detected"
            )),
        }
    }

    fn user_of(&self, id: FileId) -> Option<(&str, &UsedImage)> {
        match self {
            Domains::Listed { uri, images } => images
                .iter()
                .find(|i| i.id == id)
                .map(|i| (uri.as_str(), i)),
            Domains::Unavailable(_) => None,
        }
    }
}

/// Whether a domain in `state` has its images open (anything but shut off: running, paused,
/// crashed, being shut down or suspended all keep QEMU alive).
fn holds_images(state: VmState) -> bool {
    !matches!(state, VmState::ShutOff)
}

/// Refuses `target` unless it may be written: its directory exists and is writable; it is not
/// used by a domain or locked by a QEMU process; it does not exist, or `force` says to replace
/// it. Every message names `target` as the user gave it.
pub(crate) fn check(target: &Path, force: bool, domains: &Domains) -> Result<(), StageError> {
    let refuse = |why: String| {
        StageError::Config(format!(
            "refusing to restore to {}: {why}",
            target.display()
        ))
    };
    let meta = match std::fs::metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return check_directory(target),
        Err(e) => {
            return Err(StageError::io(
                format!("refusing to restore to {}", target.display()),
                e,
            ));
        }
        Ok(meta) => meta,
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(refuse("it is a directory".into()));
    }
    if !kind.is_file() && !kind.is_block_device() {
        return Err(refuse(
            "it exists and is neither a regular file nor a block device".into(),
        ));
    }
    let id = FileId::of(&meta);
    if let Some((uri, used)) = domains.user_of(id) {
        if holds_images(used.state) {
            return Err(refuse(format!(
                "it is {} of VM `{}` ({}) on {uri}; a restore never writes an image in use, \
                 --force or not: restore next to it, or stop the VM first",
                describe_use(target, &used.path),
                used.vm,
                used.state,
            )));
        }
        if !force {
            return Err(refuse(format!(
                "it exists: it is {} of the shut-off VM `{}` on {uri}; {FORCE_HINT} replaces it",
                describe_use(target, &used.path),
                used.vm
            )));
        }
    }
    match locked(target) {
        Ok(false) => {}
        Ok(true) => {
            return Err(refuse(
                "a process holds it open with a lock (QEMU or qemu-nbd image locking: a VM or \
                 an NBD export uses it); a restore never writes an image in use, --force or not"
                    .into(),
            ));
        }
        Err(e) => {
            return Err(StageError::io(
                format!(
                    "refusing to restore to {}: cannot check whether it is in use",
                    target.display()
                ),
                e,
            ));
        }
    }
    if !force {
        let what = if kind.is_block_device() {
            "it is a block device"
        } else {
            "it exists"
        };
        return Err(refuse(format!(
            "{what}; restore to a new path, or {FORCE_HINT} replaces it"
        )));
    }
    if kind.is_file() {
        // Replaced by a rename in its directory.
        check_directory(target)?;
    }
    Ok(())
}

/// "the image" or, when the domain names it by another path, "the image PATH".
fn describe_use(target: &Path, path: &str) -> String {
    if Path::new(path) == target {
        "the image".to_owned()
    } else {
        format!("the image {path}")
    }
}

/// The directory a new file `target` is made in (and renamed in) exists and is writable.
fn check_directory(target: &Path) -> Result<(), StageError> {
    let dir = parent_dir(target);
    let refuse = |why: String| {
        StageError::Config(format!(
            "refusing to restore to {}: {why}",
            target.display()
        ))
    };
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(refuse(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refuse(format!(
                "the directory {} does not exist",
                dir.display()
            )));
        }
        Err(e) => return Err(refuse(format!("{}: {e}", dir.display()))),
    }
    rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK).map_err(|e| {
        refuse(format!(
            "the directory {} is not writable ({})",
            dir.display(),
            io::Error::from(e)
        ))
    })
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Whether another open file description holds a lock on any byte of `path`: QEMU's image
/// locking (QEMU takes OFD read locks on a few bytes near the start of every image it opens, and
/// write locks for what it forbids others) conflicts with a write lock over the whole file.
fn locked(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // To the end of the file, however it grows.
        l_len: 0,
        // F_OFD_GETLK requires 0.
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(io::Error::from)?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Domains {
        Domains::Listed {
            uri: "test:///none".into(),
            images: Vec::new(),
        }
    }

    #[test]
    fn an_existing_file_needs_force_and_a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        check(&file, false, &none()).unwrap();
        std::fs::write(&file, b"data").unwrap();
        let err = check(&file, false, &none()).unwrap_err().to_string();
        assert!(
            err.contains(&file.display().to_string()) && err.contains("--force"),
            "{err}"
        );
        check(&file, true, &none()).unwrap();
        let missing = dir.path().join("nowhere").join("disk.raw");
        let err = check(&missing, true, &none()).unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().join("nowhere").display().to_string())
                && err.contains("does not exist"),
            "{err}"
        );
        let err = check(dir.path(), true, &none()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }

    #[test]
    fn an_image_of_a_running_domain_is_refused_even_with_force_by_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vda.qcow2");
        std::fs::write(&file, b"data").unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let id = FileId::of(&std::fs::metadata(&file).unwrap());
        let domains = |state| Domains::Listed {
            uri: "test:///x".into(),
            images: vec![UsedImage {
                vm: "web01".into(),
                state,
                path: file.display().to_string(),
                id,
            }],
        };
        for state in [VmState::Running, VmState::Paused] {
            let err = check(&link, true, &domains(state)).unwrap_err().to_string();
            assert!(
                err.contains("web01") && err.contains("never writes"),
                "{err}"
            );
        }
        let err = check(&link, false, &domains(VmState::ShutOff))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shut-off VM `web01`"), "{err}");
        check(&link, true, &domains(VmState::ShutOff)).unwrap();
    }

    #[test]
    fn the_lock_probe_sees_an_ofd_lock_of_another_description() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        assert!(!locked(&file).unwrap());
        // What QEMU does: an OFD read lock on one byte, through its own open file description.
        let holder = File::open(&file).unwrap();
        let lock = libc::flock {
            l_type: libc::F_RDLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 100,
            l_len: 1,
            l_pid: 0,
        };
        fcntl(&holder, FcntlArg::F_OFD_SETLK(&lock)).unwrap();
        assert!(locked(&file).unwrap());
        let err = check(&file, true, &none()).unwrap_err().to_string();
        assert!(err.contains("holds it open with a lock"), "{err}");
        drop(holder);
        assert!(!locked(&file).unwrap());
    }
}
