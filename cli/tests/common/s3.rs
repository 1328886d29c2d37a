//! Command-line tests against a real S3 store (`backflow_testkit::s3`): the store a test thread
//! uses is set once, and every [`super::backflow`] command of that thread gets its AWS variables,
//! so the path-taking helpers of `common` run unchanged on `s3://BUCKET/PREFIX` locations.
//! Threads a test spawns do not inherit it: call [`use_store`] in them too.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::Command;

use backflow_testkit::s3::S3;

thread_local! {
    static STORE: RefCell<Option<S3>> = const { RefCell::new(None) };
}

/// Every later `backflow()` of this thread reaches `s3`'s store (its endpoint, region and key).
pub fn use_store(s3: &S3) {
    STORE.with(|s| *s.borrow_mut() = Some(s3.clone()));
}

/// Later `backflow()` commands of this thread get no S3 settings.
pub fn forget_store() {
    STORE.with(|s| *s.borrow_mut() = None);
}

/// Sets the AWS variables of this thread's store on `cmd`, if it has one.
pub(crate) fn apply_store(cmd: &mut Command) {
    STORE.with(|s| {
        if let Some(s3) = &*s.borrow() {
            s3.apply(cmd);
        }
    });
}

/// The repository `s3://BUCKET/PREFIX` as the `&Path` the helpers of `common` take (a path may
/// hold any string; the binary parses it as a location).
pub fn repo_path(s3: &S3, prefix: &str) -> PathBuf {
    PathBuf::from(s3.url(prefix))
}
