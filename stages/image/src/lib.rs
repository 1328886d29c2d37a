//! Source stage `image`: a raw disk image file or a block device, read directly with `pread`.
//!
//! It emits one [`Message::Disk`]; the changed-block map downstream asks it for the allocated
//! ranges, which it finds with `SEEK_DATA`/`SEEK_HOLE`, so the holes of a sparse image are never
//! read.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    BlockSource, DiskSource, InvalidOption, Message, MessageType, Stage, StageError, StageIo, Work,
    Worker,
};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "image";

/// Options of the `image` source.
#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct ImageOptions {
    /// Raw image file or block device to back up (required).
    pub path: Option<PathBuf>,
    /// The disk's name in the manifest; empty: the file name without its extension.
    #[serde(default)]
    pub disk: String,
    /// The identity of the snapshots (retention, `latest` and parents go by it); empty: the image's
    /// canonical absolute path, so that `/a/disk.raw` and `/b/disk.raw` are never confused.
    #[serde(default)]
    pub vm: String,
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "source: a raw image file or block device, read with pread",
    input: None,
    output: Some(MessageType::Disk),
    repository: RepositoryUse::No,
    options: option_docs::<ImageOptions>,
    build: Build::Stage(|options| build_stage(options, ImageSource::new)),
};

/// The runtime value: the file is opened when the run starts.
#[derive(Debug)]
pub struct ImageSource {
    path: PathBuf,
    disk: String,
    vm: String,
}

impl ImageSource {
    pub fn new(options: ImageOptions) -> Result<Self, InvalidOption> {
        let path = options
            .path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                InvalidOption::new(
                    "path",
                    "is required: the image file or block device to read",
                )
            })?;
        let (disk, vm) = DiskSource::checked_names_for(&path, options.disk, options.vm)?;
        Ok(ImageSource { path, disk, vm })
    }
}

impl Stage for ImageSource {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::Disk),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        if worker.index() != 0 {
            return Ok(());
        }
        let file = ImageFile::open(&self.path).map_err(|e| {
            let context = format!("opening {}", self.path.display());
            // Not a file or device: running again does not help.
            if e.kind() == io::ErrorKind::InvalidInput {
                StageError::Config(format!("{context}: {e}"))
            } else {
                StageError::io(context, e)
            }
        })?;
        let (vm, location) = DiskSource::identity_for(&self.path, &self.vm)?;
        let disk = DiskSource {
            vm,
            name: self.disk.clone(),
            location,
            reader: Arc::new(file),
            tracking: None,
            definition: None,
        };
        let _ = worker.send(Message::Disk(Arc::new(disk)));
        Ok(())
    }
}

/// An open image file or block device.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    size: u64,
    /// Regular files can answer SEEK_DATA/SEEK_HOLE; block devices are read whole.
    sparse_aware: bool,
}

impl ImageFile {
    /// Opens a regular file or a block device; anything else (a FIFO, `/dev/zero`, a directory) is
    /// refused before it is opened, so that it can neither block nor read without end.
    pub fn open(path: &Path) -> io::Result<ImageFile> {
        let file = backflow_pipeline::input::open_source(path)?;
        let meta = file.metadata()?;
        let (size, sparse_aware) = if meta.file_type().is_block_device() {
            let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))?;
            (size, false)
        } else {
            (meta.len(), true)
        };
        Ok(ImageFile {
            file,
            size,
            sparse_aware,
        })
    }
}

impl BlockSource for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn allocated(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        if !self.sparse_aware {
            return Ok(None);
        }
        allocated_ranges(&self.file, self.size).map(Some)
    }
}

/// Data ranges of a file by SEEK_DATA/SEEK_HOLE. On a filesystem without hole support the kernel
/// reports one data range covering the file, which is still correct.
pub fn allocated_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            // A file changing under us; fall back to "all data" from here.
            ranges.push((data, size - data));
            break;
        }
        ranges.push((data, hole - data));
        pos = hole;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_holes_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        file.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
        drop(file);
        let image = ImageFile::open(&path).unwrap();
        let ranges = image.allocated().unwrap().unwrap();
        // Filesystems round to their block size; both written blocks are covered, the rest not.
        assert!(
            ranges
                .iter()
                .any(|&(o, l)| o <= 1 << 20 && o + l >= (1 << 20) + 4096)
        );
        assert!(
            ranges
                .iter()
                .any(|&(o, l)| o <= 5 << 20 && o + l >= (5 << 20) + 4096)
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < 4 << 20, "holes were reported as data: {ranges:?}");
    }

    #[test]
    fn reads_bytes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"hello world").unwrap();
        let image = ImageFile::open(&path).unwrap();
        let mut buf = [0u8; 5];
        image.read_exact_at(&mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        assert!(image.read_exact_at(&mut buf, 8).is_err());
        assert_eq!(
            DiskSource::names_for(&path, String::new(), String::new()),
            ("a".to_owned(), String::new())
        );
        assert_eq!(
            DiskSource::identity_for(&dir.path().join(".").join("a.img"), "").unwrap(),
            (
                dir.path()
                    .canonicalize()
                    .unwrap()
                    .join("a.img")
                    .display()
                    .to_string(),
                dir.path().canonicalize().unwrap().join("a.img")
            )
        );
        assert_eq!(DiskSource::identity_for(&path, "web01").unwrap().0, "web01");
    }
}
