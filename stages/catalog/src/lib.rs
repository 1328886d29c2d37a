//! The closed set of stage kinds.
//!
//! Each kind is one variant of [`Kind`] and one crate under `stages/`: its options type (serde,
//! from the spec) and its runtime value. This catalog is what the spec loader consults, and what
//! `backflow stages` prints, so the documentation cannot drift from what the parser accepts.

use std::sync::Arc;

use backflow_pipeline::spec::{Catalog, Options, SpecError};
use backflow_pipeline::{Finaliser, InvalidOption, MessageType, Stage};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every data stage kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Image,
    QemuNbd,
    Nbd,
    Libvirt,
    Full,
    DirtyBitmap,
    LibvirtCheckpoint,
    Reader,
    Dedup,
    Zstd,
    RepoWriter,
    Generate,
    Discard,
    RepoReader,
    Unzstd,
    Verify,
    DiskWriter,
}

/// Documentation of one kind, for `backflow stages`.
#[derive(Clone, Debug, Serialize)]
pub struct KindDoc {
    pub kind: &'static str,
    pub summary: &'static str,
    /// Message type consumed (`None`: a source) and produced (`None`: a sink).
    pub input: Option<MessageType>,
    pub output: Option<MessageType>,
    /// Whether the stage needs the pipeline's `repository:`.
    pub needs_repository: bool,
    pub options: Vec<OptionDoc>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OptionDoc {
    pub name: String,
    /// The default as YAML would write it; `required` when there is none.
    pub default: String,
    pub doc: &'static str,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Image,
        Kind::QemuNbd,
        Kind::Nbd,
        Kind::Libvirt,
        Kind::Full,
        Kind::DirtyBitmap,
        Kind::LibvirtCheckpoint,
        Kind::Reader,
        Kind::Dedup,
        Kind::Zstd,
        Kind::RepoWriter,
        Kind::Generate,
        Kind::Discard,
        Kind::RepoReader,
        Kind::Unzstd,
        Kind::Verify,
        Kind::DiskWriter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Image => stage_image::KIND,
            Kind::QemuNbd => stage_qemu_nbd::KIND,
            Kind::Nbd => stage_nbd::KIND,
            Kind::Libvirt => stage_libvirt::KIND,
            Kind::Full => stage_full_map::KIND,
            Kind::DirtyBitmap => stage_dirty_bitmap::KIND,
            Kind::LibvirtCheckpoint => stage_dirty_bitmap::LIBVIRT_KIND,
            Kind::Reader => stage_reader::KIND,
            Kind::Dedup => stage_dedup::KIND,
            Kind::Zstd => stage_zstd::KIND,
            Kind::RepoWriter => stage_repo_writer::KIND,
            Kind::Generate => stage_generate::KIND,
            Kind::Discard => stage_discard::KIND,
            Kind::RepoReader => stage_repo_reader::KIND,
            Kind::Unzstd => stage_unzstd::KIND,
            Kind::Verify => stage_verify::KIND,
            Kind::DiskWriter => stage_disk_writer::KIND,
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn summary(self) -> &'static str {
        match self {
            Kind::Image => "source: a raw image file or block device, read directly",
            Kind::QemuNbd => {
                "source: any image QEMU reads (qcow2), through a private qemu-nbd; unallocated clusters are skipped"
            }
            Kind::Nbd => {
                "source: an NBD export someone else serves (qemu-nbd, nbdkit); zero ranges are skipped"
            }
            Kind::Libvirt => {
                "snapshot source: every disk of a libvirt VM at one instant (pull-mode backup job with a checkpoint; qemu-nbd over the images when the VM is off)"
            }
            Kind::Full => "changed-block map: every allocated extent (holes are skipped)",
            Kind::DirtyBitmap => {
                "changed-block map: only what the source's change tracking (qcow2 bitmap) says changed since the parent; a full read with a warning when that is not certain"
            }
            Kind::LibvirtCheckpoint => {
                "changed-block map: only what libvirt's checkpoint bitmap says changed since the parent; a full read with a warning when the checkpoint cannot be trusted"
            }
            Kind::Reader => {
                "reads chunk-aligned extents into chunks; all-zero chunks are not stored"
            }
            Kind::Dedup => "BLAKE3 of each chunk; chunks the repository has go no further",
            Kind::Zstd => "compresses new chunks (raw when they do not shrink)",
            Kind::RepoWriter => "packs new chunks into the repository, commits the snapshot last",
            Kind::Generate => "source: seeded synthetic chunks, for tuning one stage",
            Kind::Discard => "sink: drops everything, for tuning one stage",
            Kind::RepoReader => "restore source: a snapshot's chunks, read ahead by its workers",
            Kind::Unzstd => "decodes stored chunks to plaintext",
            Kind::Verify => "checks each chunk against its digest before it is written",
            Kind::DiskWriter => {
                "writes chunks into sparse raw images, devices or qcow2 images, in parallel"
            }
        }
    }

