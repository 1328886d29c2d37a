//! Instant recovery: a restore point running as a new VM within seconds, before its disks are
//! restored, then moved to standalone images while it runs.
//!
//! # How
//! 1. **Export.** `backflow serve` runs as a process of its own (its own process group, so that
//!    the command that started it can exit and a Ctrl-C on its terminal does not reach it) and
//!    exports every disk of the restore point read-only over NBD on a unix socket in the recovery's
//!    state directory. Every chunk it serves is checked against its digest; the repository is only
//!    read.
//! 2. **Overlays.** For every disk a qcow2 overlay in the state directory whose backing file is
//!    the disk's export (`nbd+unix:///DISK?socket=...`, format raw). The guest's writes go to the
//!    overlay; reads of what it has not written go to the export.
//! 3. **Domain.** The restore point's domain XML, rewritten as `restore-vm` rewrites it (new name,
//!    UUID and MACs; [`backflow_libvirt::new_definition`]) on the overlays, optionally without
//!    network interfaces and with the serial console logged to a file, is defined and started.
//!    The time from the start of [`start`] to a running domain is the RTO it reports.
//! 4. **Move** ([`finish`]). Every disk is mirrored into a standalone image (libvirt's block copy
//!    of the whole chain: [`backflow_libvirt::block_copy`]) while the guest runs and writes; when
//!    every copy is ready (QEMU writes each new guest write to both), each disk pivots to its image,
//!    which libvirt also writes into the persistent definition. Then the export stops and the
//!    overlays and the state directory go: the VM is independent of the repository.
//!
//! # State and failure
//! Each recovery has a state directory `STATE_ROOT/NAME/` ([`DEFAULT_STATE_ROOT`]): `state.json`
//! (what was started: the repository, restore point, disks, overlay paths, the domain's UUID, the
//! export's pid and start time, timings), the export's socket and log, the overlays, the console
//! log, and `lock` (`flock`ed by whichever command works on it). Everything a recovery makes is in
//! there or is the domain whose UUID it records, so:
//! - a failure at any step of [`start`] removes what the steps before it made: the domain (only
//!   the one this recovery defined, known by UUID), the export process (only the one it started,
//!   known by pid and start time), the overlays and the directory. The original VM is never
//!   looked at; the repository is never written.
//! - a failure during [`finish`] before a disk pivots cancels the copies and removes the images
//!   begun: the VM keeps running on its overlays and [`finish`] can be run again; a disk that has
//!   pivoted stays moved, and a second [`finish`] moves only the rest.
//! - [`discard`] ends a recovery at any stage: destroys and undefines its domain if it still runs
//!   on an overlay, stops the export, removes the directory. A recovery whose [`start`] was killed
//!   is listed by [`list`] and removed by [`discard`].
//!
//! # Permissions
//! QEMU runs as its own user (`libvirt-qemu`, group `kvm` on Debian): the state directory is made
//! group `kvm` with mode 0770 (QEMU creates the console's socket there) and the export's socket 0660, so that QEMU reaches the export and nobody else
//! on the host does. Without a `kvm` group (another distribution) both stay the process's own and
//! QEMU must run as the same user (`qemu:///session`), or the operator adapts `qemu.conf`.

mod server;
mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backflow_libvirt::{Connection, LibvirtError, RestoredDisk, block_copy, new_definition};
use tracing::{debug, info, warn};

pub use server::{ServeCommand, ServerProcess, is_running};
pub use state::{DiskState, InstantState, Phase, ServerRecord};

/// Where recoveries keep their state when the caller does not say (`--state-dir`).
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/backflow/instant";

/// How long the export may take to answer after its start (opening an S3 repository and its
/// index can take a while).
pub const SERVE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`finish`] waits for every copy to become ready before giving up (cancelling them).
pub const DEFAULT_MOVE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("instant recovery `{name}`: {message}")]
    Failed { name: String, message: String },
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = RecoveryError> = std::result::Result<T, E>;

