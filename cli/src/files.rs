//! `files ls` and `files get`: list and extract files of a restore point's filesystems without
//! restoring its disk (docs/files.md).
//!
//! The disk is exported read-only over NBD on a unix socket ([`start_export`]); libguestfs's
//! appliance (a small Linux VM, driven through `guestfish --listen` and `guestfish --remote`) opens
//! the export, finds the partitions, LVM volumes and filesystems, and mounts the chosen one
//! read-only. The guest's filesystems are parsed by the appliance's kernel, never by the host's.
//!
//! A filesystem is named before the path, `FS:PATH`, where FS is the device as `files ls` without
//! a path lists it (`/dev/sda2`, `/dev/vg0/root`), or short: `sda2`, `2` (partition 2), `vg0/root`.
//! A disk with one filesystem needs no FS. Without a PATH, `files ls` lists the filesystems.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use backflow_pipeline::CancelToken;
use backflow_repository::Location;
use serde::Serialize;

use crate::{BadInput, Interrupted, open_repo, repo_location};

#[derive(clap::Subcommand)]
pub enum FilesCommand {
    /// List a path (a directory's entries) like `ls -l`: type and mode, uid, gid, size, mtime,
    /// path. Without PATH, the disk's filesystems.
    Ls(LsArgs),
    /// Extract a file, a symbolic link or a whole directory into --to DIR (DIR/NAME), with its
    /// owner, mode and times.
    Get(GetArgs),
}

#[derive(clap::Args)]
pub struct Source {
    #[command(flatten)]
    pub point: crate::PointArgs,
    /// The disk (needed when the restore point has several).
    #[arg(long)]
    pub disk: Option<String>,
}

#[derive(clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub source: Source,
    /// `[FS:]PATH`, absolute in the filesystem; FS as `files ls` without PATH lists them
    /// (`/dev/sda2`, `sda2`, `2`, `vg0/root`), needed when the disk has several.
    pub path: Option<String>,
    /// Recursive: every entry under a directory.
    #[arg(long, short = 'R')]
    pub recursive: bool,
    /// JSON: an array of entries (or of filesystems).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub source: Source,
    /// `[FS:]PATH` of a file, symbolic link or directory (as for `files ls`).
    pub path: String,
    /// The directory to extract into (made when missing): PATH's last component is made in it
    /// (the contents of `/` go into DIR itself).
    #[arg(long)]
    pub to: PathBuf,
    /// Replace what is there already (without it an existing target is refused).
    #[arg(long)]
    pub force: bool,
}

pub fn run(command: FilesCommand) -> Result<()> {
    match command {
        FilesCommand::Ls(args) => ls(args),
        FilesCommand::Get(args) => get(args),
    }
}

// ---------------------------------------------------------------------------------------------
// The export of a restore point's disk.
// ---------------------------------------------------------------------------------------------

