//! Where a repository lives, as an operator writes it: a local path or `s3://BUCKET/PREFIX`.
//!
//! Anything that starts with a URL scheme of object storage (`s3:`, any case) is parsed as such and is an
//! error when it is malformed: an `s3://` URL is never taken for a relative local path (which would quietly
//! create a directory named `s3:` in the working directory).

use std::fmt;
use std::path::{Path, PathBuf};

/// A repository's location.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    Local(PathBuf),
    S3(S3Location),
}

/// `s3://BUCKET/PREFIX`: the endpoint, region and credentials come from the environment (see `s3.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
}

/// Why a location could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a repository location: {reason}")]
pub struct BadLocation {
    pub given: String,
    pub reason: String,
}

impl Location {
    /// Parses what an operator wrote (`--repo`, `BACKFLOW_REPOSITORY`, a spec's or a job's `repository`).
    pub fn parse(given: &str) -> Result<Location, BadLocation> {
        let bad = |reason: &str| BadLocation {
            given: given.to_owned(),
            reason: reason.to_owned(),
        };
        if given.is_empty() {
            return Err(bad("it is empty"));
        }
        let lower = given.to_ascii_lowercase();
        if !lower.starts_with("s3:") {
            return Ok(Location::Local(PathBuf::from(given)));
        }
        let Some(rest) = given.get(5..).filter(|_| lower.starts_with("s3://")) else {
            return Err(bad(
                "an S3 location is written s3://BUCKET or s3://BUCKET/PREFIX",
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket).map_err(|r| bad(&r))?;
        let prefix = prefix.trim_matches('/');
        for part in prefix.split('/').filter(|_| !prefix.is_empty()) {
            if part.is_empty() {
                return Err(bad("the prefix has an empty part (`//`)"));
            }
            if part == "." || part == ".." {
                return Err(bad("the prefix may not contain `.` or `..` parts"));
            }
            if part.chars().any(|c| c.is_control()) {
                return Err(bad("the prefix may not contain control characters"));
            }
        }
        Ok(Location::S3(S3Location {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        }))
    }

    /// The local directory, for a local repository.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::S3(_) => None,
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Location::Local(_))
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Location {
        Location::Local(p.to_owned())
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Location {
        Location::Local(p)
    }
}

impl std::str::FromStr for Location {
    type Err = BadLocation;
    fn from_str(s: &str) -> Result<Location, BadLocation> {
        Location::parse(s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(s) => write!(f, "{s}"),
        }
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// S3 bucket names: 3 to 63 characters of lowercase letters, digits, `.` and `-`, starting and ending with a
/// letter or digit.
fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket name is missing (s3://BUCKET/PREFIX)".into());
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err(format!(
            "bucket name {bucket:?} has {} characters; bucket names have 3 to 63",
            bucket.len()
        ));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if !bucket.chars().all(ok_char) {
        return Err(format!(
            "bucket name {bucket:?} may hold only lowercase letters, digits, `.` and `-`"
        ));
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge(bucket.chars().next()) || !edge(bucket.chars().last()) {
        return Err(format!(
            "bucket name {bucket:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_stay_paths() {
        for p in ["/srv/repo", "repo", "./s3", "s3", "my-s3://x"] {
            assert_eq!(
                Location::parse(p).unwrap(),
                Location::Local(p.into()),
                "{p}"
            );
        }
    }

    #[test]
    fn s3_urls() {
        let l = Location::parse("s3://backups/site-a/vm").unwrap();
        assert_eq!(
            l,
            Location::S3(S3Location {
                bucket: "backups".into(),
                prefix: "site-a/vm".into()
            })
        );
        assert_eq!(l.to_string(), "s3://backups/site-a/vm");
        let root = Location::parse("S3://backups/").unwrap();
        assert_eq!(root.to_string(), "s3://backups");
    }

    #[test]
    fn malformed_s3_urls_are_errors_not_paths() {
        for (given, needle) in [
            ("s3:/backups", "s3://BUCKET"),
            ("s3:backups", "s3://BUCKET"),
            ("s3://", "bucket name is missing"),
            ("s3://ab", "3 to 63"),
            ("s3://Backups", "lowercase"),
            ("s3://-backups", "start and end"),
            ("s3://backups/a//b", "empty part"),
            ("s3://backups/a/../b", "`..`"),
        ] {
            let e = Location::parse(given).unwrap_err();
            assert!(e.to_string().contains(needle), "{given}: {e}");
        }
    }
}
