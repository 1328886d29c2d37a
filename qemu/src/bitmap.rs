//! Changed block tracking with qcow2 persistent dirty bitmaps, rotated by generation.
//!
//! # The chain
//! Each run that tracks changes adds a fresh bitmap `PREFIX.TOKEN` (a random token) *before* the
//! image is read, and records its name in the snapshot's manifest ([`ChangeTracking::next_state`]).
//! The next run exports the bitmap its parent snapshot recorded and reads what it marks dirty.
//! Bitmaps are never cleared, only rotated:
//! - the run succeeded and its snapshot is committed: every older `PREFIX.*` bitmap is removed and
//!   the new one is the base from now on;
//! - anything else (failure, cancel, no commit): the new bitmap is removed and the old base stays.
//!
//! Because the new bitmap starts recording before the read, no write is ever missed, and a run
//! killed at any moment leaves a state that is safe: the old base still covers every write since
//! the parent; a committed snapshot whose old bitmaps were not yet removed only leaves extra
//! bitmaps, which the next successful run removes.
//!
//! Bitmaps are added and removed with `qemu-img bitmap` while no server has the image open: the
//! stage runs it before starting its read-only `qemu-nbd` and after stopping it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backflow_pipeline::{ChangeTracking, Changes};
use serde::Deserialize;
use serde_json::json;

use crate::export::NbdExport;

/// The `method` recorded in the manifest's `cbt` for this kind of tracking.
pub const METHOD: &str = "qcow2-bitmap";

/// Granularity of the bitmaps we add: the smallest chunk size, so a dirty granule never spans
/// two chunks' worth of unrelated data.
pub const GRANULARITY: u64 = 64 * 1024;

/// One persistent bitmap of a qcow2 image, as `qemu-img info` describes it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// `auto`: enabled, recording writes; `in-use`: the image was not closed cleanly since it was
    /// written, so its content cannot be trusted.
    #[serde(default)]
    pub flags: Vec<String>,
}

impl BitmapInfo {
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }

    pub fn consistent(&self) -> bool {
        !self.flags.iter().any(|f| f == "in-use")
    }
}

/// What `qemu-img info` says of an image, as far as tracking needs.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub virtual_size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

/// Reads the virtual size and bitmaps of a qcow2 image.
pub fn image_info(image: &Path) -> io::Result<ImageInfo> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        #[serde(rename = "format-specific")]
        format_specific: Option<FormatSpecific>,
    }
    #[derive(Deserialize)]
    struct FormatSpecific {
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        bitmaps: Vec<BitmapInfo>,
    }
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2"], image, &[])?;
    let info: Info = serde_json::from_slice(&out).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("qemu-img info {}: unexpected output: {e}", image.display()),
        )
    })?;
    Ok(ImageInfo {
        virtual_size: info.virtual_size,
        bitmaps: info
            .format_specific
            .and_then(|f| f.data)
            .map(|d| d.bitmaps)
            .unwrap_or_default(),
    })
}

/// Adds an enabled persistent bitmap.
pub fn add_bitmap(image: &Path, name: &str) -> io::Result<()> {
    let granularity = GRANULARITY.to_string();
    qemu_img(
        &["bitmap", "--add", "-g", &granularity, "-f", "qcow2"],
        image,
        &[name],
    )
    .map(drop)
}

/// Removes a persistent bitmap.
pub fn remove_bitmap(image: &Path, name: &str) -> io::Result<()> {
    qemu_img(&["bitmap", "--remove", "-f", "qcow2"], image, &[name]).map(drop)
}

fn qemu_img(args: &[&str], image: &Path, after: &[&str]) -> io::Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(image)
        .args(after)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "qemu-img {} {}: {}",
            args.join(" "),
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// The chain state stored in the manifest.
#[derive(Debug, Deserialize)]
struct State {
    method: String,
    bitmap: String,
    size: u64,
}

/// The bitmaps of one image before a run, and the one this run adds.
#[derive(Debug)]
pub struct BitmapChain {
    image: PathBuf,
    prefix: String,
    /// Every `PREFIX.*` bitmap the image had before this run.
    existing: Vec<BitmapInfo>,
    /// The bitmap this run adds.
    next: String,
    size: u64,
}

impl BitmapChain {
    /// Inspects `image` and chooses the name of this run's bitmap (not added yet).
    pub fn inspect(image: &Path, prefix: &str) -> io::Result<BitmapChain> {
        let info = image_info(image)?;
        let ours = format!("{prefix}.");
        Ok(BitmapChain {
            image: image.to_owned(),
            prefix: prefix.to_owned(),
            existing: info
                .bitmaps
                .into_iter()
                .filter(|b| b.name.starts_with(&ours))
                .collect(),
            next: format!("{prefix}.{:016x}", rand::random::<u64>()),
            size: info.virtual_size,
        })
    }