/// A read-only NBD export of one disk of a restore point (`backflow serve` on a unix socket);
/// stopped (SIGTERM: it drops its repository registration and removes its socket) and cleaned up
/// when dropped.
pub struct Export {
    /// The unix socket of the NBD server.
    pub socket: PathBuf,
    /// The export's name: the disk's name.
    pub name: String,
    server: Child,
    _scratch: tempfile::TempDir,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.server.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let began = Instant::now();
        while matches!(self.server.try_wait(), Ok(None)) {
            if began.elapsed() > Duration::from_secs(10) {
                let _ = self.server.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.wait();
    }
}

/// Starts a read-only NBD export of a restore point's disk (`disk`, or its only one): `backflow
/// serve` (this binary), which reads the repository directly and checks every chunk; no disk is
/// restored anywhere.
pub fn start_export(
    location: &Location,
    snapshot: &str,
    vm: Option<&str>,
    disk: Option<&str>,
) -> Result<Export> {
    let repository = open_repo(location)?;
    let id = repository
        .resolve_snapshot(snapshot, vm)
        .map_err(|e| BadInput::new(e.to_string()))?;
    let disks: Vec<String> = repository
        .open_snapshot(&id)?
        .meta()
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    drop(repository);
    let name = match (disk, disks.as_slice()) {
        (Some(d), _) if disks.iter().any(|n| n == d) => d.to_owned(),
        (Some(d), _) => {
            return Err(BadInput::new(format!(
                "restore point {id} has no disk `{d}`; it has: {}",
                disks.join(", ")
            ))
            .into());
        }
        (None, [one]) => one.clone(),
        (None, []) => bail!("the restore point has no disk to read"),
        (None, many) => {
            return Err(BadInput::new(format!(
                "the restore point has {} disks ({}): name one with --disk",
                many.len(),
                many.join(", ")
            ))
            .into());
        }
    };
    let scratch = tempfile::Builder::new()
        .prefix("backflow-files-")
        .tempdir()
        .context("making a scratch directory for the export")?;
    let socket = scratch.path().join("nbd.sock");
    let mut serve = backflow_recovery::ServeCommand::of_restore_point(
        std::env::current_exe().context("the path of this program")?,
        location,
        &id,
    );
    serve.args.extend(["--disk".into(), name.clone().into()]);
    let mut command = serve.command(&socket);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut server = command.spawn().context("starting `backflow serve`")?;
    // Its one line on stdout says it accepts connections; end of file before it: it failed (and
    // said why on stderr, which is ours).
    let mut ready = String::new();
    let stdout = server.stdout.take().expect("piped");
    let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready);
    if read.is_err() || !ready.starts_with("listening ") {
        let status = server.wait()?;
        bail!("the export of {name} did not start ({status})");
    }
    Ok(Export {
        socket,
        name,
        server,
        _scratch: scratch,
    })
}

// ---------------------------------------------------------------------------------------------
// libguestfs, through guestfish --listen / --remote.
// ---------------------------------------------------------------------------------------------

/// A guestfish server (`guestfish --listen`) with the export added and the appliance launched.
/// Every command is sent with `guestfish --remote=PID -- -COMMAND ARGS`: the leading `-` keeps the
/// server alive when a command fails; its error is then read from the server's stderr, a file of
/// ours.
struct Guest {
    pid: i32,
    log: PathBuf,
    log_read: u64,
    _dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // `exit` closes the appliance; killing the server is the fallback (libguestfs's recovery
        // process then stops QEMU).
        let exited = Command::new("guestfish")
            .arg(format!("--remote={}", self.pid))
            .args(["--", "exit"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !exited {
            kill(self.pid);
        }
        // The server is not our child (it detached): wait until it is gone.
        let started = Instant::now();
        while alive(self.pid) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(self.pid) {
            kill(self.pid);
        }
    }
}

fn kill(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

fn alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
}

/// The pid of the running guestfish server, for the signal watcher to stop it.
static GUEST_PID: AtomicI32 = AtomicI32::new(0);

/// libguestfs's settings for this machine, unless the environment has them already: the `direct`
/// backend (QEMU started by libguestfs itself, which can open our unix socket), and TCG where KVM
/// is PVM (`kvm_pvm`), which boots only kernels built as PVM guests, not Debian's.
fn guestfs_env(cmd: &mut Command) {
    if std::env::var_os("LIBGUESTFS_BACKEND").is_none() {
        cmd.env("LIBGUESTFS_BACKEND", "direct");
    }
    if std::env::var_os("LIBGUESTFS_BACKEND_SETTINGS").is_none()
        && Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
        && !Path::new("/sys/module/kvm_amd").exists()
    {
        cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    }
}

/// libguestfs builds its appliance from the host's kernel: without one in /boot (and no
/// SUPERMIN_KERNEL) it fails late and obscurely, so say it first.
fn check_kernel() -> Result<()> {
    if std::env::var_os("SUPERMIN_KERNEL").is_some() {
        return Ok(());
    }
    let has_kernel = std::fs::read_dir("/boot").is_ok_and(|dir| {
        dir.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz"))
    });
    if has_kernel {
        Ok(())
    } else {
        Err(BadInput::new(
            "libguestfs needs a Linux kernel for its appliance and /boot has none: set \
             SUPERMIN_KERNEL, SUPERMIN_MODULES and SUPERMIN_KERNEL_VERSION (scripts/setup.sh \
             unpacks Debian's kernel and writes them into /opt/backflow-tools/kernel/current/env; \
             see docs/files.md)",
        )
        .into())
    }
}

impl Guest {
    /// Starts guestfish, adds the export read-only and launches the appliance.
    fn launch(export: &Export) -> Result<Guest> {
        check_kernel()?;
        let dir = tempfile::Builder::new()
            .prefix("backflow-guestfish-")
            .tempdir()
            .context("making a scratch directory for guestfish")?;
        let log = dir.path().join("guestfish.log");
        let mut cmd = Command::new("guestfish");
        cmd.arg("--listen")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        guestfs_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .context("starting guestfish (is libguestfs-tools installed?)")?;
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .context("reading guestfish's pid")?;
        child.wait()?;
        // GUESTFISH_PID=1234; export GUESTFISH_PID
        let pid = out
            .split(';')
            .next()
            .and_then(|s| s.trim().strip_prefix("GUESTFISH_PID="))
            .and_then(|s| s.parse::<i32>().ok())
            .ok_or_else(|| {
                anyhow!(
                    "guestfish --listen did not say its pid (it said {:?}; {})",
                    out.trim(),
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                )
            })?;
        GUEST_PID.store(pid, Ordering::SeqCst);
        let mut guest = Guest {
            pid,
            log,
            log_read: 0,
            _dir: dir,
        };
        guest.run(&[
            "add-drive-opts",
            &export.name,
            "protocol:nbd",
            &format!("server:unix:{}", export.socket.display()),
            "format:raw",
            "readonly:true",
        ])?;
        guest.run(&["run"]).map_err(|e| {
            if cancelled() {
                e
            } else {
                e.context("launching libguestfs's appliance")
            }
        })?;
        Ok(guest)
    }

