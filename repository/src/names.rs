//! Names of disks and VMs: what a manifest may call them.
//!
//! A disk's name becomes a file name when a snapshot is restored into a directory (`DIR/NAME.raw`) and a
//! `<target dev>` when it is defined again as a libvirt domain; a VM's name appears in listings, session
//! records and mail subjects. Neither may therefore ever be read as a path (`../x`, `/etc/x`), hide a file
//! (`.x`), look like a command-line option (`-x`) or break a line (a newline, a NUL). One alphabet serves
//! both, checked where names enter (spec options, libvirt's domain XML, [`crate::BackupSession`]) and again
//! where a name read from a manifest becomes a file name, since a manifest written by an older or hostile
//! tool may hold anything:
//!
//! 1 to [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 . _ -`, the first a letter, a digit or `_`.
//!
//! Every target libvirt gives a disk (`vda`, `sdb`, `hdc`, `xvda`, `nvme0n1`) and the usual VM names
//! (`web01`, `db-2.prod`, `my_vm`) are valid; a VM whose libvirt name uses other characters (a space, a
//! non-ASCII letter) cannot be backed up under that name.

use std::fmt;

/// Longest disk or VM name, in characters (all ASCII): with `.partial` and a format's extension appended it
/// stays far below the 255 bytes a file name may have.
pub const MAX_NAME_LEN: usize = 128;

/// The rule, in the words of error messages.
pub const NAME_RULE: &str = "a name has 1 to 128 characters from A-Z, a-z, 0-9, `.`, `_` and `-`, \
                             and starts with a letter, a digit or `_`";

/// What a name names, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    Disk,
    Vm,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Disk => "disk",
            NameKind::Vm => "VM",
        })
    }
}

/// A name outside the alphabet: which name (quoted, escaped and shortened, so that a newline or a megabyte
/// of it does not garble the message), what is wrong with it, and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {shown} {problem}: {NAME_RULE}")]
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

/// Checks a VM name against the alphabet above.
pub fn check_vm_name(name: &str) -> Result<(), BadName> {
    check(NameKind::Vm, name)
}

/// Whether `name` is a valid disk or VM name (the same alphabet).
pub fn is_valid_name(name: &str) -> bool {
    problem(name).is_none()
}

fn check(kind: NameKind, name: &str) -> Result<(), BadName> {
    match problem(name) {
        None => Ok(()),
        Some(problem) => Err(BadName {
            kind,
            shown: shown(name),
            problem,
        }),
    }
}

fn problem(name: &str) -> Option<String> {
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
