//! `backflow forget`: applies a keep policy to each VM's snapshots and removes the manifests it does not keep,
//! or removes the snapshots named with `--snapshot` (the chunks stay until a garbage collection).

use anyhow::{Result, bail};
use backflow_repository::{Decision, KeepPolicy};

use crate::BadInput;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    repo: std::ffi::OsString,
    /// Forget this snapshot (its id, a prefix that names one snapshot, or `latest` of `--vm`;
    /// repeatable), whatever a policy would say: also one whose manifest is damaged (`backflow
    /// verify` names those). Every name is resolved before anything is removed.
    #[arg(long, value_name = "ID", conflicts_with_all = [
        "keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
    ])]
    snapshot: Vec<String>,
    /// Only this VM's snapshots (default: every VM, each on its own; with `--snapshot`, the names
    /// are looked up among this VM's snapshots). Images are identified by their canonical path, or
    /// the name a spec gave them: `backflow snapshots` shows it.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent days with snapshots (UTC).
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks with snapshots.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent months with snapshots.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent years with snapshots.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// List what would be forgotten; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// JSON: the policy, whether it was a dry run, and one decision per snapshot.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(serde::Serialize)]
struct Output<'a> {
    policy: &'a KeepPolicy,
    dry_run: bool,
    decisions: &'a [Decision],
    /// Ids actually removed (empty on a dry run).
    forgotten: &'a [String],
}

/// One snapshot named with `--snapshot`, as `--json` prints it.
#[derive(serde::Serialize)]
struct Named {
    id: String,
    /// `None` when the manifest's metadata cannot be read (`damaged`).
    vm: Option<String>,
    time_utc: Option<String>,
    damaged: bool,
}

/// What `--json` prints with `--snapshot`.
#[derive(serde::Serialize)]
struct NamedOutput<'a> {
    dry_run: bool,
    snapshots: &'a [Named],
    /// Ids actually removed (empty on a dry run).
    forgotten: &'a [String],
}

