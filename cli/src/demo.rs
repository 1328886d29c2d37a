//! `backflow demo`: the whole cycle on a generated image, with no configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use backflow_pipeline::spec;
use backflow_repository::Repository;
use backflow_stages::Stages;

use crate::{BACKUP_IMAGE_SPEC, RESTORE_SPEC, run_pipeline};

pub fn run(dir: &Path, size: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join("disk.img");
    let repo = dir.join("repo");
    let first_copy = dir.join("disk-at-backup-1.img");
    if repo.exists() {
        std::fs::remove_dir_all(&repo)
            .with_context(|| format!("removing the old {}", repo.display()))?;
    }

    step(&format!(
        "generating a {} MiB disk image {}",
        size >> 20,
        image.display()
    ));
    let stats = backflow_fixtures::generate_image(&image, size, 1)
        .with_context(|| format!("generating {}", image.display()))?;
    let mix: Vec<String> = backflow_fixtures::Category::ALL
        .iter()
        .map(|c| {
            format!(
                "{} {:.0}%",
                c.name(),
                100.0 * stats.bytes(*c) as f64 / stats.size as f64
            )
        })
        .collect();
    println!("{} files; {}", stats.files, mix.join(", "));
    Repository::init(&repo, backflow_repository::DEFAULT_CHUNK_SIZE)?;

    step("backup 1 (full)");
    let first = backup(&image, &repo)?;
    copy_sparse(&image, &first_copy)?;

    step("changing 5% of the image at scattered offsets");
    let ranges = backflow_fixtures::change_image(&image, 0.05, 2)?;
    let changed: u64 = ranges.iter().map(|r| r.len).sum();
    println!("{} extents, {} MiB changed", ranges.len(), changed >> 20);

    step("backup 2 (after the change)");
    let second = backup(&image, &repo)?;

    for (id, original) in [(&first, &first_copy), (&second, &image)] {
        step(&format!("restoring snapshot {id}"));
        let out = dir.join(format!("restored-{id}.img"));
        restore(&repo, id, &out)?;
        compare(original, &out)?;
    }
    step("verifying every chunk of the repository");
    let report = Repository::open(&repo)?.verify(true)?;
    print!("{}", crate::verify_text(&report));
    if !report.is_ok() {
        bail!("verify found damage");
    }
    println!(
        "\ndemo done: both restore points restored byte-identical; files are in {}",
        dir.display()
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn backup(image: &Path, repo: &Path) -> Result<String> {
    let vars = vec![
        ("source".to_owned(), image.display().to_string()),
        ("repo".to_owned(), repo.display().to_string()),
        ("disk".to_owned(), "disk".to_owned()),
    ];
    let (name, text) = BACKUP_IMAGE_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(crate::spec_errors)?;
    let report = run_pipeline(&pipeline, None, false)?;
    report.snapshot.context("the backup committed no snapshot")
}

fn restore(repo: &Path, snapshot: &str, to: &Path) -> Result<()> {
    let vars = vec![
        ("repo".to_owned(), repo.display().to_string()),
        ("snapshot".to_owned(), snapshot.to_owned()),
        ("disk".to_owned(), String::new()),
        ("to".to_owned(), to.display().to_string()),
    ];
    let (name, text) = RESTORE_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(crate::spec_errors)?;
    run_pipeline(&pipeline, None, false)?;
    Ok(())
}

fn compare(a: &Path, b: &Path) -> Result<()> {
    let status = Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .context("running cmp (package diffutils)")?;
    if !status.success() {
        bail!("{} and {} differ", a.display(), b.display());
    }
    println!("cmp {} {}: identical", a.display(), b.display());
    Ok(())
}

fn copy_sparse(from: &Path, to: &PathBuf) -> Result<()> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("copying {} failed", from.display());
    }
    Ok(())
}
