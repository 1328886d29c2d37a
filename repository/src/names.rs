//! Names of disks and VMs: what a manifest may call them.
//!
//! A disk's name becomes a file name when a snapshot is restored into a directory (`DIR/NAME.raw`) and a
//! `<target dev>` when it is defined again as a libvirt domain; a VM's name appears in listings, session
//! records and mail subjects. Neither may therefore ever be read as a path (`../x`, `/etc/x`) or break a
//! line (a newline, a NUL); a disk's name may not hide a file (`.x`) or look like a command-line option
//! (`-x`) either. The rules are checked where names enter (spec options, libvirt's domain XML,
//! [`crate::BackupSession`]) and again where a name read from a manifest becomes a file name, since a
//! manifest written by an older or hostile tool may hold anything:
//!
//! - a disk: 1 to [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 . _ -`, the first a letter, a digit or `_`
//!   (every target libvirt gives a disk: `vda`, `sdb`, `hdc`, `xvda`, `nvme0n1`);
//! - a VM: 1 to [`MAX_NAME_LEN`] characters, none of them `/` or a control character, not `.` or `..`, and
//!   no space at either end: every name libvirt accepts for a domain, spaces and non-ASCII letters
//!   included (`web01`, `db-2.prod`, `Mail Server`, `сервер`), never a path or a second line.
//!
//! # Identities
//! A snapshot's `vm` is the identity of what was backed up: retention, `latest` and the parent of the next
//! backup all go by it, so two sources must never share one by accident. A libvirt VM's identity is its
//! domain name; an image (file or block device) that no one named is identified by its canonical absolute
//! path (`/srv/images/web01.raw`), which is injective (one file, one canonical path), readable, and never
//! equal to a VM name (those have no `/`, paths begin with one). [`check_identity`] accepts both forms;
//! [`check_vm_name`] stays the rule for names people and libvirt give, which must not be paths. An identity
//! is never used as a file name.

use std::fmt;

/// Longest disk or VM name, in characters (all ASCII): with `.partial` and a format's extension appended it
/// stays far below the 255 bytes a file name may have.
pub const MAX_NAME_LEN: usize = 128;

/// The rule for disk names, in the words of error messages.
pub const NAME_RULE: &str = "a disk name has 1 to 128 characters from A-Z, a-z, 0-9, `.`, `_` and `-`, \
                             and starts with a letter, a digit or `_`";

/// The rule for VM names, in the words of error messages.
pub const VM_NAME_RULE: &str = "a VM name has 1 to 128 characters, none of them `/` or a control \
                                character, is not `.` or `..`, and has no space at either end";

/// Longest identity taken from a path, in bytes: Linux's `PATH_MAX`, so that every canonical path that can be
/// opened has one.
pub const MAX_PATH_IDENTITY_LEN: usize = 4096;

/// The rule for identities, in the words of error messages.
pub const IDENTITY_RULE: &str = "an identity is a VM name (1 to 128 characters, none of them `/` or a control \
                                 character) or a canonical absolute path (starts with `/`, at most 4096 \
                                 bytes, UTF-8, no control character, no empty, `.` or `..` component)";

/// What a name names, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    Disk,
    Vm,
    /// A snapshot's identity: a VM name or an image's canonical path.
    Identity,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Disk => "disk",
            NameKind::Vm => "VM",
            NameKind::Identity => "identity",
        })
    }
}

/// A name outside the alphabet: which name (quoted, escaped and shortened, so that a newline or a megabyte
/// of it does not garble the message), what is wrong with it, and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {shown} {problem}: {}", match kind { NameKind::Disk => NAME_RULE, NameKind::Vm => VM_NAME_RULE, NameKind::Identity => IDENTITY_RULE })]
pub struct BadName {
    pub kind: NameKind,
    /// The name as messages show it: quoted, with escapes, at most about 64 characters.
    pub shown: String,
    pub problem: String,
}