fn failed(name: &str, message: impl Into<String>) -> RecoveryError {
    RecoveryError::Failed {
        name: name.to_owned(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A disk of the restore point to run.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// Its `<target dev>` in the backed-up definition and its export's name.
    pub target: String,
    /// Bytes.
    pub size: u64,
}

/// What [`start`] runs.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The new domain's name (must not exist; also the recovery's name).
    pub name: String,
    /// The libvirt connection of this host (the export's socket is local).
    pub uri: String,
    /// Where recoveries keep their state ([`DEFAULT_STATE_ROOT`]).
    pub state_root: PathBuf,
    /// How to start the export (the `backflow serve` command without `--listen`).
    pub serve: ServeCommand,
    /// For the record: the repository, as the operator wrote it.
    pub repository: String,
    /// The restore point's id (resolved) and the VM it belongs to.
    pub snapshot: String,
    pub vm: String,
    /// The restore point's disks (each is exported and runs on an overlay).
    pub disks: Vec<SourceDisk>,
    /// The backed-up domain XML of the restore point.
    pub domain_xml: String,
    /// Keep the network interfaces (with new MACs); false: none (an isolated copy).
    pub network: bool,
    /// Write the first serial console's output to `console.log` in the state directory.
    pub console_log: bool,
    /// The first serial port on a unix socket (`console.sock` in the state directory) instead of
    /// a pty: for a tool that drives the guest's console.
    pub console_socket: bool,
}

/// What [`start`] did, with its timings.
#[derive(Debug, Clone)]
pub struct Started {
    pub state: InstantState,
    pub dir: PathBuf,
    /// From the call of [`start`] to a running domain.
    pub rto: Duration,
    /// Each step and its duration, in order.
    pub steps: Vec<(&'static str, Duration)>,
    /// What the operator should know about the new definition (disks left out).
    pub notes: Vec<String>,
}

/// The state directory of recovery `name` under `root`.
pub fn state_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// A recovery's name is its domain's and its directory's: letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(failed(
            name,
            "expected a name of letters, digits, `.`, `_` and `-` (it names the new domain and a directory)",
        ))
    }
}

/// Starts the restore point as domain `request.name` on overlays of its export (see the crate root).
pub fn start(request: &StartRequest) -> Result<Started> {
    let began = Instant::now();
    let name = request.name.as_str();
    check_name(name)?;
    if request.disks.is_empty() {
        return Err(failed(name, "the restore point has no disks"));
    }
    let conn = Connection::open(Some(&request.uri))?;
    match conn.vm(name) {
        Ok(_) => {
            return Err(LibvirtError::VmExists {
                uri: conn.uri().to_owned(),
                name: name.to_owned(),
            }
            .into());
        }
        Err(LibvirtError::NoSuchVm { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = state_dir(&request.state_root, name);
    std::fs::create_dir_all(&request.state_root).map_err(io(&request.state_root))?;
    std::fs::create_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            failed(
                name,
                format!(
                    "{} exists: a recovery of that name is running or was left (`instant-restore list`, `instant-restore discard {name}`)",
                    dir.display()
                ),
            )
        } else {
            RecoveryError::Io {
                path: dir.clone(),
                source: e,
            }
        }
    })?;
    let lock = state::Lock::take(&dir)?;
    let mut undo = Undo {
        dir: dir.clone(),
        conn: &conn,
        uuid: None,
        server: None,
        armed: true,
    };
    // QEMU (group kvm) reads the overlays and creates the console's socket here.
    state::share_with_qemu(&dir, 0o770)?;
    let mut steps = Vec::new();
    let mut state = InstantState::new(request, &dir);
    state.save(&dir)?;

    // 1. The export.
    let t = Instant::now();
    let socket = dir.join(state::SOCKET);
    let server = request
        .serve
        .spawn(&socket, &dir.join(state::SERVE_LOG), SERVE_READY_TIMEOUT)
        .map_err(|message| failed(name, message))?;
    state::share_with_qemu(&socket, 0o660)?;
    state.server = Some(server.record());
    undo.server = Some(server);
    state.save(&dir)?;
    steps.push(("export", t.elapsed()));

    // 2. The overlays.
    let t = Instant::now();
    for disk in &request.disks {
        let overlay = dir.join(format!("{}.qcow2", disk.target));
        make_overlay(&overlay, &socket, &disk.target, disk.size)
            .map_err(|message| failed(name, message))?;
    }
    steps.push(("overlays", t.elapsed()));

    // 3. The domain.
    let t = Instant::now();
    let restored: Vec<RestoredDisk> = state
        .disks
        .iter()
        .map(|d| RestoredDisk {
            target: d.target.clone(),
            path: d.overlay.display().to_string(),
            format: "qcow2".into(),
        })
        .collect();
    let definition =
        new_definition(&request.domain_xml, name, &restored).map_err(LibvirtError::Definition)?;
    let mut xml = definition.xml;
    if !request.network {
        xml = backflow_libvirt::without_network(&xml).map_err(LibvirtError::Definition)?;
    }
    // The backed-up serial ports name the original's files and sockets: the copy gets its own.
    let log = dir.join(state::CONSOLE_LOG).display().to_string();
    let socket = dir.join(state::CONSOLE_SOCKET).display().to_string();
    let serial = backflow_libvirt::serial_element(
        request.console_socket.then_some(socket.as_str()),
        request.console_log.then_some(log.as_str()),
    );
    xml = backflow_libvirt::with_serial(&xml, &serial).map_err(LibvirtError::Definition)?;
    let defined = conn.define_vm(&xml)?;
    undo.uuid = Some(defined.uuid.clone());
    state.domain_uuid = Some(defined.uuid.clone());
    state.save(&dir)?;
    steps.push(("define", t.elapsed()));
    let t = Instant::now();
    conn.start_vm(name)?;
    steps.push(("start", t.elapsed()));
    let rto = began.elapsed();
    state.phase = Phase::Running;
    state.rto_ms = Some(rto.as_millis() as u64);
    state.save(&dir)?;
    undo.armed = false;
    // The export runs on after this process: nobody waits for it here (the caller may exit).
    if let Some(server) = undo.server.take() {
        server.release();
    }
    drop(lock);
    info!(
        name,
        rto_ms = rto.as_millis() as u64,
        "Restore point running as a VM."
    );
    Ok(Started {
        state,
        dir,
        rto,
        steps,
        notes: definition.notes,
    })
}

