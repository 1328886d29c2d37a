//! Test hooks: moments a crash test needs to reach exactly (kill the process there, or act on the
//! VM there). Each is an environment variable naming a file; without the variable nothing happens.
//! They exist only with the `test-hooks` feature, which the cli's tests turn on (through their
//! dev-dependencies) and no user's build has: without it the functions below are empty and no
//! variable is read.

#[cfg(feature = "test-hooks")]
use std::path::PathBuf;
#[cfg(feature = "test-hooks")]
use std::sync::{Mutex, OnceLock, PoisonError};
#[cfg(feature = "test-hooks")]
use std::time::{Duration, Instant};

/// Whether this build has the hooks (the `test-hooks` feature): a cluster's controller then hands
/// the `BACKFLOW_PAUSE_*` variables on to its workers, so that a test can pause a worker's run.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// With `BACKFLOW_PAUSE_BEFORE_COMMIT=PATH` in the environment, the repository writer pauses once
/// every chunk is stored, before committing.
pub const PAUSE_BEFORE_COMMIT: &str = "BACKFLOW_PAUSE_BEFORE_COMMIT";

/// With `BACKFLOW_PAUSE_AFTER_SNAPSHOT=PATH` in the environment, a snapshot source pauses once its
/// point-in-time view exists, before anything is read from it.
pub const PAUSE_AFTER_SNAPSHOT: &str = "BACKFLOW_PAUSE_AFTER_SNAPSHOT";

/// With `BACKFLOW_PAUSE_MID_TRANSFER=PATH` in the environment, the reads of a source served over
/// NBD pause in the middle of the transfer: the first read to return pauses, and every other read
/// waits until that pause ends. Something was read and the rest is still to come, however many
/// readers there are: the moment to restart libvirtd, or to destroy the VM. Once per process.
pub const PAUSE_MID_TRANSFER: &str = "BACKFLOW_PAUSE_MID_TRANSFER";

/// The moment of [`PAUSE_MID_TRANSFER`], reached after every read of an NBD source. Without the
/// variable it costs one atomic load.
#[cfg(feature = "test-hooks")]
pub fn mid_transfer() {
    static GATE: OnceLock<Option<Mutex<bool>>> = OnceLock::new();
    let Some(gate) =
        GATE.get_or_init(|| std::env::var_os(PAUSE_MID_TRANSFER).map(|_| Mutex::new(false)))
    else {
        return;
    };
    // Held through the pause: the other readers wait here.
    let mut paused = gate.lock().unwrap_or_else(PoisonError::into_inner);
    if !*paused {
        *paused = true;
        pause_at(PAUSE_MID_TRANSFER, "mid-transfer");
    }
}

/// When the environment variable `var` names a file: creates it (saying `what`) and waits, at most
/// ten minutes, until someone removes it.
#[cfg(feature = "test-hooks")]
pub fn pause_at(var: &str, what: &str) {
    let Some(path) = std::env::var_os(var) else {
        return;
    };
    let path = PathBuf::from(path);
    if let Err(e) = std::fs::write(&path, format!("paused {what}\n")) {
        tracing::warn!(path = %path.display(), "Cannot create the pause file: {e}.");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn mid_transfer() {}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause_at(_var: &str, _what: &str) {}
