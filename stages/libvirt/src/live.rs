//! A VM's libvirt handle that outlives a restart of libvirtd.
//!
//! A pull-mode backup job lives in QEMU, which exports the disks, and in libvirtd, which knows
//! the job. When libvirtd restarts (a package upgrade, an operator) QEMU keeps exporting, the new
//! daemon takes the job over from its state files (libvirt 9.0 does), and every client
//! connection breaks: the reads go on, but the calls that confirm the job ran throughout and then
//! end it need a new connection. [`LiveDomain::call`] makes one when a call fails for want of a
//! connection, finds the VM again by its UUID, and repeats the call once.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backflow_libvirt::{Connection, LibvirtError};
use virt::domain::Domain;

/// How long a broken connection is tried again before libvirt counts as gone: a restart takes
/// well under a second here, a few seconds on a busy host.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(15);

/// Pause between attempts to reconnect.
const RECONNECT_POLL: Duration = Duration::from_millis(100);

/// The VM, through whichever connection works (see the module docs).
#[derive(Debug)]
pub struct LiveDomain {
    /// As the spec gave it (`None`: libvirt's default).
    uri: Option<String>,
    uuid: String,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    domain: Domain,
    /// The error that showed the first connection broken, once one did.
    lost: Option<String>,
    /// No daemon answered within [`RECONNECT_WAIT`] once: later calls try once, without waiting,
    /// so that a cleanup after that does not wait again.
    gave_up: bool,
}

impl LiveDomain {
    /// `domain`, opened through `uri`, is the VM `uuid`.
    pub fn new(uri: Option<String>, uuid: &str, domain: Domain) -> LiveDomain {
        LiveDomain {
            uri,
            uuid: uuid.to_owned(),
            state: Mutex::new(State {
                domain,
                lost: None,
                gave_up: false,
            }),
        }
    }

    /// Runs `f` on the VM. When it fails because the connection broke (or no daemon answers),
    /// connects again (waiting at most [`RECONNECT_WAIT`] for a daemon, the first time) and runs
    /// `f` once more. Calls are serialised.
    pub fn call<T>(
        &self,
        f: impl Fn(&Domain) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let mut state = self.lock();
        match f(&state.domain) {
            Err(e) if e.is_retryable() => {
                if state.lost.is_none() {
                    tracing::warn!(uri = ?self.uri, "The connection to libvirt broke: {e}.");
                    state.lost = Some(e.to_string());
                }
                state.domain = self.reconnect(&mut state)?;
                tracing::info!(uri = ?self.uri, "Connected to libvirt again.");
                f(&state.domain)
            }
            other => other,
        }
    }

    /// Why the first connection broke, if it did: the run says so.
    pub fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// A new connection's handle of the VM.
    fn reconnect(&self, state: &mut State) -> Result<Domain, LibvirtError> {
        let deadline = Instant::now()
            + if state.gave_up {
                Duration::ZERO
            } else {
                RECONNECT_WAIT
            };
        loop {
            let found = Connection::open(self.uri.as_deref())
                .and_then(|conn| conn.domain_by_uuid(&self.uuid));
            match found {
                Ok(domain) => return Ok(domain),
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    std::thread::sleep(RECONNECT_POLL);
                }
                Err(e) => {
                    state.gave_up |= e.is_retryable();
                    return Err(e);
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
