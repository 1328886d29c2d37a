//! SIGINT and SIGTERM, from the first line of `main` to the exit.
//!
//! [`install`] runs first thing in `main`: from then on the default action (death by the signal) never
//! applies. Until the command says what a signal means, a signal is only counted. A command that runs a
//! pipeline (or jobs) hands over its cancel token with [`cancel_on_signals`]: a signal counted before
//! then cancels the token at once, so the run stops cleanly before it starts (exit 130); the first
//! signal after cancels it, a second exits at once (130), which is still safe since the repository is
//! valid at every moment. Every other command calls [`exit_on_signals`]: they can be killed at any
//! moment (gc, verify, forget are built for that), so a signal ends them with 130 right away.
//!
//! Before `main` the dynamic loader maps and relocates some fifty shared libraries (libvirt's among
//! them): a few milliseconds, tens on a loaded machine, in which nothing of ours has run and a signal
//! still kills the process by the default action, having done nothing.
//!
//! Handlers are installed with `signal-hook` (no signal is ever blocked, so the helper processes we
//! start, such as `qemu-nbd`, inherit no blocked mask and keep their own default actions: exec resets
//! handled signals to the default).

use std::sync::Mutex;

use backflow_pipeline::CancelToken;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Exit code of a run ended by a signal.
const EXIT_INTERRUPTED: i32 = 130;

/// What a signal does now.
enum Target {
    /// The command has not said yet: count it.
    Undecided,
    /// Cancel this run (the first signal); exit at the second.
    Cancel(CancelToken),
    /// Exit with 130 at once.
    Exit,
}

struct State {
    received: u32,
    target: Target,
}

static STATE: Mutex<State> = Mutex::new(State {
    received: 0,
    target: Target::Undecided,
});

/// Installs the handlers and the thread that acts on them. Call it first in `main`. When the handlers
/// cannot be installed the default actions stay, with a warning on stderr.
pub fn install() {
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("backflow: warning: cannot handle SIGINT and SIGTERM: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                received();
            }
        });
    if let Err(e) = spawned {
        eprintln!("backflow: warning: cannot start the signal thread: {e}");
    }
}

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn received() {
    let mut state = state();
    state.received += 1;
    act(&state);
}

/// Does what the signals received so far mean for the current target.
fn act(state: &State) {
    match &state.target {
        Target::Undecided => {}
        Target::Exit if state.received > 0 => std::process::exit(EXIT_INTERRUPTED),
        Target::Exit => {}
        Target::Cancel(_) if state.received > 1 => std::process::exit(EXIT_INTERRUPTED),
        Target::Cancel(token) if state.received == 1 && !token.is_cancelled() => {
            // Cancel first, and never panic on a closed stderr (a parent that started `serve` may
            // have closed its end of the pipe).
            token.cancel();
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\nbackflow: stopping (again to quit at once)..."
            );
        }
        Target::Cancel(_) => {}
    }
}

/// From now on the first SIGINT or SIGTERM cancels `cancel` (the pipeline stops, cleanup runs, nothing
/// is committed) and a second exits at once. A signal received earlier cancels it now.
pub fn cancel_on_signals(cancel: CancelToken) {
    let mut state = state();
    state.target = Target::Cancel(cancel);
    act(&state);
}

/// From now on a SIGINT or SIGTERM exits at once with 130; one received earlier does so now.
pub fn exit_on_signals() {
    let mut state = state();
    state.target = Target::Exit;
    act(&state);
}