/// The snapshot id `wanted` names ([`backflow_repository::Repository::resolve_snapshot`]: an id, a
/// unique prefix, `latest` of `--vm`); a name that resolves to no single snapshot is bad input.
fn resolve(
    repository: &backflow_repository::Repository,
    wanted: &str,
    vm: Option<&str>,
) -> Result<String> {
    use backflow_repository::RepoError;
    match repository.resolve_snapshot(wanted, vm) {
        Ok(id) => Ok(id),
        Err(
            e @ (RepoError::SnapshotNotFound { .. }
            | RepoError::AmbiguousSnapshot { .. }
            | RepoError::LatestNeedsVm { .. }
            | RepoError::NoSnapshotOfVm { .. }),
        ) => Err(BadInput(format!(
            "backflow forget: --snapshot {wanted:?}: {e} (`backflow snapshots` lists them; `backflow \
             verify` names damaged ones)"
        ))
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// `--snapshot`: every id is resolved before anything is removed.
fn run_named(args: &Args) -> Result<()> {
    let repository = crate::open_repo(&crate::repo_location(&args.repo)?)?;
    let infos: std::collections::HashMap<String, backflow_repository::SnapshotInfo> = repository
        .list_snapshots()?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let mut named: Vec<Named> = Vec::new();
    for wanted in &args.snapshot {
        let id = resolve(&repository, wanted, args.vm.as_deref())?;
        if named.iter().any(|n| n.id == id) {
            continue;
        }
        let info = infos.get(&id);
        named.push(Named {
            vm: info.map(|i| i.vm.clone()),
            time_utc: info.map(|i| i.time_utc.clone()),
            damaged: info.is_none(),
            id,
        });
    }
    let mut forgotten = Vec::new();
    let mut failures = Vec::new();
    if !args.dry_run {
        for n in &named {
            match repository.forget(&n.id) {
                Ok(()) => forgotten.push(n.id.clone()),
                Err(e) => failures.push(format!("{}: {e}", n.id)),
            }
        }
    }
    if args.json {
        let out = NamedOutput {
            dry_run: args.dry_run,
            snapshots: &named,
            forgotten: &forgotten,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let action = if args.dry_run {
            "would forget"
        } else {
            "forget"
        };
        for n in &named {
            match (&n.vm, &n.time_utc) {
                (Some(vm), Some(time)) => println!("{action} {}  vm {vm}, {time}", n.id),
                _ => println!(
                    "{action} {}  (damaged manifest: its metadata cannot be read)",
                    n.id
                ),
            }
        }
        print_outcome(args.dry_run, named.len(), forgotten.len());
    }
    fail_if_any(&failures, named.len())?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if !args.snapshot.is_empty() {
        return run_named(&args);
    }
    let policy = KeepPolicy {
        last: args.keep_last,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    };
    if policy.is_empty() {
        return Err(BadInput(
            "backflow forget: no keep rule given: pass at least one of --keep-last, --keep-daily, \
             --keep-weekly, --keep-monthly, --keep-yearly with N >= 1 (forgetting every snapshot is \
             never the default), or name the snapshots to forget with --snapshot ID"
                .into(),
        )
        .into());
    }
    let location = crate::repo_location(&args.repo)?;
    let repository = crate::open_repo(&location)?;
    let mut snapshots = repository.list_snapshots()?;
    if let Some(vm) = &args.vm {
        if !snapshots.iter().any(|s| &s.vm == vm) {
            let mut vms: Vec<&str> = snapshots.iter().map(|s| s.vm.as_str()).collect();
            vms.sort();
            vms.dedup();
            return Err(BadInput(format!(
                "backflow forget: no snapshots of VM {vm:?} in {location} (VMs with snapshots: {})",
                if vms.is_empty() {
                    "none".to_owned()
                } else {
                    vms.join(", ")
                }
            ))
            .into());
        }
        snapshots.retain(|s| &s.vm == vm);
    }
    let decisions = backflow_repository::plan(&snapshots, &policy);

    let mut forgotten = Vec::new();
    let mut failures = Vec::new();
    if !args.dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            match repository.forget(&d.id) {
                Ok(()) => forgotten.push(d.id.clone()),
                Err(e) => failures.push(format!("{}: {e}", d.id)),
            }
        }
    }

    if args.json {
        let out = Output {
            policy: &policy,
            dry_run: args.dry_run,
            decisions: &decisions,
            forgotten: &forgotten,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", table(&decisions, &policy, args.dry_run));
        let going = decisions.iter().filter(|d| !d.keep).count();
        print_outcome(args.dry_run, going, forgotten.len());
    }
    fail_if_any(&failures, failures.len() + forgotten.len())
}

/// The last line of a forget: what a dry run would remove, or what was removed.
fn print_outcome(dry_run: bool, going: usize, forgotten: usize) {
    if dry_run {
        println!(
            "dry run: nothing was removed; {going} snapshot{} would be forgotten",
            plural(going)
        );
    } else {
        println!(
            "forgot {forgotten} snapshot{}; their chunks stay until a garbage collection",
            plural(forgotten)
        );
    }
}

/// An error listing the snapshots that could not be forgotten, of `tried`, if any.
fn fail_if_any(failures: &[String], tried: usize) -> Result<()> {
    if !failures.is_empty() {
        bail!(
            "{} of {tried} snapshots could not be forgotten: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One block per VM: a heading with the counts, then each snapshot newest first with keep/forget and why.
fn table(decisions: &[Decision], policy: &KeepPolicy, dry_run: bool) -> String {
    let id_w = decisions
        .iter()
        .map(|d| d.id.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let forget_word = if dry_run { "would forget" } else { "forget" };
    let action_w = forget_word.len();
    let mut out = format!("policy: {policy}\n");
    if decisions.is_empty() {
        out.push_str("no snapshots\n");
        return out;
    }
    for vm in decisions.chunk_by(|a, b| a.vm == b.vm) {
        let (first, n) = (&vm[0], vm.len());
        let keep = vm.iter().filter(|d| d.keep).count();
        out.push_str(&format!(
            "\nvm {}: {n} snapshot{}, keep {keep}, {forget_word} {}\n",
            first.vm,
            plural(n),
            n - keep
        ));
        out.push_str(&format!(
            "  {:<id_w$}  {:<20}  {:<action_w$}  reasons\n",
            "id", "time (UTC)", "action"
        ));
        for d in vm {
            let action = if d.keep { "keep" } else { forget_word };
            let line = format!(
                "  {:<id_w$}  {:<20}  {action:<action_w$}  {}",
                d.id,
                d.time_utc,
                d.reasons.join(", ")
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}
