//! Writes the generated repository of the gc scaling comparison (`benches/gc-scale.sh`); see
//! `backflow_benches::gc_repo`.
//!
//!   gen-gc-repo --out DIR [--chunks N] [--snapshots S] [--change-percent P] [--hot-percent H]
//!               [--pack-target BYTES] [--seed SEED] [--threads T]
//!
//! Prints a JSON object on stdout, one key a line: chunks, disk_chunks, snapshots, packs, pack_bytes, repo_bytes,
//! seconds.

use std::path::PathBuf;
use std::process::ExitCode;

use backflow_benches::gc_repo::{GcRepoOptions, generate};

const USAGE: &str = "usage: gen-gc-repo --out DIR [--chunks N] [--snapshots S] [--change-percent P] \
                     [--hot-percent H] [--pack-target BYTES] [--seed SEED] [--threads T]";

fn parse() -> Result<(PathBuf, GcRepoOptions), String> {
    let mut opts = GcRepoOptions::default();
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || {
            value
                .replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        let small =
            || number().and_then(|n| u32::try_from(n).map_err(|e| format!("{flag} {value}: {e}")));
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(&value)),
            "--chunks" => opts.chunks = number()?,
            "--snapshots" => opts.snapshots = small()?,
            "--change-percent" => opts.change_percent = small()?,
            "--hot-percent" => opts.hot_percent = small()?,
            "--pack-target" => opts.pack_target_size = number()?,
            "--seed" => opts.seed = number()?,
            "--threads" => opts.threads = small()? as usize,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    Ok((
        out.ok_or_else(|| format!("--out is required\n{USAGE}"))?,
        opts,
    ))
}

fn main() -> ExitCode {
    let (out, opts) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match generate(&out, &opts) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report.to_json()).expect("a JSON value prints")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-gc-repo: {e}");
            ExitCode::FAILURE
        }
    }
}