/// What a failed [`start`] removes (only what it made).
struct Undo<'a> {
    dir: PathBuf,
    conn: &'a Connection,
    uuid: Option<String>,
    server: Option<ServerProcess>,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(uuid) = &self.uuid {
            remove_domain(self.conn, uuid);
        }
        if let Some(server) = self.server.take() {
            server.stop();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            warn!(dir = %self.dir.display(), error = %e, "Cannot remove the recovery's directory.");
        }
    }
}

/// Destroys and undefines the domain with this UUID, if it exists.
fn remove_domain(conn: &Connection, uuid: &str) {
    let Ok(domain) = conn.domain_by_uuid(uuid) else {
        return;
    };
    if domain.is_active().unwrap_or(false)
        && let Err(e) = domain.destroy()
    {
        warn!(uuid, error = %e, "Cannot stop the recovery's domain.");
    }
    if let Err(e) = domain.undefine() {
        warn!(uuid, error = %e, "Cannot undefine the recovery's domain.");
    }
}

fn make_overlay(overlay: &Path, socket: &Path, export: &str, size: u64) -> Result<(), String> {
    let backing = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&backing)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create of the overlay {} on {backing} failed: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Every recovery under `root`, as its state file says, oldest first; a directory whose state
/// cannot be read is listed with the reason instead.
pub fn list(root: &Path) -> Result<Vec<Result<InstantState, (PathBuf, String)>>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        if !entry.path().is_dir() {
            continue;
        }
        found.push(InstantState::load(&entry.path()).map_err(|e| (entry.path(), e.to_string())));
    }
    found.sort_by_key(|s| match s {
        Ok(state) => (state.created, state.name.clone()),
        Err((path, _)) => (0, path.display().to_string()),
    });
    Ok(found)
}

/// Ends recovery `name` at whatever stage it is: its domain is destroyed and undefined if it still
/// runs on this recovery's overlays (a domain already moved by [`finish`] is the operator's VM and
/// stays), its export stops, its directory goes.
pub fn discard(root: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let dir = state_dir(root, name);
    if !dir.is_dir() {
        return Err(failed(
            name,
            format!("no recovery of that name in {}", root.display()),
        ));
    }
    let lock = state::Lock::take(&dir)?;
    let state = InstantState::load(&dir);
    if let Ok(state) = &state {
        let conn = Connection::open(Some(&state.uri))?;
        if let Some(uuid) = &state.domain_uuid
            && let Ok(domain) = conn.domain_by_uuid(uuid)
        {
            let xml = domain.xml_desc(0).unwrap_or_default();
            if uses_dir(&xml, &dir) {
                remove_domain(&conn, uuid);
            } else {
                info!(name, "The domain runs on its own images already: it stays.");
            }
        }
        if let Some(server) = &state.server {
            ServerProcess::stop_recorded(server);
        }
    }
    drop(lock);
    std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    Ok(())
}

