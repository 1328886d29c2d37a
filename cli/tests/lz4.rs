//! The second compressor: backups with `--var compressor=lz4` restore byte-identical, and a
//! repository holding chunks of both codecs restores every snapshot without a setting. Real
//! binary, real files, `cmp` as the judge; the codecs are read off the packs' trailers.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use backflow_repository::Codec;
use common::*;

/// How many stored blobs of each codec the repository's packs hold.
fn codecs(repo: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for fan in std::fs::read_dir(repo.join("packs")).unwrap() {
        for pack in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let trailer = backflow_repository::read_pack_trailer(&pack.unwrap().path()).unwrap();
            for entry in trailer.entries {
                *counts.entry(format!("{:?}", entry.codec)).or_default() += 1;
            }
        }
    }
    counts
}

fn count(counts: &BTreeMap<String, usize>, codec: Codec) -> usize {
    counts.get(&format!("{codec:?}")).copied().unwrap_or(0)
}

/// `specs/backup-image.yaml` with the given compressor; returns the snapshot id.
fn backup_with(image: &Path, repo: &Path, disk: &str, compressor: &str) -> String {
    let report = repo.with_extension(format!("{disk}-{compressor}.json"));
    run_ok(
        backup_command(image, repo, disk)
            .arg("--var")
            .arg(format!("compressor={compressor}"))
            .arg("--report")
            .arg(&report),
    );
    let json = read_report(&report);
    std::fs::remove_file(&report).unwrap();
    let stages: Vec<&str> = json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap_or_default())
        .collect();
    assert!(stages.contains(&compressor), "{stages:?}");
    json["snapshot"].as_str().unwrap().to_owned()
}

#[test]
fn a_backup_with_lz4_restores_identical() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 64 << 20, 11).unwrap();
    init_repo(&repo, "128K");

    let id = backup_with(&image, &repo, "disk0", "lz4");
    let stored = codecs(&repo);
    // The fixture mixes compressible and incompressible data: both lz4 blocks and raw chunks,
    // and not one zstd frame.
    assert!(count(&stored, Codec::Lz4) > 0, "{stored:?}");
    assert!(count(&stored, Codec::None) > 0, "{stored:?}");
    assert_eq!(count(&stored, Codec::Zstd), 0, "{stored:?}");
    assert_restores_then_verifies(&repo, &[(&id, &image)], dir.path());
}

#[test]
fn a_repository_with_zstd_and_lz4_chunks_restores_both() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first.img"), dir.path().join("second.img"));
    let repo = dir.path().join("repo");
    // Different seeds: the second backup stores chunks of its own rather than deduplicating.
    backflow_fixtures::generate_image(&first, 48 << 20, 12).unwrap();
    backflow_fixtures::generate_image(&second, 48 << 20, 13).unwrap();
    init_repo(&repo, "128K");

    let zstd_id = backup_with(&first, &repo, "first", "zstd");
    let after_zstd = codecs(&repo);
    assert!(count(&after_zstd, Codec::Zstd) > 0, "{after_zstd:?}");
    let lz4_id = backup_with(&second, &repo, "second", "lz4");
    let after_both = codecs(&repo);
    assert_eq!(
        count(&after_both, Codec::Zstd),
        count(&after_zstd, Codec::Zstd)
    );
    assert!(count(&after_both, Codec::Lz4) > 0, "{after_both:?}");

    // `backflow restore` (specs/restore.yaml, unchanged) decodes both without being told.
    assert_restores_then_verifies(&repo, &[(&zstd_id, &first), (&lz4_id, &second)], dir.path());
}
