//! Backup jobs: what to back up (VMs by name or glob, with exclusions), where (a repository), how
//! (a pipeline spec, with overrides of stage options) and when (cron schedules).
//!
//! # Layout
//! - [`file`]: the job file, read with positions in every error.

pub mod file;

pub use file::{Job, load, parse};
