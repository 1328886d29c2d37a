//! Command-line tests against a real S3 store (`backflow_testkit::s3`): the store a test thread
//! uses is set once, and every [`super::backflow`] command of that thread gets its AWS variables,
//! so the path-taking helpers of `common` run unchanged on `s3://BUCKET/PREFIX` locations.
//! Threads a test spawns do not inherit it: call [`use_store`] in them too.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::Command;

use backflow_testkit::s3::S3;

/// Where the S3 repositories of the tests keep their local scratch, unless a test sets its own.
const SCRATCH: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/s3-scratch");

thread_local! {
    static STORE: RefCell<Option<S3>> = const { RefCell::new(None) };
    /// Further variables for every command of this thread ([`set_env`]).
    static EXTRA: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
}

/// Every later `backflow()` of this thread reaches `s3`'s store (its endpoint, region and key).
pub fn use_store(s3: &S3) {
    STORE.with(|s| *s.borrow_mut() = Some(s3.clone()));
}

/// Later `backflow()` commands of this thread get no S3 settings.
pub fn forget_store() {
    STORE.with(|s| *s.borrow_mut() = None);
}

/// Every later `backflow()` of this thread also gets `key=value` (a scratch directory of the test's
/// own, a short retry or lease bound), replacing an earlier value of `key`.
pub fn set_env(key: &str, value: &str) {
    EXTRA.with(|e| {
        let mut extra = e.borrow_mut();
        extra.retain(|(k, _)| k != key);
        extra.push((key.to_owned(), value.to_owned()));
    });
}

/// Later `backflow()` commands of this thread no longer get `key` from [`set_env`].
pub fn unset_env(key: &str) {
    EXTRA.with(|e| e.borrow_mut().retain(|(k, _)| k != key));
}

/// Sets the AWS variables of this thread's store on `cmd`, if it has one, and those of
/// [`set_env`].
pub(crate) fn apply_store(cmd: &mut Command) {
    STORE.with(|s| {
        if let Some(s3) = &*s.borrow() {
            s3.apply(cmd);
            // The per-repository scratch directories of the tests' buckets (one per bucket, left
            // for the next run as a local repository's tmp/ is) go under target/, not into the
            // machine's /var/tmp/backflow.
            cmd.env("BACKFLOW_SCRATCH_DIR", SCRATCH);
        }
    });
    EXTRA.with(|e| {
        for (k, v) in &*e.borrow() {
            cmd.env(k, v);
        }
    });
}

/// The repository `s3://BUCKET/PREFIX` as the `&Path` the helpers of `common` take (a path may
/// hold any string; the binary parses it as a location).
pub fn repo_path(s3: &S3, prefix: &str) -> PathBuf {
    PathBuf::from(s3.url(prefix))
}

/// The product's own S3 client on `s3`'s bucket under `prefix` (empty: the whole bucket), for
/// tests that list, read or damage objects through the S3 API rather than through the binary.
pub fn store(s3: &S3, prefix: &str) -> backflow_repository::store::s3::S3Store {
    use backflow_repository::store::s3::{S3Settings, S3Store};
    let mut vars: std::collections::HashMap<String, String> = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    vars.insert("BACKFLOW_SCRATCH_DIR".into(), SCRATCH.into());
    let settings = S3Settings::from_map(&vars).expect("S3 settings of the test store");
    let location = backflow_repository::S3Location {
        bucket: s3.bucket.clone(),
        prefix: prefix.trim_matches('/').to_owned(),
    };
    S3Store::open_with(&location, &settings).expect("open the test bucket")
}

/// Every object under `prefix` of `s3`'s bucket (keys relative to it, `/`-separated, sorted) with
/// its size, walked through the product's listing ([`store`]).
pub fn objects(s3: &S3, prefix: &str) -> Vec<(String, u64)> {
    use backflow_repository::store::Store;
    let store = store(s3, prefix);
    let mut out = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(dir) = todo.pop() {
        for e in store.list(&dir).expect("list the test bucket") {
            out.push((format!("{dir}{}", e.name), e.size));
        }
        for d in store.list_dirs(&dir).expect("list the test bucket") {
            todo.push(format!("{dir}{d}/"));
        }
    }
    out.sort();
    out
}

/// A handle on the repository at `repo`, in-process: a local path, or `s3://BUCKET/PREFIX` of the
/// store this thread uses ([`use_store`]; the test process's own environment has no AWS variables).
pub fn open_repository(repo: &std::path::Path) -> backflow_repository::Repository {
    use backflow_repository::{Location, Repository};
    let location = Location::parse(repo.to_str().expect("a UTF-8 location")).unwrap();
    match &location {
        Location::Local(path) => Repository::open(path).unwrap(),
        Location::S3(s3) => {
            let bucket = STORE.with(|s| s.borrow().clone()).unwrap_or_else(|| {
                panic!("{location}: call common::s3::use_store on this thread first")
            });
            assert_eq!(
                bucket.bucket, s3.bucket,
                "{location} is not in this thread's bucket"
            );
            Repository::open_store(std::sync::Arc::new(store(&bucket, &s3.prefix))).unwrap()
        }
    }
}
