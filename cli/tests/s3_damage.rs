//! Damage marks on an S3 repository, through the real binary on Garage: a byte of a pack's chunk
//! data flipped through the S3 API is found by `verify --read-data` (which fails, names the
//! snapshot and writes the `damaged` object), the damaged restore point does not restore, the next
//! backup of the intact source stores the damaged chunk again instead of taking it over, and both
//! restore points then restore identical (the first from the new copy).

mod common;

use backflow_repository::store::{PutMode, Store};
use backflow_testkit::s3::Garage;
use common::s3::{objects, repo_path, store, use_store};
use common::*;

/// Where in a pack the flipped byte goes: past the 32-byte header, inside the first chunk's blob
/// (packs of 256 KiB hold several 64 KiB chunks, so the trailer is far from it).
const FLIP_AT: u64 = 32 + 1000;

#[test]
fn a_damaged_pack_in_s3_is_found_marked_and_not_taken_over_by_the_next_backup() {
    let s3 = Garage::shared().bucket("damage");
    use_store(&s3);
    let repo = repo_path(&s3, "repo");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // Random-looking data: every chunk distinct and incompressible enough to fill several packs.
    backflow_fixtures::generate_image(&image, 8 << 20, 11).unwrap();
    init_small_packs(&repo);
    let first = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_verifies(&repo, "before the damage");

    let packs: Vec<String> = objects(&s3, "repo")
        .into_iter()
        .filter(|(k, _)| k.starts_with("packs/") && k.ends_with(".pack"))
        .map(|(k, _)| k)
        .collect();
    assert!(packs.len() > 2, "{packs:?}");
    let target = &packs[0];
    let bucket = store(&s3, "repo");
    let mut bytes = bucket.read(target).unwrap().expect("the pack is there");
    bytes[FLIP_AT as usize] ^= 0x5a;
    bucket.put(target, &bytes, PutMode::Replace).unwrap();

    let (ok, report) = verify_json(&repo, true);
    assert!(!ok, "verify passed over a damaged pack: {report:#}");
    assert_eq!(
        report["unrestorable_snapshots"],
        serde_json::json!([first]),
        "the damaged snapshot is not named: {report:#}"
    );
    assert!(
        objects(&s3, "repo").iter().any(|(k, _)| k == "damaged"),
        "verify wrote no damage marks"
    );

    // Before any new backup the damaged restore point does not restore.
    let failed = restore(&repo, &first, &dir.path().join("first.img"));
    assert!(
        !failed.status.success(),
        "the damaged restore point restored without --allow-damaged"
    );

    // The source is intact: the next backup stores the damaged chunk again (a new copy) instead
    // of referencing the damaged one, and the first restore point heals with it.
    let second = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_restores(
        &repo,
        &[
            (second.as_str(), image.as_path()),
            (first.as_str(), image.as_path()),
        ],
        dir.path(),
    );
    // verify still names the damaged copy, healed, and no snapshot is damaged any more.
    let (ok, report) = verify_json(&repo, true);
    assert!(ok, "{report:#}");
    assert_eq!(
        report["unrestorable_snapshots"],
        serde_json::json!([]),
        "{report:#}"
    );
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report:#}");
    assert_eq!(problems[0]["healed"], true, "{report:#}");
}