/// Checks a disk name against the alphabet above.
pub fn check_disk_name(name: &str) -> Result<(), BadName> {
    check(NameKind::Disk, name)
}

/// Checks a VM name against the rule above.
pub fn check_vm_name(name: &str) -> Result<(), BadName> {
    check(NameKind::Vm, name)
}

/// Checks a snapshot's identity: a VM name ([`check_vm_name`]) or a canonical absolute path (see "Identities"
/// above).
pub fn check_identity(identity: &str) -> Result<(), BadName> {
    if !identity.starts_with('/') {
        return check_vm_name(identity).map_err(|e| BadName {
            kind: NameKind::Identity,
            ..e
        });
    }
    match path_problem(identity) {
        None => Ok(()),
        Some(problem) => Err(BadName {
            kind: NameKind::Identity,
            shown: shown(identity),
            problem,
        }),
    }
}

/// The identity of an image at `canonical` (a path as [`std::fs::canonicalize`] returns it): the path itself,
/// checked with [`check_identity`]. A path that is not UTF-8 or holds a control character has none: the
/// caller asks for a name instead.
pub fn identity_for_path(canonical: &std::path::Path) -> Result<String, BadName> {
    let Some(text) = canonical.to_str() else {
        return Err(BadName {
            kind: NameKind::Identity,
            shown: shown(&canonical.to_string_lossy()),
            problem: "is not UTF-8".into(),
        });
    };
    check_identity(text)?;
    Ok(text.to_owned())
}

fn path_problem(path: &str) -> Option<String> {
    if path.len() > MAX_PATH_IDENTITY_LEN {
        return Some(format!("has {} bytes", path.len()));
    }
    if let Some(bad) = path.chars().find(|c| c.is_control()) {
        return Some(format!("contains {bad:?}"));
    }
    let rest = &path[1..];
    if rest.is_empty() {
        return Some("is the root directory".into());
    }
    if rest
        .split('/')
        .any(|component| matches!(component, "" | "." | ".."))
    {
        return Some("is not canonical (an empty, `.` or `..` component)".into());
    }
    None
}

/// Whether `name` is a valid disk name (and so a valid VM name too).
pub fn is_valid_name(name: &str) -> bool {
    problem(NameKind::Disk, name).is_none()
}

fn check(kind: NameKind, name: &str) -> Result<(), BadName> {
    match problem(kind, name) {
        None => Ok(()),
        Some(problem) => Err(BadName {
            kind,
            shown: shown(name),
            problem,
        }),
    }
}

fn problem(kind: NameKind, name: &str) -> Option<String> {
    let Some(first) = name.chars().next() else {
        return Some("is empty".into());
    };
    let length = name.chars().count();
    if length > MAX_NAME_LEN {
        return Some(format!("has {length} characters"));
    }
    if name == "." || name == ".." {
        return Some("names a directory".into());
    }
    if kind == NameKind::Vm {
        if let Some(bad) = name.chars().find(|&c| c == '/' || c.is_control()) {
            return Some(match bad {
                '/' => "contains `/`".to_owned(),
                _ => format!("contains {:?}", bad),
            });
        }
        if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
            return Some("has a space at one end".to_owned());
        }
        return None;
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(match bad {
            '/' => "contains `/`".to_owned(),
            _ => format!("contains {:?}", bad),
        });
    }
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Some(format!("starts with `{first}`"));
    }
    None
}

/// Most characters of a name a message shows.
const SHOWN_CHARS: usize = 64;

