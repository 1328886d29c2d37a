//! The `cleanup` finaliser: runs after the data stages whatever happened.
//!
//! Stages register what must be undone (stop a helper process, end a backup job, remove a partial
//! file) on the run context as they acquire it; the runtime runs those actions in reverse order
//! after this finaliser. The finaliser itself removes scratch directories that killed runs left in
//! the repository (their lock is free), so that a crash costs disk space only until the next run.

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_finaliser, option_docs,
};
use backflow_pipeline::{Finaliser, InvalidOption, Outcome, RunContext, StageError};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "cleanup";

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct CleanupOptions {
    /// Remove scratch directories that killed runs left in the repository.
    #[serde(default = "yes")]
    pub remove_stale_scratch: bool,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            remove_stale_scratch: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "finaliser: always runs after the data stages; runs the cleanup actions stages registered, removes scratch that killed runs left",
    input: None,
    output: None,
    repository: RepositoryUse::No,
    options: option_docs::<CleanupOptions>,
    build: Build::Finaliser(|options| build_finaliser(options, Cleanup::new)),
};

#[derive(Debug)]
pub struct Cleanup {
    options: CleanupOptions,
}

impl Cleanup {
    pub fn new(options: CleanupOptions) -> Result<Self, InvalidOption> {
        Ok(Cleanup { options })
    }
}

impl Finaliser for Cleanup {
    fn finalise(&self, ctx: &RunContext, outcome: &Outcome) -> Result<(), StageError> {
        tracing::debug!(?outcome, "Cleaning up.");
        if self.options.remove_stale_scratch
            && ctx.repository_location().is_some()
            && let Ok(repo) = ctx.repository()
        {
            let removed = repo.remove_stale_scratch()?;
            if removed > 0 {
                tracing::info!(removed, "Removed scratch directories of interrupted runs.");
            }
        }
        Ok(())
    }
}
