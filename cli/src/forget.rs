//! `backflow forget`: applies a keep policy to each VM's snapshots and removes the manifests it does not keep
//! (the chunks stay until a garbage collection).

use std::path::PathBuf;

use anyhow::{Result, bail};
use backflow_repository::{Decision, KeepPolicy};

use crate::BadInput;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    repo: PathBuf,
    /// Only this VM's snapshots (default: every VM, each on its own).
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

pub fn run(args: Args) -> Result<()> {
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
             never the default)"
                .into(),
        )
        .into());
    }
    let repository = crate::open_repo(&args.repo)?;
    let mut snapshots = repository.list_snapshots()?;
    if let Some(vm) = &args.vm {
        if !snapshots.iter().any(|s| &s.vm == vm) {
            let mut vms: Vec<&str> = snapshots.iter().map(|s| s.vm.as_str()).collect();
            vms.sort();
            vms.dedup();
            return Err(BadInput(format!(
                "backflow forget: no snapshots of VM {vm:?} in {} (VMs with snapshots: {})",
                args.repo.display(),
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
        if args.dry_run {
            println!(
                "dry run: nothing was removed; {going} snapshot{} would be forgotten",
                plural(going)
            );
        } else {
            println!(
                "forgot {} snapshot{}; their chunks stay until a garbage collection",
                forgotten.len(),
                plural(forgotten.len())
            );
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} snapshots could not be forgotten: {}",
            failures.len(),
            failures.len() + forgotten.len(),
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