    /// Runs one guestfish command; its stdout, or its error.
    fn run(&mut self, args: &[&str]) -> Result<String> {
        let out = self.run_bytes(args)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn run_bytes(&mut self, args: &[&str]) -> Result<Vec<u8>> {
        let mut command = Command::new("guestfish");
        command
            .arg(format!("--remote={}", self.pid))
            .arg("--")
            .arg(format!("-{}", args[0]))
            .args(&args[1..])
            .stdin(Stdio::null());
        let out = command.output().context("running guestfish --remote")?;
        self.check(args, &out)?;
        Ok(out.stdout)
    }

    /// Sends a command whose output goes to `to` (a host file or pipe: `download`, `tar-out`).
    fn run_into(&mut self, args: &[&str], to: impl Into<Stdio>) -> Result<()> {
        let out = Command::new("guestfish")
            .arg(format!("--remote={}", self.pid))
            .arg("--")
            .arg(format!("-{}", args[0]))
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(to)
            .stderr(Stdio::piped())
            .output()
            .context("running guestfish --remote")?;
        self.check(args, &out)
    }

    fn check(&mut self, args: &[&str], out: &std::process::Output) -> Result<()> {
        let mut log = File::open(&self.log)?;
        log.seek(SeekFrom::Start(self.log_read))?;
        let mut new = String::new();
        log.read_to_string(&mut new)?;
        self.log_read += new.len() as u64;
        let errors: Vec<&str> = new
            .lines()
            .filter_map(|l| l.strip_prefix("libguestfs: error: "))
            .collect();
        if cancelled() {
            return Err(Interrupted.into());
        }
        if !out.status.success() || !errors.is_empty() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = if errors.is_empty() {
                stderr.trim().to_owned()
            } else {
                errors.join("; ")
            };
            bail!("guestfish {}: {said}", args[0]);
        }
        Ok(())
    }

