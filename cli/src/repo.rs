//! `init`, `snapshots` and `verify`: the repository itself.

use anyhow::{Result, bail};
use backflow_pipeline::ByteSize;
use backflow_repository::{Location, Repository};

use crate::{BadInput, open_repo, repo_location};

#[derive(clap::Args)]
pub struct InitArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    pub repo: std::ffi::OsString,
    /// Chunk size: a multiple of 64K from 64K to 16M (default 128K).
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Size at which pack files are closed, 64K to 1G (default 32M).
    #[arg(long, value_name = "SIZE")]
    pub pack_size: Option<String>,
    /// Encrypt everything stored (XChaCha20-Poly1305, keyed chunk ids); the first key's
    /// passphrase is read from --password-file (or BACKFLOW_PASSWORD_FILE).
    #[arg(long)]
    pub encryption: bool,
}

#[derive(clap::Args)]
pub struct SnapshotsArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    pub repo: std::ffi::OsString,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    pub repo: std::ffi::OsString,
    #[arg(long)]
    pub read_data: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn init(args: InitArgs) -> Result<()> {
    use backflow_repository::{
        CHUNK_SIZE_ALIGN, DEFAULT_CHUNK_SIZE, DEFAULT_PACK_TARGET_SIZE, MAX_CHUNK_SIZE,
        MAX_PACK_TARGET_SIZE, MIN_CHUNK_SIZE, MIN_PACK_TARGET_SIZE,
    };
    let InitArgs {
        repo,
        chunk_size,
        pack_size,
        encryption,
    } = args;
    let location = repo_location(&repo)?;
    let chunk_size = match chunk_size {
        None => DEFAULT_CHUNK_SIZE,
        Some(typed) => {
            let size = size_option(
                "--chunk-size",
                &typed,
                |b| {
                    (u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&b)
                        && b.is_multiple_of(u64::from(CHUNK_SIZE_ALIGN))
                },
                || {
                    format!(
                        "a multiple of {} from {} to {}",
                        ByteSize(CHUNK_SIZE_ALIGN.into()),
                        ByteSize(MIN_CHUNK_SIZE.into()),
                        ByteSize(MAX_CHUNK_SIZE.into())
                    )
                },
            )?;
            u32::try_from(size).expect("at most MAX_CHUNK_SIZE")
        }
    };
    let pack_target_size = match pack_size {
        None => DEFAULT_PACK_TARGET_SIZE,
        Some(typed) => size_option(
            "--pack-size",
            &typed,
            |b| (MIN_PACK_TARGET_SIZE..=MAX_PACK_TARGET_SIZE).contains(&b),
            || {
                format!(
                    "a size from {} to {}",
                    ByteSize(MIN_PACK_TARGET_SIZE),
                    ByteSize(MAX_PACK_TARGET_SIZE)
                )
            },
        )?,
    };
    let options = backflow_repository::InitOptions {
        chunk_size,
        pack_target_size,
    };
    // Each error names the location already (`cannot create a repository in DIR: ...`).
    let made = match encryption {
        true => Repository::init_encrypted(&location, &options),
        false => Repository::init_at(&location, &options),
    };
    made.map_err(|e| match e {
        // Not a directory, or one that is not empty: what was typed is wrong, nothing was made.
        // No passphrase (or an empty one): the same.
        backflow_repository::RepoError::InitRefused { .. }
        | backflow_repository::RepoError::Passphrase { .. }
        | backflow_repository::RepoError::StoreSettings { .. } => {
            BadInput::new(e.to_string()).into()
        }
        other => anyhow::Error::new(other),
    })?;
    println!(
        "created {}repository {location} (chunk size {})",
        if encryption { "encrypted " } else { "" },
        ByteSize(u64::from(chunk_size))
    );
    Ok(())
}

/// A size option as typed (`64K`, `1M`), in bytes; what was typed is echoed when it is not a size
/// or out of range, so that the message shows the mistake.
fn size_option(
    option: &str,
    typed: &str,
    fits: impl Fn(u64) -> bool,
    expected: impl Fn() -> String,
) -> Result<u64> {
    match typed.parse::<ByteSize>() {
        Ok(size) if fits(size.bytes()) => Ok(size.bytes()),
        _ => Err(BadInput::new(format!(
            "{option} {typed}: expected {} (K, M and G are powers of 1024)",
            expected()
        ))
        .into()),
    }
}

pub fn snapshots(args: SnapshotsArgs) -> Result<()> {
    let SnapshotsArgs { repo, json } = args;
    let repository = open_repo(&repo_location(&repo)?)?;
    let snapshots = repository.list_snapshots()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshots)?);
    } else {
        print!("{}", snapshots_table(&snapshots));
    }
    Ok(())
}

