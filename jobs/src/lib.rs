//! Backup jobs: what to back up (VMs by name or glob, with exclusions, and image files, block
//! devices and qcow2 images), where (a repository), how (a pipeline spec, with overrides of stage
//! options) and when (cron schedules); or a health check, a garbage collection of a repository, or
//! a copy of restore points into it from another.
//!
//! # Layout
//! - [`file`](mod@file): the job file, read with positions in every error; [`Job::kind`] says what it does.
//! - [`select`]: which VMs and disks a job backs up, from a libvirt listing.
//! - [`run`]: one run of a job (a session): each VM and each image its own pipeline run,
//!   `parallel` at a time, recorded in the repository's session history.
//! - [`schedule`]: when jobs run: next cron times, the catch-up of a missed run, and which jobs
//!   may start now (one run per job, one backup per VM or image at a time); the clock is a
//!   parameter.
//! - [`validate`]: what can be checked of a job without running it (`backflow job validate`).
//! - [`copy`]: copy jobs, restore points copied from another repository into the job's.
//! - [`error`]: [`JobError`], what can go wrong around the pipelines.
//! - [`cluster_run`]: a backup job over a cluster: VMs found on every host, each backed up by a
//!   worker started over SSH on its own host or another, retried once elsewhere when it is lost.
//! - [`placement`]: which host's worker backs up which VM of a cluster, and why.
//! - [`worker`]: the worker protocol: one VM's task handed to `backflow worker` on a cluster's
//!   host, and the events it streams back.

pub mod cluster_run;
pub mod copy;
pub mod error;
pub mod file;
pub mod placement;
pub mod run;
pub mod schedule;
pub mod select;
pub mod validate;
pub mod verify_boot;
pub mod worker;

/// The mail reports, and their readable times and durations for the callers' own output.
pub use backflow_notify as notify;
pub use copy::{CopyJob, CopyRecord};
pub use error::JobError;
pub use file::{Freeze, GcJob, ImageFormat, ImageSource, Job, JobKind, Percent, load, parse};
pub use run::{
    ActionRecord, GcRecord, HealthCheckRecord, RunJobOptions, SessionRecord, Source, Verdict,
    VmRecord, run_job, sessions, sessions_in,
};
pub use verify_boot::{BootRecord, VerifyBootJob, VerifyBootRecord};