fn shown(name: &str) -> String {
    if name.chars().count() <= SHOWN_CHARS {
        return format!("{name:?}");
    }
    let head: String = name.chars().take(SHOWN_CHARS).collect();
    format!("{:?}...", head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_libvirt_and_people_use_are_valid() {
        for name in [
            "vda",
            "vdb",
            "sda",
            "sdb",
            "hdc",
            "xvda",
            "ubda",
            "nvme0n1",
            "fda",
            "web01",
            "db-2.prod",
            "my_vm",
            "_private",
            "01-web",
            "a",
            "disk.v2",
        ] {
            assert!(check_disk_name(name).is_ok(), "{name}");
            assert!(check_vm_name(name).is_ok(), "{name}");
        }
        assert!(check_vm_name(&"x".repeat(MAX_NAME_LEN)).is_ok());
        // Any name libvirt takes for a domain, as long as it is no path and one line.
        for name in [
            "Mail Server",
            "сервер",
            "web 01 (old)",
            ".hidden-vm",
            "-odd",
        ] {
            assert!(check_vm_name(name).is_ok(), "{name}");
            assert!(check_disk_name(name).is_err(), "{name}");
        }
        for (name, says) in [
            ("a/b", "contains `/`"),
            ("a\nb", "contains '\\n'"),
            ("a\u{1b}[2J", "contains '\\u{1b}'"),
            (" web", "a space at one end"),
            ("..", "names a directory"),
            ("", "is empty"),
        ] {
            let error = check_vm_name(name).unwrap_err();
            assert!(error.problem.contains(says), "{name:?}: {error}");
            assert!(error.to_string().contains(VM_NAME_RULE), "{error}");
        }
    }

    #[test]
    fn identities_are_vm_names_or_canonical_paths() {
        for ok in [
            "web01",
            "Mail Server",
            "/srv/images/disk.raw",
            "/a/disk.raw",
            "/dev/vg0/web01",
            "/srv/with space/d.img",
        ] {
            assert!(check_identity(ok).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("/", "root directory"),
            ("/a//b", "not canonical"),
            ("/a/./b", "not canonical"),
            ("/a/../b", "not canonical"),
            ("/a/b/", "not canonical"),
            ("/a\nb", "contains '\\n'"),
            ("a/b", "contains `/`"),
            ("", "is empty"),
        ] {
            let error = check_identity(bad).unwrap_err();
            assert_eq!(error.kind, NameKind::Identity, "{bad:?}");
            assert!(error.problem.contains(says), "{bad:?}: {error}");
            assert!(error.to_string().contains(IDENTITY_RULE), "{error}");
        }
        let long = format!("/{}", "x".repeat(MAX_PATH_IDENTITY_LEN));
        assert!(check_identity(&long).is_err());
        assert_eq!(
            identity_for_path(std::path::Path::new("/a/disk.raw")).unwrap(),
            "/a/disk.raw"
        );
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = std::ffi::OsStr::from_bytes(b"/a/\xff.raw");
        let error = identity_for_path(std::path::Path::new(not_utf8)).unwrap_err();
        assert_eq!(error.problem, "is not UTF-8");
    }

    #[test]
    fn names_that_could_be_paths_or_break_lines_are_not() {
        for (name, says) in [
            ("../x", "contains `/`"),
            ("../../escape", "contains `/`"),
            ("/etc/passwd", "contains `/`"),
            ("a/b", "contains `/`"),
            (".", "names a directory"),
            ("..", "names a directory"),
            ("", "is empty"),
            ("a\nb", "contains '\\n'"),
            ("a\0b", "contains '\\0'"),
            ("web 01", "contains ' '"),
            ("wëb", "contains 'ë'"),
            (".hidden", "starts with `.`"),
            ("-rf", "starts with `-`"),
            ("nbd:x", "contains ':'"),
        ] {
            let error = check_disk_name(name).unwrap_err();
            assert!(error.problem.contains(says), "{name:?}: {error}");
            let message = error.to_string();
            assert!(message.starts_with("disk name "), "{message}");
            assert!(
                !message.contains('\n') && !message.contains('\0'),
                "{message}"
            );
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let error = check_vm_name(&long).unwrap_err();
        assert_eq!(
            error.problem,
            format!("has {} characters", MAX_NAME_LEN + 1)
        );
        assert!(error.to_string().starts_with("VM name \"xxx"), "{error}");
        assert!(error.shown.len() < 80, "{}", error.shown);
        assert!(!is_valid_name(&long));
        assert!(is_valid_name("vda"));
    }
}