/// One line per snapshot, oldest first: id, time, the identity it belongs to (`vm`: what `--vm`,
/// retention and `latest` go by), the size of its disks together, its disks, and where they were
/// read from. Columns are as wide as their widest value, so that long image paths stay aligned.
fn snapshots_table(snapshots: &[backflow_repository::SnapshotInfo]) -> String {
    let rows: Vec<[String; 6]> = snapshots
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.time_utc.clone(),
                s.vm.clone(),
                ByteSize(s.size).to_string(),
                s.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                s.source.clone(),
            ]
        })
        .collect();
    let header = ["id", "time (UTC)", "vm", "size", "disks", "source"].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Sizes right-aligned, the rest left.
            if i == 3 {
                line.push_str(&format!("{cell:>w$}"));
            } else {
                line.push_str(&format!("{cell:<w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn verify(args: VerifyArgs) -> Result<()> {
    let VerifyArgs {
        repo,
        read_data,
        json,
    } = args;
    let location = repo_location(&repo)?;
    let repository = open_repo(&location)?;
    let report = repository.verify_and_mark(read_data)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", verify_text(&report, &location));
    }
    if !report.is_ok() {
        bail!("the repository has damaged or missing data (see above)");
    }
    Ok(())
}

/// The verify report for people: counts, then one block per problem naming the chunk, where it
/// is stored and the restore points that need it.
pub fn verify_text(report: &backflow_repository::VerifyReport, location: &Location) -> String {
    let mut out = format!(
        "checked {} snapshots, {} chunk references, {} index files ({} records), {} packs",
        report.snapshots, report.chunk_refs, report.index_files, report.index_records, report.packs
    );
    if report.read_data {
        out.push_str(&format!(
            "; read {} chunks ({:.1} MiB)",
            report.chunks_read,
            report.bytes_read as f64 / (1024.0 * 1024.0)
        ));
    }
    out.push('\n');
    if report.unreferenced_packs > 0 {
        out.push_str(&format!(
            "{} packs are not referenced by any index (left by interrupted runs; harmless)\n",
            report.unreferenced_packs
        ));
    }
    for (f, id) in report
        .damaged_snapshots
        .iter()
        .zip(&report.damaged_snapshot_ids)
    {
        out.push_str(&format!(
            "DAMAGED snapshot {id} (manifest {}): {}\n    if it cannot be repaired, `backflow forget \
             --repo {} --snapshot {id}` removes it (a gc stops until then)\n",
            f.path,
            f.error,
            location
        ));
    }
    for (what, files) in [
        ("index file", &report.damaged_index_files),
        ("pack", &report.damaged_packs),
    ] {
        for f in files {
            out.push_str(&format!("DAMAGED {what} {}: {}\n", f.path, f.error));
        }
    }
    for p in &report.problems {
        out.push_str(&format!(
            "{} chunk {} ({:?}): {}\n",
            if p.healed { "HEALED" } else { "DAMAGED" },
            p.digest,
            p.kind,
            p.detail
        ));
        if let Some(pack) = &p.pack {
            out.push_str(&format!(
                "    stored in pack {} at offset {}\n",
                pack.to_hex(),
                p.offset.unwrap_or(0)
            ));
        }
        if p.healed {
            out.push_str(
                "    superseded by a healthy copy stored later: no restore point needs this one\n",
            );
        } else if p.snapshots.is_empty() {
            out.push_str("    no snapshot uses it\n");
        } else {
            out.push_str(&format!(
                "    used by snapshots: {}\n",
                p.snapshots.join(", ")
            ));
        }
    }
    if report.unindexed_chunks > 0 {
        out.push_str(&format!(
            "{} referenced chunks were found only in pack trailers (an index file is damaged or lost): \
             they restore, slowly; `backflow rebuild-index` indexes them again\n",
            report.unindexed_chunks
        ));
    }
    for f in &report.side_files {
        out.push_str(&format!("WARNING side file {}: {}\n", f.path, f.error));
    }
    if report.cleared_marks > 0 {
        out.push_str(&format!(
            "{} chunks marked damaged earlier read back whole: their marks were dropped\n",
            report.cleared_marks
        ));
    }
    let unhealed = report
        .problems
        .iter()
        .filter(|p| !p.healed && p.pack.is_some())
        .count();
    if report.marked > 0 && unhealed > 0 {
        out.push_str(&format!(
            "{unhealed} damaged chunks marked; the next backup of a VM that still has the data \
             stores it again\n"
        ));
    }
    if !report.unrestorable_snapshots.is_empty() {
        out.push_str(&format!(
            "snapshots that cannot be restored whole: {}\n",
            report.unrestorable_snapshots.join(", ")
        ));
    }
    out.push_str(if report.is_ok() {
        "repository OK\n"
    } else {
        "repository DAMAGED\n"
    });
    out
}
