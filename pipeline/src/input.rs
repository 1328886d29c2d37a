//! Files that people hand to a run: specs, job files, and the images a source reads.
//!
//! Each is checked for what it is before it is opened for reading, so that no input can make a run
//! wait forever or read without end: opening a FIFO for reading blocks until a writer comes (and
//! ignores a SIGTERM meanwhile, since the process is stuck in the kernel), and a character device such
//! as `/dev/zero` never ends. The check is made on the path (`stat`, following symbolic links), then
//! again on the opened file, which is opened with `O_NONBLOCK` so that a path swapped for a FIFO in
//! between still cannot block.
//!
//! - Specs and job files must be regular files of at most [`MAX_SPEC_SIZE`] bytes; the limit is checked
//!   on the metadata and enforced while reading (never more than the limit plus one byte is read).
//! - Sources (`image`, `qemu-nbd` and `libvirt`'s offline images) must be regular files or block devices.

use std::fs::{File, FileType, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest spec or job file, in bytes. Specs are a few KiB (the shipped ones are under 3 KiB); a file of
/// a mebibyte is a mistake (a wrong path, an image given as the spec), and parsing one costs a few times
/// its size in memory.
pub const MAX_SPEC_SIZE: u64 = 1 << 20;

/// Why a spec, job file or source cannot be used. The messages leave the path to the caller, which names
/// it with what the file is for.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a regular file (nor, for a source, a block device): `what` says what it is.
    #[error("is {what}, not {expected}")]
    WrongKind {
        what: &'static str,
        expected: &'static str,
    },
    #[error("is larger than {limit} bytes, the most a spec or job file may have")]
    TooLarge { limit: u64 },
    #[error("is not valid UTF-8 (invalid byte at offset {0})")]
    NotUtf8(usize),
}

impl From<InputError> for io::Error {
    /// An I/O error as it was; the others as `InvalidInput` with their message.
    fn from(e: InputError) -> io::Error {
        match e {
            InputError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// What a file type is, in the words of a message: "a FIFO", "a character device".
pub fn describe(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// A serde-saphyr error message about the text of `file`: its position (line, column) when the
/// message starts with one, and the rest of the message, with the file named where saphyr says
/// `<input>`. Job and cluster files report their mistakes as `FILE:LINE:COLUMN: message` with this.
pub fn saphyr_position(message: &str, file: &str) -> (Option<(u64, u64)>, String) {
    let message = message.replace("<input>", file);
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    match message.strip_prefix("line ").and_then(|rest| {
        let (line, rest) = rest.split_once(" column ")?;
        let (column, rest) = rest.split_once(": ")?;
        Some((line.parse().ok()?, column.parse().ok()?, rest.to_owned()))
    }) {
        Some((line, column, rest)) => (Some((line, column)), rest),
        None => (None, message.to_owned()),
    }
}

/// Reads a spec or job file as text: a regular file of at most `limit` bytes, checked before it is
/// opened and enforced while it is read.
pub fn read_text_file(path: &Path, limit: u64) -> Result<String, InputError> {
    const EXPECTED: &str = "a regular file";
    let meta = std::fs::metadata(path)?;
    check_kind(&meta, false, EXPECTED)?;
    if meta.len() > limit {
        return Err(InputError::TooLarge { limit });
    }
    let file = open_nonblocking(path)?;
    check_kind(&file.metadata()?, false, EXPECTED)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // A file that grew since the check is cut at limit + 1 bytes: too large, whatever it grew to.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(InputError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|e| InputError::NotUtf8(e.utf8_error().valid_up_to()))
}

/// Checks that a source path is a regular file or a block device without opening it, so that a FIFO
/// or a character device is refused before anything (this process, `qemu-img`, `qemu-nbd`) opens it
/// and waits. Returns its metadata.
pub fn check_source(path: &Path) -> Result<Metadata, InputError> {
    let meta = std::fs::metadata(path)?;
    check_kind(&meta, true, SOURCE_KINDS)?;
    Ok(meta)
}

/// Opens a source for reading: [`check_source`], then an open that cannot block, then the same check on
/// what was opened.
pub fn open_source(path: &Path) -> Result<File, InputError> {
    check_source(path)?;
    let file = open_nonblocking(path)?;
    check_kind(&file.metadata()?, true, SOURCE_KINDS)?;
    Ok(file)
}

const SOURCE_KINDS: &str = "a regular file or a block device";

fn check_kind(
    meta: &Metadata,
    block_device_ok: bool,
    expected: &'static str,
) -> Result<(), InputError> {
    let file_type = meta.file_type();
    if file_type.is_file() || (block_device_ok && file_type.is_block_device()) {
        return Ok(());
    }
    Err(InputError::WrongKind {
        what: describe(file_type),
        expected,
    })
}

/// Opens for reading with `O_NONBLOCK` (an open of a FIFO returns at once), then clears the flag: on
/// regular files and block devices it changes nothing, but reads elsewhere must not see `EAGAIN`.
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let file = File::options()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let flags = fcntl_getfl(&file)?;
    fcntl_setfl(&file, flags.difference(OFlags::NONBLOCK))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn text_files_are_bounded_and_regular() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.yaml");
        std::fs::write(&small, "name: x\n").unwrap();
        assert_eq!(read_text_file(&small, 8).unwrap(), "name: x\n");
        let error = read_text_file(&small, 7).unwrap_err().to_string();
        assert!(error.contains("larger than 7 bytes"), "{error}");
        let error = read_text_file(Path::new("/dev/zero"), MAX_SPEC_SIZE)
            .unwrap_err()
            .to_string();
        assert_eq!(error, "is a character device, not a regular file");
        let error = read_text_file(dir.path(), MAX_SPEC_SIZE)
            .unwrap_err()
            .to_string();
        assert_eq!(error, "is a directory, not a regular file");
        std::fs::write(dir.path().join("bad"), [b'a', 0xff]).unwrap();
        let error = read_text_file(&dir.path().join("bad"), 8)
            .unwrap_err()
            .to_string();
        assert!(error.contains("offset 1"), "{error}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        // With no writer, an open for reading would block this test forever.
        let error = read_text_file(&fifo, MAX_SPEC_SIZE)
            .unwrap_err()
            .to_string();
        assert_eq!(error, "is a FIFO (named pipe), not a regular file");
        let error = open_source(&fifo).unwrap_err().to_string();
        assert_eq!(
            error,
            "is a FIFO (named pipe), not a regular file or a block device"
        );
        assert!(check_source(&fifo).is_err());
        assert!(open_source(Path::new("/dev/zero")).is_err());
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, [1u8; 512]).unwrap();
        let mut file = open_source(&image).unwrap();
        let mut read = Vec::new();
        file.read_to_end(&mut read).unwrap();
        assert_eq!(read, [1u8; 512]);
    }
}
