//! The closed set of stage kinds.
//!
//! Each kind is one crate under `stages/` (or one of two kinds in it) that describes itself in a
//! [`KindRow`]: its name, summary, message types, whether it needs a repository, its options
//! (documented by the options struct's doc comments) and how its runtime value is built. This
//! catalog is the list of those rows, one line per kind: what the spec loader consults, what
//! `backflow stages` prints and what the README's stage table is generated from, so none of them
//! can drift from what the parser accepts.
//!
//! Adding a kind touches its own crate, the workspace member list and one line of [`ROWS`].

use std::sync::Arc;

use backflow_pipeline::describe::Build;
use backflow_pipeline::spec::{Catalog, Options, SpecError};
use backflow_pipeline::{Finaliser, MessageType, Stage};

pub use backflow_pipeline::describe::{KindDoc, KindRow, OptionDoc, RepositoryUse};

/// Every kind, stages first and finalisers last, in the order `backflow stages` lists them.
pub const ROWS: &[KindRow] = &[
    stage_image::ROW,
    stage_qemu_nbd::ROW,
    stage_nbd::ROW,
    stage_libvirt::ROW,
    stage_full_map::ROW,
    stage_dirty_bitmap::ROW,
    stage_dirty_bitmap::LIBVIRT_ROW,
    stage_reader::ROW,
    stage_dedup::ROW,
    stage_zstd::ROW,
    stage_lz4::ROW,
    stage_repo_writer::ROW,
    stage_generate::ROW,
    stage_discard::ROW,
    stage_repo_reader::ROW,
    stage_unzstd::ROW,
    stage_unzstd::DECODE_ROW,
    stage_verify::ROW,
    stage_disk_writer::ROW,
    stage_cleanup::ROW,
    stage_libvirt_define::ROW,
];

/// The row of a kind (stage or finaliser).
pub fn row(kind: &str) -> Option<&'static KindRow> {
    ROWS.iter().find(|r| r.kind == kind)
}

/// The documentation of every kind, in [`ROWS`] order.
pub fn docs() -> Vec<KindDoc> {
    ROWS.iter().map(KindRow::doc).collect()
}

/// The stage table of the README (`backflow stages --markdown`): one row per kind.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| kind | consumes -> produces | options (default) | what it does |\n|---|---|---|---|\n",
    );
    for doc in docs() {
        let io = |t: Option<MessageType>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
        let (kind, flow) = if doc.finaliser {
            (format!("`{}` (finaliser)", doc.kind), String::new())
        } else {
            (
                format!("`{}`", doc.kind),
                format!("{} -> {}", io(doc.input), io(doc.output)),
            )
        };
        let options: Vec<String> = doc
            .options
            .iter()
            .map(|o| match o.default.as_str() {
                "-" | "\"\"" | "[]" => format!("`{}`", o.name),
                default => format!("`{}` ({default})", o.name),
            })
            .collect();
        let repository = match (doc.needs_repository, doc.needs_repository_unless) {
            (false, _) => String::new(),
            (true, None) => "; needs the pipeline's `repository:`".to_owned(),
            (true, Some(option)) => {
                format!("; needs the pipeline's `repository:` unless `{option}: false`")
            }
        };
        out.push_str(&format!(
            "| {kind} | {flow} | {} | {}{repository} |\n",
            options.join(", "),
            doc.summary
        ));
    }
    out
}

/// The catalog the spec loader uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stages;

impl Catalog for Stages {
    fn kinds(&self) -> Vec<&'static str> {
        ROWS.iter()
            .filter(|r| !r.is_finaliser())
            .map(|r| r.kind)
            .collect()
    }

    fn finaliser_kinds(&self) -> Vec<&'static str> {
        ROWS.iter()
            .filter(|r| r.is_finaliser())
            .map(|r| r.kind)
            .collect()
    }

    fn build_stage(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Stage>, Vec<SpecError>> {
        match row(kind).map(|r| (r, r.build)) {
            Some((row, Build::Stage(build))) => {
                row.check_repository(options)?;
                build(options)
            }
            _ => Err(vec![
                options.error("kind", format!("unknown stage kind `{kind}`")),
            ]),
        }
    }

    fn build_finaliser(
        &self,
        kind: &str,
        options: &Options<'_>,
    ) -> Result<Arc<dyn Finaliser>, Vec<SpecError>> {
        match row(kind).map(|r| (r, r.build)) {
            Some((row, Build::Finaliser(build))) => {
                row.check_repository(options)?;
                build(options)
            }
            _ => Err(vec![
                options.error("kind", format!("unknown finaliser kind `{kind}`")),
            ]),
        }
    }
}
