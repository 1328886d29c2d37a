//! Backup jobs: what to back up (VMs by name or glob, with exclusions), where (a repository), how
//! (a pipeline spec, with overrides of stage options) and when (cron schedules).
//!
//! # Layout
//! - [`file`](mod@file): the job file, read with positions in every error.
//! - [`select`]: which VMs and disks a job backs up, from a libvirt listing.
//! - [`run`]: one run of a job (a session): each VM its own pipeline run, `parallel` at a time,
//!   recorded in the repository's session history.
//! - [`schedule`]: when jobs run: next cron times, the catch-up of a missed run, and which jobs
//!   may start now (one run per job, one backup per VM at a time); the clock is a parameter.

pub mod file;
pub mod run;
pub mod schedule;
pub mod select;

pub use file::{GcJob, Job, Percent, load, parse};
pub use run::{
    GcRecord, HealthCheckRecord, RunJobOptions, SessionRecord, Verdict, VmRecord, run_job, sessions,
};