    /// The filesystems libguestfs finds (partitions, LVM volumes, a whole disk), without swap and
    /// what it cannot name.
    fn filesystems(&mut self) -> Result<Vec<Filesystem>> {
        let listed = self.run(&["list-filesystems"])?;
        let mut out = Vec::new();
        for line in listed.lines() {
            let Some((device, kind)) = line.rsplit_once(": ") else {
                continue;
            };
            if kind == "unknown" || kind == "swap" {
                continue;
            }
            let size = self
                .run(&["blockdev-getsize64", device])
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let label = self
                .run(&["vfs-label", device])
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            out.push(Filesystem {
                device: device.to_owned(),
                kind: kind.to_owned(),
                size,
                label,
            });
        }
        Ok(out)
    }

    fn exists(&mut self, path: &str) -> Result<bool> {
        Ok(self.run(&["exists", path])?.trim() == "true")
    }

    fn lstat(&mut self, path: &str) -> Result<Stat> {
        Stat::parse(&self.run(&["lstatns", path])?)
    }

    /// The names in a directory (not `.`, `..`), sorted.
    fn names(&mut self, dir: &str, scratch: &Path) -> Result<Vec<String>> {
        let list = scratch.join("names");
        self.run(&["ls0", dir, &list.display().to_string()])?;
        let bytes = std::fs::read(&list)?;
        let mut names: Vec<String> = bytes
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// `lstat` of every name in `dir`: in one `lstatnslist` for names guestfish's list syntax
    /// carries (split at white space), one by one for the others.
    fn lstat_all(&mut self, dir: &str, names: &[String]) -> Result<Vec<Stat>> {
        let plain = |n: &String| {
            !n.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        };
        let batch: Vec<&String> = names.iter().filter(|n| plain(n)).collect();
        let mut batched = Vec::new();
        for part in batch.chunks(500) {
            let list: Vec<&str> = part.iter().map(|s| s.as_str()).collect();
            let text = self.run(&["lstatnslist", dir, &list.join(" ")])?;
            batched.extend(Stat::parse_list(&text)?);
        }
        if batched.len() != batch.len() {
            bail!(
                "guestfish lstatnslist {dir}: {} entries for {} names",
                batched.len(),
                batch.len()
            );
        }
        let mut batched = batched.into_iter();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if plain(name) {
                out.push(batched.next().expect("counted"));
            } else {
                out.push(self.lstat(&join(dir, name))?);
            }
        }
        Ok(out)
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// A signal ended the command: the watcher stopped guestfish.
static CANCELLED: AtomicBool = AtomicBool::new(false);

fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// From now on SIGINT/SIGTERM stops the guestfish server (the command in flight then fails, and
/// everything is cleaned up on the way out, exit 130).
fn stop_on_signals() {
    let token = CancelToken::new();
    crate::signals::cancel_on_signals(token.clone());
    let token = Arc::new(token);
    let _ = std::thread::Builder::new()
        .name("files-signals".into())
        .spawn(move || {
            while !token.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
            CANCELLED.store(true, Ordering::SeqCst);
            let pid = GUEST_PID.load(Ordering::SeqCst);
            if pid > 0 {
                kill(pid);
            }
        });
}

#[derive(Serialize, Clone)]
struct Filesystem {
    device: String,
    #[serde(rename = "type")]
    kind: String,
    size: Option<u64>,
    label: String,
}

#[derive(Clone, Debug, Default)]
struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: i64,
}

impl Stat {
    fn parse(text: &str) -> Result<Stat> {
        let mut stat = Stat::default();
        let mut seen = 0;
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once(": ") else {
                continue;
            };
            let number = || -> Result<i64> {
                value
                    .parse::<i64>()
                    .with_context(|| format!("guestfish said {key}: {value:?}, not a number"))
            };
            match key {
                "st_mode" => stat.mode = number()? as u32,
                "st_uid" => stat.uid = number()? as u32,
                "st_gid" => stat.gid = number()? as u32,
                "st_size" => stat.size = number()? as u64,
                "st_mtime_sec" => stat.mtime = number()?,
                "st_mtime_nsec" => stat.mtime_nsec = number()?,
                "st_ino" => stat.ino = number()?,
                _ => continue,
            }
            seen += 1;
        }
        if seen < 7 {
            bail!("guestfish's stat output lacks fields: {text:?}");
        }
        Ok(stat)
    }