/// Whether a domain XML has a disk on a file of the recovery directory `dir` (an overlay).
fn uses_dir(xml: &str, dir: &Path) -> bool {
    disk_sources(xml)
        .iter()
        .any(|source| source.starts_with(dir))
}

/// The sources of a domain XML's disks (none when it cannot be read).
fn disk_sources(xml: &str) -> Vec<PathBuf> {
    backflow_libvirt::parse_disks(xml)
        .map(|disks| {
            disks
                .iter()
                .map(|d| PathBuf::from(d.source.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// What [`finish`] did.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Each disk and its standalone image.
    pub disks: Vec<(String, PathBuf)>,
    /// From the call of [`finish`] to the last pivot (the VM independent of the repository).
    pub move_time: Duration,
    /// Bytes the copies moved.
    pub bytes: u64,
}

/// Moves every disk of running recovery `name` into a standalone image in `to`
/// (`NAME-DISK.FORMAT`), pivots, stops the export and removes the recovery's directory (see the
/// crate root for what a failure leaves). `progress` hears (bytes copied, bytes to copy) now and
/// then.
pub fn finish(
    root: &Path,
    name: &str,
    to: &Path,
    format: &str,
    timeout: Duration,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Finished> {
    let began = Instant::now();
    check_name(name)?;
    if format != "qcow2" && format != "raw" {
        return Err(failed(
            name,
            format!("expected the format qcow2 or raw, got `{format}`"),
        ));
    }
    let dir = state_dir(root, name);
    if !dir.is_dir() {
        return Err(failed(
            name,
            format!("no recovery of that name in {}", root.display()),
        ));
    }
    let lock = state::Lock::take(&dir)?;
    let mut state = InstantState::load(&dir)?;
    if state.phase == Phase::Starting {
        return Err(failed(
            name,
            "its start did not complete (killed?): discard it (`instant-restore discard`) and start again",
        ));
    }
    let to = std::path::absolute(to).map_err(io(to))?;
    if !to.is_dir() {
        return Err(failed(
            name,
            format!("{}: expected an existing directory", to.display()),
        ));
    }
    let conn = Connection::open(Some(&state.uri))?;
    let uuid = state
        .domain_uuid
        .clone()
        .ok_or_else(|| failed(name, "its state records no domain"))?;
    let domain = conn.domain_by_uuid(&uuid)?;
    if !domain.is_active().unwrap_or(false) {
        return Err(failed(
            name,
            "its VM is not running: start it (`virsh start`) and finish again; a disk moves while the VM runs",
        ));
    }
    // Disks still on their overlay (a disk a killed finish pivoted already is done).
    let live = domain.xml_desc(0).map_err(|cause| LibvirtError::Call {
        uri: state.uri.clone(),
        vm: Some(name.to_owned()),
        call: "virDomainGetXMLDesc",
        cause,
    })?;
    let sources = disk_sources(&live);
    let mut moving = Vec::new();
    let mut done = Vec::new();
    for disk in &state.disks {
        let dest = to.join(format!("{name}-{}.{format}", disk.target));
        if sources.contains(&disk.overlay) {
            if dest.exists() {
                return Err(failed(
                    name,
                    format!("{} exists: move or remove it first", dest.display()),
                ));
            }
            moving.push((disk.target.clone(), dest));
        } else {
            done.push((disk.target.clone(), dest));
        }
    }
    state.phase = Phase::Moving;
    state.save(&dir)?;

    let mut begun: Vec<(String, PathBuf)> = Vec::new();
    let result = (|| -> Result<u64> {
        for (target, dest) in &moving {
            block_copy::begin(&domain, target, &dest.display().to_string(), format)?;
            begun.push((target.clone(), dest.clone()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (mut cur, mut end, mut ready) = (0, 0, true);
            for (target, _) in &moving {
                if let Some((c, e)) = block_copy::progress(&domain, target)? {
                    cur += c;
                    end += e;
                }
                ready &= block_copy::mirror_ready(&domain, target)?;
            }
            progress(cur, end);
            if ready {
                break Ok(end);
            }
            if Instant::now() > deadline {
                return Err(failed(
                    name,
                    format!("the copies were not ready within {timeout:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(e) => {
            for (target, dest) in &begun {
                if let Err(c) = block_copy::cancel(&domain, target) {
                    warn!(name, disk = %target, error = %c, "Cannot cancel the copy.");
                }
                wait_job_gone(&domain, target);
                let _ = std::fs::remove_file(dest);
            }
            state.phase = Phase::Running;
            state.save(&dir)?;
            return Err(e);
        }
    };
    for (target, dest) in &moving {
        block_copy::pivot(&domain, target)?;
        debug!(name, disk = %target, dest = %dest.display(), "Pivoted.");
        done.push((target.clone(), dest.clone()));
    }
    // The pivots end asynchronously: wait until no disk is on the directory any more.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = domain.xml_desc(0).unwrap_or_default();
        if !uses_dir(&live, &dir) {
            break;
        }
        if Instant::now() > deadline {
            return Err(failed(
                name,
                "the disks pivoted but the VM still uses the recovery's directory after 60 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let move_time = began.elapsed();
    // The console's log and socket are in the directory about to go: the next boot gets a pty.
    let inactive = domain
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|cause| LibvirtError::Call {
            uri: state.uri.clone(),
            vm: Some(name.to_owned()),
            call: "virDomainGetXMLDesc(INACTIVE)",
            cause,
        })?;
    if inactive.contains(&format!("{}/", dir.display())) {
        let xml =
            backflow_libvirt::with_serial(&inactive, &backflow_libvirt::serial_element(None, None))
                .map_err(LibvirtError::Definition)?;
        conn.virt()
            .define_domain_xml(&xml)
            .map_err(|cause| LibvirtError::Call {
                uri: state.uri.clone(),
                vm: Some(name.to_owned()),
                call: "virDomainDefineXML",
                cause,
            })?;
    }
    if let Some(server) = &state.server {
        ServerProcess::stop_recorded(server);
    }
    drop(lock);
    std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    done.sort();
    info!(
        name,
        ms = move_time.as_millis() as u64,
        "The VM runs on its own images."
    );
    Ok(Finished {
        disks: done,
        move_time,
        bytes,
    })
}

fn wait_job_gone(domain: &virt::domain::Domain, target: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(block_copy::progress(domain, target), Ok(Some(_))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the serial console of the recovery in `dir` printed so far (its log), as text: terminal
/// escape sequences and other control characters removed.
pub fn console_output(dir: &Path) -> String {
    let bytes = std::fs::read(dir.join(state::CONSOLE_LOG)).unwrap_or_default();
    plain_text(&String::from_utf8_lossy(&bytes))
}

/// The last `lines` non-empty lines of [`console_output`], joined with ` | ` (for a message), or
/// `nothing`.
pub fn console_tail(dir: &Path, lines: usize) -> String {
    let text = console_output(dir);
    let all: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if all.is_empty() {
        return "nothing".into();
    }
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// `text` without terminal escape sequences (`ESC [ ... final`, `ESC x`) and control characters
/// other than newlines and tabs.
fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_text_loses_escape_sequences_and_controls() {
        assert_eq!(
            plain_text("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS\r\nNo bootable device.\u{7}"),
            "SeaBIOS\nNo bootable device."
        );
    }

    #[test]
    fn names_are_checked_before_anything_is_made() {
        for good in ["web01-copy", "a", "vm_1.restored"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "../x", "ä"] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("expected a name of letters"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_domain_uses_the_directory_when_a_disk_is_in_it() {
        let dir = Path::new("/var/lib/backflow/instant/web");
        let domain = |source: &str| {
            format!(
                "<domain><devices><disk type='file' device='disk'><driver type='qcow2'/>\
                 <source file='{source}'/><target dev='vda'/></disk>\
                 <serial type='pty'><log file='/var/lib/backflow/instant/web/console.log'/></serial>\
                 </devices></domain>"
            )
        };
        assert!(uses_dir(
            &domain("/var/lib/backflow/instant/web/vda.qcow2"),
            dir
        ));
        // The console log alone is not a use of the overlays.
        assert!(!uses_dir(
            &domain("/var/lib/backflow/instant/web2/vda.qcow2"),
            dir
        ));
        assert!(!uses_dir(&domain("/srv/web-vda.qcow2"), dir));
    }
}