    pub fn needs_repository(self) -> bool {
        matches!(self, Kind::RepoWriter | Kind::RepoReader)
    }

    /// Builds the runtime value from a spec's options.
    pub fn build(self, options: &Options<'_>) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
        if self.needs_repository() && !options.has_repository() {
            return Err(vec![options.error(
                "kind",
                format!(
                    "stage kind `{}` needs the pipeline's `repository:` to be set",
                    self.name()
                ),
            )]);
        }
        fn make<O: DeserializeOwned, S: Stage>(
            options: &Options<'_>,
            new: fn(O) -> Result<S, InvalidOption>,
        ) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
            let parsed = options.deserialize::<O>()?;
            new(parsed)
                .map(|s| Arc::new(s) as Arc<dyn Stage>)
                .map_err(|e| vec![options.error(e.option, e.message)])
        }
        match self {
            Kind::Image => make(options, stage_image::ImageSource::new),
            Kind::QemuNbd => make(options, stage_qemu_nbd::QemuNbd::new),
            Kind::Nbd => make(options, stage_nbd::NbdSource::new),
            Kind::Full => make(options, stage_full_map::FullMap::new),
            Kind::Libvirt => make(options, stage_libvirt::LibvirtSource::new),
            Kind::DirtyBitmap => make(options, stage_dirty_bitmap::DirtyBitmap::new),
            Kind::LibvirtCheckpoint => make(options, stage_dirty_bitmap::DirtyBitmap::libvirt),
            Kind::Reader => make(options, stage_reader::Reader::new),
            Kind::Dedup => make(options, stage_dedup::Dedup::new),
            Kind::Zstd => make(options, stage_zstd::Zstd::new),
            Kind::RepoWriter => make(options, stage_repo_writer::RepoWriter::new),
            Kind::Generate => make(options, stage_generate::Generate::new),
            Kind::Discard => make(options, stage_discard::Discard::new),
            Kind::RepoReader => make(options, stage_repo_reader::RepoReader::new),
            Kind::Unzstd => make(options, stage_unzstd::Unzstd::new),
            Kind::Verify => make(options, stage_verify::Verify::new),
            Kind::DiskWriter => make(options, stage_disk_writer::DiskWriter::new),
        }
    }

    /// Message types with default options (`generate` produces hashed chunks with `hashed: true`).
    pub fn default_io(self) -> (Option<MessageType>, Option<MessageType>) {
        use MessageType::*;
        match self {
            Kind::Image => (None, Some(Disk)),
            Kind::QemuNbd => (None, Some(Disk)),
            Kind::Nbd | Kind::Libvirt => (None, Some(Disk)),
            Kind::Full | Kind::DirtyBitmap | Kind::LibvirtCheckpoint => (Some(Disk), Some(Extent)),
            Kind::Reader => (Some(Extent), Some(Chunk)),
            Kind::Dedup => (Some(Chunk), Some(HashedChunk)),
            Kind::Zstd => (Some(HashedChunk), Some(CompressedChunk)),
            Kind::RepoWriter => (Some(CompressedChunk), None),
            Kind::Generate => (None, Some(Chunk)),
            Kind::Discard => (Some(Any), None),
            Kind::RepoReader => (None, Some(CompressedChunk)),
            Kind::Unzstd => (Some(CompressedChunk), Some(HashedChunk)),
            Kind::Verify => (Some(HashedChunk), Some(VerifiedChunk)),
            Kind::DiskWriter => (Some(VerifiedChunk), None),
        }
    }

    pub fn doc(self) -> KindDoc {
        let options = match self {
            Kind::Image => option_docs::<stage_image::ImageOptions>(stage_image::OPTION_DOCS),
            Kind::QemuNbd => {
                option_docs::<stage_qemu_nbd::QemuNbdOptions>(stage_qemu_nbd::OPTION_DOCS)
            }
            Kind::DirtyBitmap | Kind::LibvirtCheckpoint => {
                option_docs::<stage_dirty_bitmap::DirtyBitmapOptions>(
                    stage_dirty_bitmap::OPTION_DOCS,
                )
            }
            Kind::Libvirt => {
                option_docs::<stage_libvirt::LibvirtOptions>(stage_libvirt::OPTION_DOCS)
            }
            Kind::Nbd => option_docs::<stage_nbd::NbdOptions>(stage_nbd::OPTION_DOCS),
            Kind::Full => {
                option_docs::<stage_full_map::FullMapOptions>(stage_full_map::OPTION_DOCS)
            }
            Kind::Reader => option_docs::<stage_reader::ReaderOptions>(stage_reader::OPTION_DOCS),
            Kind::Dedup => option_docs::<stage_dedup::DedupOptions>(stage_dedup::OPTION_DOCS),
            Kind::Zstd => option_docs::<stage_zstd::ZstdOptions>(stage_zstd::OPTION_DOCS),
            Kind::RepoWriter => {
                option_docs::<stage_repo_writer::RepoWriterOptions>(stage_repo_writer::OPTION_DOCS)
            }
            Kind::Generate => {
                option_docs::<stage_generate::GenerateOptions>(stage_generate::OPTION_DOCS)
            }
            Kind::Discard => {
                option_docs::<stage_discard::DiscardOptions>(stage_discard::OPTION_DOCS)
            }
            Kind::RepoReader => {
                option_docs::<stage_repo_reader::RepoReaderOptions>(stage_repo_reader::OPTION_DOCS)
            }
            Kind::Unzstd => option_docs::<stage_unzstd::UnzstdOptions>(stage_unzstd::OPTION_DOCS),
            Kind::Verify => option_docs::<stage_verify::VerifyOptions>(stage_verify::OPTION_DOCS),
            Kind::DiskWriter => {
                option_docs::<stage_disk_writer::DiskWriterOptions>(stage_disk_writer::OPTION_DOCS)
            }
        };
        let (input, output) = self.default_io();
        KindDoc {
            kind: self.name(),
            summary: self.summary(),
            input,
            output,
            needs_repository: self.needs_repository(),
            options,
        }
    }
}