    fn parse_list(text: &str) -> Result<Vec<Stat>> {
        let mut out = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if line.starts_with('[') {
                current.clear();
            } else if line.starts_with('}') {
                out.push(Stat::parse(&current)?);
            } else {
                current.push_str(line);
                current.push('\n');
            }
        }
        Ok(out)
    }

    fn kind(&self) -> &'static str {
        match self.mode & 0o170000 {
            0o040000 => "directory",
            0o100000 => "file",
            0o120000 => "symlink",
            0o020000 => "char-device",
            0o060000 => "block-device",
            0o010000 => "fifo",
            0o140000 => "socket",
            _ => "unknown",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Naming a filesystem and a path.
// ---------------------------------------------------------------------------------------------

/// `[FS:]PATH` split: FS is what precedes the first `:` when the argument does not start with
/// `/`, or starts with `/dev/`; PATH must be absolute.
fn split_path(arg: &str) -> Result<(Option<&str>, &str)> {
    let (fs, path) = match arg.split_once(':') {
        Some((fs, path)) if !fs.starts_with('/') || fs.starts_with("/dev/") => (Some(fs), path),
        _ => (None, arg),
    };
    if !path.starts_with('/') {
        return Err(BadInput::new(format!(
            "{arg}: expected [FS:]PATH with PATH absolute in the filesystem (/etc/hosts, \
             sda2:/etc/hosts)"
        ))
        .into());
    }
    Ok((fs, path))
}

/// The filesystem a user's FS names, or the only one.
fn choose(filesystems: &[Filesystem], wanted: Option<&str>) -> Result<Filesystem> {
    let listing = || {
        filesystems
            .iter()
            .map(|f| format!("{} ({})", f.device, f.kind))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(wanted) = wanted else {
        return match filesystems {
            [one] => Ok(one.clone()),
            [] => Err(BadInput::new("the disk holds no filesystem libguestfs can read").into()),
            _ => Err(BadInput::new(format!(
                "the disk holds {} filesystems: name one before the path, FS:PATH, FS one of {} \
                 (or short: sda2, 2, vg/lv)",
                filesystems.len(),
                listing()
            ))
            .into()),
        };
    };
    let full = if wanted.starts_with("/dev/") {
        wanted.to_owned()
    } else if wanted.chars().all(|c| c.is_ascii_digit()) {
        format!("/dev/sda{wanted}")
    } else {
        format!("/dev/{wanted}")
    };
    filesystems
        .iter()
        .find(|f| f.device == full)
        .cloned()
        .ok_or_else(|| {
            BadInput::new(format!(
                "no filesystem {wanted} on the disk; it holds {}",
                if filesystems.is_empty() {
                    "none".to_owned()
                } else {
                    listing()
                }
            ))
            .into()
        })
}

/// The export started and the appliance launched on it; the appliance closed first when dropped.
struct Opened {
    guest: Guest,
    _export: Export,
}

/// As [`Opened`], with the filesystem of the user's `FS:` mounted read-only at `/`.
struct Session {
    guest: Guest,
    _export: Export,
    fs: Filesystem,
    scratch: tempfile::TempDir,
}

fn open(source: &Source) -> Result<Opened> {
    let location = repo_location(&source.point.repo)?;
    open_repo(&location)?;
    let export = start_export(
        &location,
        &source.point.snapshot,
        source.point.vm.as_deref(),
        source.disk.as_deref(),
    )?;
    stop_on_signals();
    let guest = Guest::launch(&export)?;
    Ok(Opened {
        guest,
        _export: export,
    })
}

fn mount(source: &Source, arg: &str) -> Result<(Session, String)> {
    let (wanted, path) = split_path(arg)?;
    let path = path.to_owned();
    let Opened {
        mut guest,
        _export: export,
    } = open(source)?;
    let filesystems = guest.filesystems()?;
    let fs = choose(&filesystems, wanted)?;
    guest
        .run(&["mount-ro", &fs.device, "/"])
        .with_context(|| format!("mounting {} ({})", fs.device, fs.kind))?;
    let scratch = tempfile::Builder::new()
        .prefix("backflow-files-")
        .tempdir()?;
    Ok((
        Session {
            guest,
            _export: export,
            fs,
            scratch,
        },
        path,
    ))
}

fn missing(fs: &Filesystem, path: &str) -> anyhow::Error {
    BadInput::new(format!("{}:{path}: no such file or directory", fs.device)).into()
}

// ---------------------------------------------------------------------------------------------
// ls
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Entry {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Seconds since the epoch.
    mtime: i64,
    mtime_nsec: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

fn ls(args: LsArgs) -> Result<()> {
    let Some(arg) = args.path.as_deref() else {
        let mut opened = open(&args.source)?;
        let filesystems = opened.guest.filesystems()?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&filesystems)?);
        } else {
            println!("{:<24} {:<8} {:>12}  LABEL", "FILESYSTEM", "TYPE", "SIZE");
            for f in &filesystems {
                let size = f.size.map(|s| s.to_string()).unwrap_or_default();
                println!("{:<24} {:<8} {:>12}  {}", f.device, f.kind, size, f.label);
            }
        }
        return Ok(());
    };
    let (mut session, path) = mount(&args.source, arg)?;
    let guest = &mut session.guest;
    if !guest.exists(&path)? {
        return Err(missing(&session.fs, &path));
    }
    let top = guest.lstat(&path)?;
    let mut entries = Vec::new();
    if top.kind() == "directory" {
        let mut dirs = vec![path.clone()];
        while let Some(dir) = dirs.pop() {
            let names = guest.names(&dir, session.scratch.path())?;
            let stats = guest.lstat_all(&dir, &names)?;
            let mut sub = Vec::new();
            for (name, stat) in names.iter().zip(stats) {
                let full = join(&dir, name);
                if args.recursive && stat.kind() == "directory" {
                    sub.push(full.clone());
                }
                entries.push(entry(guest, full, &stat)?);
            }
            // Depth first, in name order.
            dirs.extend(sub.into_iter().rev());
        }
        if args.recursive {
            entries.sort_by(|a, b| a.path.cmp(&b.path));
        }
    } else {
        entries.push(entry(guest, path.clone(), &top)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        let mut out = std::io::stdout().lock();
        for e in &entries {
            let target = e
                .target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            writeln!(
                out,
                "{}{} {:>5} {:>5} {:>12} {} {}{target}",
                type_char(e.kind),
                rwx(e.mode),
                e.uid,
                e.gid,
                e.size,
                time_text(e.mtime),
                e.path
            )?;
        }
    }
    Ok(())
}

fn entry(guest: &mut Guest, path: String, stat: &Stat) -> Result<Entry> {
    let target = if stat.kind() == "symlink" {
        Some(
            guest
                .run(&["readlink", &path])?
                .trim_end_matches('\n')
                .to_owned(),
        )
    } else {
        None
    };
    Ok(Entry {
        kind: stat.kind(),
        mode: stat.mode & 0o7777,
        uid: stat.uid,
        gid: stat.gid,
        size: stat.size,
        mtime: stat.mtime,
        mtime_nsec: stat.mtime_nsec,
        target,
        path,
    })
}

fn type_char(kind: &str) -> char {
    match kind {
        "directory" => 'd',
        "symlink" => 'l',
        "char-device" => 'c',
        "block-device" => 'b',
        "fifo" => 'p',
        "socket" => 's',
        _ => '-',
    }
}

/// `rwxr-xr-x`, with s/S and t/T as `ls` shows them.
fn rwx(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    for (shift, special, mark) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & special != 0, x) {
            (true, true) => mark,
            (true, false) => mark.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of seconds since the epoch.
fn time_text(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// get
// ---------------------------------------------------------------------------------------------

fn get(args: GetArgs) -> Result<()> {
    // Checked before the (slow) appliance starts.
    let (_, path) = split_path(&args.path)?;
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    let target = if name.is_empty() {
        args.to.clone()
    } else {
        args.to.join(name)
    };
    let occupied = if name.is_empty() {
        std::fs::read_dir(&args.to).is_ok_and(|mut d| d.next().is_some())
    } else {
        target.symlink_metadata().is_ok()
    };
    if occupied && !args.force {
        return Err(BadInput::new(format!(
            "{} exists; --force replaces what is there",
            target.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&args.to).with_context(|| format!("making {}", args.to.display()))?;
    let (mut session, path) = mount(&args.source, &args.path)?;
    let path = if path.len() > 1 {
        path.trim_end_matches('/').to_owned()
    } else {
        path
    };
    let guest = &mut session.guest;
    if !guest.exists(&path)? {
        return Err(missing(&session.fs, &path));
    }
    let stat = guest.lstat(&path)?;
    match stat.kind() {
        "directory" => {
            if occupied && target.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&target)?;
            }
            std::fs::create_dir_all(&target)?;
            // The appliance's tar, numeric owners, piped into the host's tar, which unpacks it
            // as it was written (owners, modes, times; directories' times after their contents).
            let mut tar = Command::new("tar")
                .args([
                    "-x",
                    "-p",
                    "--numeric-owner",
                    "--same-owner",
                    "-f",
                    "-",
                    "-C",
                ])
                .arg(&target)
                .stdin(Stdio::piped())
                .spawn()
                .context("running tar")?;
            let pipe = tar.stdin.take().expect("piped");
            let sent = guest.run_into(&["tar-out", &path, "-", "numericowner:true"], pipe);
            let status = tar.wait().context("waiting for tar")?;
            sent?;
            if !status.success() {
                bail!(
                    "tar could not unpack {path} into {} ({status})",
                    target.display()
                );
            }
        }
        "file" => {
            let part = args.to.join(format!(".{name}.backflow-part"));
            let downloaded = guest.run_into(&["download", &path, "-"], File::create(&part)?);
            if let Err(e) = downloaded {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            let written = std::fs::metadata(&part)?.len();
            if written != stat.size {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{path}: {written} bytes extracted, the filesystem says {}",
                    stat.size
                );
            }
            set_meta(&part, &stat, false)?;
            if target.is_dir() && !target.is_symlink() {
                std::fs::remove_dir_all(&target)?;
            }
            std::fs::rename(&part, &target)?;
        }
        "symlink" => {
            let link = guest.run(&["readlink", &path])?;
            let link = link.trim_end_matches('\n');
            if target.symlink_metadata().is_ok() {
                if target.is_dir() && !target.is_symlink() {
                    std::fs::remove_dir_all(&target)?;
                } else {
                    std::fs::remove_file(&target)?;
                }
            }
            std::os::unix::fs::symlink(link, &target)?;
            set_meta(&target, &stat, true)?;
        }
        other => {
            return Err(BadInput::new(format!(
                "{path} is a {other}: `files get` extracts files, symbolic links and \
                 directories (a directory's {other}s come with it)"
            ))
            .into());
        }
    }
    eprintln!("{}:{path} -> {}", session.fs.device, target.display());
    Ok(())
}

/// Owner, mode (not for a link) and times of what was extracted.
fn set_meta(path: &Path, stat: &Stat, link: bool) -> Result<()> {
    use rustix::fs::{AtFlags, CWD, Gid, Timespec, Timestamps, Uid};
    let flags = if link {
        AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::empty()
    };
    rustix::fs::chownat(
        CWD,
        path,
        Some(Uid::from_raw(stat.uid)),
        Some(Gid::from_raw(stat.gid)),
        flags,
    )
    .with_context(|| format!("setting the owner of {}", path.display()))?;
    if !link {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(stat.mode & 0o7777))?;
    }
    let time = Timespec {
        tv_sec: stat.mtime,
        tv_nsec: stat.mtime_nsec as _,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: time,
            last_modification: time,
        },
        flags,
    )
    .with_context(|| format!("setting the times of {}", path.display()))?;
    Ok(())
}