    /// The bitmaps the server should export: ours that can be read (an inconsistent bitmap cannot
    /// be exported at all).
    pub fn exportable(&self) -> Vec<String> {
        self.existing
            .iter()
            .filter(|b| b.consistent())
            .map(|b| b.name.clone())
            .collect()
    }

    pub fn next(&self) -> &str {
        &self.next
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Adds this run's bitmap.
    pub fn add_next(&self) -> io::Result<()> {
        add_bitmap(&self.image, &self.next)
    }

    /// After the server stopped: rotates on a commit, else removes this run's bitmap. Returns what
    /// could not be removed (harmless leftovers, removed by the next successful run).
    pub fn settle(&self, committed: bool) -> Vec<String> {
        let retired: Vec<&str> = if committed {
            self.existing.iter().map(|b| b.name.as_str()).collect()
        } else {
            vec![self.next.as_str()]
        };
        let mut left = Vec::new();
        for name in retired {
            if let Err(e) = remove_bitmap(&self.image, name) {
                left.push(format!("bitmap {name} of {}: {e}", self.image.display()));
            }
        }
        left
    }
}

/// [`ChangeTracking`] over a running export of the image.
#[derive(Debug)]
pub struct BitmapTracking {
    chain: Arc<BitmapChain>,
    export: Arc<NbdExport>,
    committed: Arc<AtomicBool>,
}

impl BitmapTracking {
    pub fn new(
        chain: Arc<BitmapChain>,
        export: Arc<NbdExport>,
        committed: Arc<AtomicBool>,
    ) -> Self {
        BitmapTracking {
            chain,
            export,
            committed,
        }
    }

    /// Why `state` cannot be used as the base, or the bitmap to read.
    fn base<'s>(&self, state: &'s State) -> Result<&'s str, String> {
        let image = self.chain.image.display();
        let name = state.bitmap.as_str();
        if state.method != METHOD {
            return Err(format!(
                "the parent snapshot was tracked by {}, not by a qcow2 bitmap",
                state.method
            ));
        }
        if !name.starts_with(&format!("{}.", self.chain.prefix)) {
            return Err(format!(
                "the parent snapshot's bitmap {name} is not one of this spec's ({}.*)",
                self.chain.prefix
            ));
        }
        let Some(bitmap) = self.chain.existing.iter().find(|b| b.name == name) else {
            return Err(format!("bitmap {name} is no longer in {image}"));
        };
        if !bitmap.consistent() {
            return Err(format!(
                "bitmap {name} of {image} is inconsistent (in-use: the image was not closed cleanly)"
            ));
        }
        if !bitmap.enabled() {
            return Err(format!(
                "bitmap {name} of {image} is disabled: writes since the parent were not recorded"
            ));
        }
        if state.size != self.chain.size {
            return Err(format!(
                "{image} was resized from {} to {} bytes",
                state.size, self.chain.size
            ));
        }
        Ok(name)
    }
}

impl ChangeTracking for BitmapTracking {
    fn next_state(&self) -> serde_json::Value {
        // The bitmap's random token is the disk's identity in the chain: only an image that
        // carries this exact bitmap (this one, or a copy of it taken with its bitmaps) can answer
        // for the changes since this snapshot. The path is for people reading the manifest.
        json!({
            "method": METHOD,
            "bitmap": self.chain.next,
            "granularity": GRANULARITY,
            "size": self.chain.size,
            "image": self.chain.image.display().to_string(),
        })
    }

    fn changed_since(&self, state: &serde_json::Value) -> io::Result<Changes> {
        let state = match State::deserialize(state) {
            Ok(state) => state,
            Err(e) => {
                return Ok(Changes::Unknown(format!(
                    "the parent snapshot's tracking state is not understood ({e})"
                )));
            }
        };
        match self.base(&state) {
            Ok(name) => Ok(Changes::Since(self.export.dirty_ranges(name)?)),
            Err(reason) => Ok(Changes::Unknown(reason)),
        }
    }

    fn committed(&self, _snapshot: &str) {
        self.committed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_mean_enabled_and_consistent() {
        let b = |flags: &[&str]| BitmapInfo {
            name: "x".into(),
            granularity: GRANULARITY,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        assert!(b(&["auto"]).enabled() && b(&["auto"]).consistent());
        assert!(!b(&[]).enabled());
        assert!(!b(&["auto", "in-use"]).consistent());
    }
}
