//! `backflow gc` and `backflow rebuild-index`: the repository's housekeeping.

use anyhow::{Result, bail};
use backflow_repository::{DEFAULT_REPACK_THRESHOLD, GcOptions, GcReport};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    repo: std::ffi::OsString,
    /// Rewrite a pack once this percentage of its bytes is unreferenced (0-100); wholly unreferenced
    /// packs are always deleted.
    #[arg(long, default_value_t = DEFAULT_REPACK_THRESHOLD,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    repack_threshold: u8,
    /// Report what a gc would remove and rewrite; change nothing.
    #[arg(long, conflicts_with = "reset_state")]
    dry_run: bool,
    /// Also delete the damaged packs an earlier gc moved to the quarantine (quarantine/ in the
    /// repository) after salvaging what snapshots use.
    #[arg(long)]
    drop_quarantine: bool,
    /// Abandon a pending gc cycle whose state (gc/) is damaged, deleting nothing, then collect
    /// again; run it when no backup or restore runs (`backflow verify` says when it is needed).
    #[arg(long)]
    reset_state: bool,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let repo = crate::open_repo(&crate::repo_location(&args.repo)?)?;
    let report = repo.gc(&GcOptions {
        repack_threshold: args.repack_threshold,
        dry_run: args.dry_run,
        drop_quarantine: args.drop_quarantine,
        reset_state: args.reset_state,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The report for people.
pub fn text(r: &GcReport) -> String {
    let mut out = String::new();
    if r.dry_run {
        out.push_str("dry run, nothing changed; a gc now would find:\n");
    }
    if r.state_reset {
        out.push_str(
            "abandoned the pending gc cycle whose state could not be trusted (nothing was deleted)\n",
        );
    }
    if r.quarantine_dropped > 0 {
        out.push_str(&format!(
            "{} {} quarantined packs: {} freed\n",
            if r.dry_run { "would delete" } else { "deleted" },
            r.quarantine_dropped,
            mib(r.quarantine_bytes_freed)
        ));
    }
    if let Some(earlier) = &r.earlier_cycle {
        out.push_str("finished the collection an earlier gc had begun:\n");
        for line in text(earlier).lines() {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str("then collected again:\n");
    }
    out.push_str(&format!(
        "{} snapshots reference {} chunks; {} index records read\n",
        r.snapshots, r.referenced_chunks, r.indexed_chunks
    ));
    out.push_str(&format!(
        "packs: {} kept, {} rewritten, {} removed ({} left by interrupted runs)\n",
        r.packs_kept, r.packs_repacked, r.packs_removed, r.orphan_packs
    ));
    if r.packs_kept_with_unused > 0 {
        out.push_str(&format!(
            "{} unused in {} packs kept, below {}%\n",
            mib(r.unused_bytes_kept),
            r.packs_kept_with_unused,
            r.repack_threshold
        ));
    }
    out.push_str(&format!(
        "chunks: {} removed, {} moved out of rewritten packs, {} kept for backups that ran meanwhile\n",
        r.chunks_removed, r.chunks_moved, r.chunks_kept_for_running_backups
    ));
    match &r.waiting_for {
        Some(why) => out.push_str(&format!("nothing deleted yet: {why}\n")),
        None if r.dry_run => out.push_str(&format!(
            "it would delete {} of packs and write {}: {} freed\n",
            mib(r.bytes_deleted),
            mib(r.bytes_written),
            mib(r.bytes_freed())
        )),
        None => out.push_str(&format!(
            "deleted {} of packs, wrote {}: {} freed\n",
            mib(r.bytes_deleted),
            mib(r.bytes_written),
            mib(r.bytes_freed())
        )),
    }
    if r.missing_chunks > 0 {
        out.push_str(&format!(
            "{} referenced chunks are in no index: run `backflow verify` to see which snapshots they affect\n",
            r.missing_chunks
        ));
    }
    for p in &r.damaged_packs {
        out.push_str(&format!(
            "pack {p} has a damaged chunk and was left as it is\n"
        ));
    }
    if r.chunks_salvaged > 0 {
        out.push_str(&format!(
            "salvaged {} chunks that snapshots use from damaged copies (each checked against its digest, \
             stored again)\n",
            r.chunks_salvaged
        ));
    }
    for p in &r.packs_quarantined {
        out.push_str(&format!(
            "pack {p} is damaged (header, trailer or footer): {} to {}/ (`--drop-quarantine` deletes it)\n",
            if r.waiting_for.is_some() || r.dry_run {
                "to be moved"
            } else {
                "moved"
            },
            backflow_repository::QUARANTINE_DIR
        ));
    }
    if r.chunks_unsalvageable > 0 {
        out.push_str(&format!(
            "{} chunks that snapshots use have no copy that decodes to its digest: kept with their damage \
             marks; `backflow verify` names the snapshots, and the next backup of a VM that still has the \
             data stores them again\n",
            r.chunks_unsalvageable
        ));
    }
    out
}

#[derive(clap::Args)]
pub struct RebuildArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    repo: std::ffi::OsString,
}

/// Replaces the index by one read from the packs (no backup may run).
pub fn rebuild(args: RebuildArgs) -> Result<()> {
    let repo = crate::open_repo(&crate::repo_location(&args.repo)?)?;
    let report = repo.rebuild_index()?;
    println!(
        "index rebuilt from {} packs ({} chunks)",
        report.packs, report.chunks
    );
    for (pack, why) in &report.damaged_packs {
        println!("pack {pack} left out: {why}");
    }
    if !report.damaged_packs.is_empty() {
        bail!("{} packs could not be read", report.damaged_packs.len());
    }
    Ok(())
}
