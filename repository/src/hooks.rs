//! What the test hooks share (only with the `test-hooks` feature, which no user's build has).

use tracing::warn;

/// Ends this process with SIGKILL at a test's chosen point, as a crash or `kill -9` would: no
/// destructor, no flush. `what` says where, in the log. (`kill(1)`: the crate has no unsafe code.)
pub(crate) fn kill_self(what: &str) {
    warn!(at = what, "Test hook: the process kills itself here.");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    // The signal is on its way; nothing after this point may run.
    std::thread::sleep(std::time::Duration::from_secs(10));
}
