//! A worker's task carries the store's credentials: the worker's own environment has none, and
//! the backup still lands in the S3 repository (and restores).

mod common;

use std::path::Path;
use std::time::Duration;

use backflow_jobs::Verdict;
use backflow_testkit::s3::Garage;
use common::worker::{events_until_record, start, task};
use common::*;

#[test]
fn a_task_brings_the_stores_credentials() {
    let s3 = Garage::shared().bucket("s3-worker");
    common::s3::use_store(&s3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 8 << 20, 7).unwrap();
    let url = s3.url("worker-creds");
    run_ok(backflow().args(["init", "--repo", &url]));

    let mut with_env = task(&image, &url);
    with_env.env = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let (mut child, stdin) = start(&with_env, &[]);
    let (_, record) = events_until_record(&mut child);
    drop(stdin);
    assert!(wait_exit(&mut child, Duration::from_secs(60)).success());
    let record = record.unwrap();
    assert_eq!(record.result, Verdict::Success, "{record:?}");
    // Without the task's variables the worker could not have reached the store at all.
    let snapshot = record.snapshot.unwrap();
    assert_eq!(snapshot_ids(Path::new(&url)), vec![snapshot.clone()]);
    assert_restores(Path::new(&url), &[(&snapshot, &image)], dir.path());
}