/// The options of a kind with their defaults, read off the options type itself: its `Default`
/// serialised. An option without a default serialises as null: shown as `required` when its
/// documentation says so, else as `-` (unset).
fn option_docs<O: Default + Serialize>(
    docs: &'static [(&'static str, &'static str)],
) -> Vec<OptionDoc> {
    let defaults = serde_json::to_value(O::default()).unwrap_or_default();
    let map = defaults.as_object().cloned().unwrap_or_default();
    map.into_iter()
        .map(|(name, value)| {
            let default = match value {
                serde_json::Value::Null if doc_of(docs, &name).contains("(required)") => {
                    "required".to_owned()
                }
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            let doc = doc_of(docs, &name);
            OptionDoc { name, default, doc }
        })
        .collect()
}

fn doc_of(docs: &'static [(&'static str, &'static str)], name: &str) -> &'static str {
    docs.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .unwrap_or("")
}

/// Finaliser kinds.
pub const FINALISER_KINDS: [&str; 2] = [stage_cleanup::KIND, stage_libvirt_define::KIND];

pub fn cleanup_doc() -> KindDoc {
    KindDoc {
        kind: stage_cleanup::KIND,
        summary: "finaliser: always runs after the data stages; removes what interrupted runs left",
        input: None,
        output: None,
        needs_repository: false,
        options: option_docs::<stage_cleanup::CleanupOptions>(stage_cleanup::OPTION_DOCS),
    }
}

pub fn libvirt_define_doc() -> KindDoc {
    KindDoc {
        kind: stage_libvirt_define::KIND,
        summary: "finaliser: after a successful restore, defines the restored VM as a new libvirt domain (new name, UUID and MACs) on the restored images; then does what `cleanup` does",
        input: None,
        output: None,
        needs_repository: true,
        options: option_docs::<stage_libvirt_define::LibvirtDefineOptions>(
            stage_libvirt_define::OPTION_DOCS,
        ),
    }
}

/// The documentation of every finaliser kind, in [`FINALISER_KINDS`] order.
pub fn finaliser_docs() -> Vec<KindDoc> {
    vec![cleanup_doc(), libvirt_define_doc()]
}

/// The catalog the spec loader uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stages;

impl Catalog for Stages {
    fn kinds(&self) -> Vec<&'static str> {
        Kind::ALL.iter().map(|k| k.name()).collect()
    }

    fn finaliser_kinds(&self) -> Vec<&'static str> {
        FINALISER_KINDS.to_vec()
    }

    fn build_stage(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
        match Kind::from_name(kind) {
            Some(k) => k.build(options),
            None => Err(vec![
                options.error("kind", format!("unknown stage kind `{kind}`")),
            ]),
        }
    }

    fn build_finaliser(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Finaliser>, Vec<SpecError>> {
        if kind == stage_libvirt_define::KIND {
            let parsed = options.deserialize::<stage_libvirt_define::LibvirtDefineOptions>()?;
            return stage_libvirt_define::LibvirtDefine::new(parsed)
                .map(|f| Arc::new(f) as Arc<dyn Finaliser>)
                .map_err(|e| vec![options.error(e.option, e.message)]);
        }
        if kind != stage_cleanup::KIND {
            return Err(vec![
                options.error("kind", format!("unknown finaliser kind `{kind}`")),
            ]);
        }
        let parsed = options.deserialize::<stage_cleanup::CleanupOptions>()?;
        stage_cleanup::Cleanup::new(parsed)
            .map(|c| Arc::new(c) as Arc<dyn Finaliser>)
            .map_err(|e| vec![options.error(e.option, e.message)])
    }
}
