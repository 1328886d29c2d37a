//! The daemon's face: an HTTP API described by an OpenAPI document, Prometheus metrics and a web
//! console, served by `backflow daemon` (`--http ADDR:PORT`, default [`config::DEFAULT_LISTEN`]).
//!
//! What it shows is read where it lives: the jobs and their state from the daemon
//! ([`Control`]), sessions, restore points and repository usage from the jobs' repositories
//! (cached a few seconds, so that a page and a scrape do not read every session file each time),
//! and running pipelines from the registry their runs publish to
//! ([`backflow_pipeline::LivePipelines`]). What it does goes back to the daemon (run a job now,
//! enable, disable) or runs as a task of its own (verify, forget, restore, instant-restore of a
//! restore point: the `backflow` binary itself, as a child process), and every action is
//! recorded with who asked in the repository's session history.
//!
//! The server runs on a small tokio runtime of its own (two worker threads) beside the daemon's
//! job threads; every read of a repository runs on its blocking pool, never on the request
//! threads.
//!
//! # Layout
//! - [`config`]: address, TLS and tokens (the rules of who may connect).
//! - [`auth`]: who asks (token, browser session, local), roles, CSRF and Host checks.
//! - [`api`]: the JSON endpoints and the OpenAPI document.
//! - [`data`]: what the endpoints read from repositories and jobs, cached.
//! - [`tasks`]: actions on restore points, run as child processes and recorded.
//! - [`metrics`]: `/metrics` in Prometheus's text format.
//! - [`web`]: the console's pages and assets (compiled in).
//! - [`server`]: listening, TLS, and the runtime.

pub mod api;
pub mod auth;
pub mod config;
pub mod data;
pub mod metrics;
pub mod server;
pub mod tasks;
pub mod web;

use std::sync::Arc;

use backflow_jobs::Job;

pub use config::{DEFAULT_LISTEN, HttpOptions, Role};
pub use server::Console;

/// What the console asks of the daemon.
pub trait Control: Send + Sync + 'static {
    /// Every job, with its state now.
    fn jobs(&self) -> Vec<JobState>;
    /// Runs `job` now (`who` asked): it starts at the daemon's next check, or when its VMs are
    /// free.
    fn run_now(&self, job: &str, who: &str) -> Result<(), ControlError>;
    /// Enables or disables `job`'s schedule (`who` asked); kept across restarts.
    fn set_enabled(&self, job: &str, enabled: bool, who: &str) -> Result<(), ControlError>;
}

/// One job as the daemon sees it now.
#[derive(Clone, Debug)]
pub struct JobState {
    pub job: Arc<Job>,
    pub enabled: bool,
    pub running: bool,
    /// A run asked for and not started yet, and who asked.
    pub requested_by: Option<String>,
    /// Unix seconds of the next scheduled run (`None`: no schedule, or disabled).
    pub next_run: Option<i64>,
}

/// Why the daemon refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no job named {0}")]
    UnknownJob(String),
    #[error("job {0} is running already")]
    Running(String),
    #[error("the daemon is stopping")]
    Stopping,
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}
