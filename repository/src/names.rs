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
#[error("{kind} name {shown} {problem}: {}", match kind { NameKind::Disk => NAME_RULE, NameKind::Vm => VM_NAME_RULE })]
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
