//! Throwaway libvirt domains on `qemu:///system` for tests: qcow2 disks, no OS, no NIC, no
//! graphics. SeaBIOS idles at "No bootable device", which is all a backup test needs; guest
//! writes are simulated through QEMU's monitor.
//!
//! Tests that use these need a libvirtd answering at `qemu:///system` (`scripts/setup.sh` starts
//! one) and `virsh` and `qemu-img` on the PATH; they fail, never skip, when one is missing. A test
//! that stops or restarts libvirtd runs its domains on a daemon of its own instead
//! ([`crate::libvirtd::PrivateLibvirtd`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::qemu::{make_qcow2, run_command};

/// The connection every fixture uses: libvirt's system QEMU driver, as root.
pub const URI: &str = "qemu:///system";

/// Memory of a fixture domain: enough for SeaBIOS, small enough for many at once.
const MEMORY_MIB: u32 = 64;

/// Makes fixture names unique within one test process (the pid makes them unique across).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where the system daemon keeps the pid files of its domains' QEMU processes.
const SYSTEM_QEMU_RUN_DIR: &str = "/run/libvirt/qemu";

/// Runs `virsh -c qemu:///system` with `args`; panics with its output when it fails. Returns
/// its stdout.
pub fn virsh(args: &[&str]) -> String {
    virsh_on(URI, args)
}

/// Runs `virsh -c URI` with `args`; panics with its output when it fails. Returns its stdout.
pub fn virsh_on(uri: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(
        &run_command(Command::new("virsh").arg("-c").arg(uri).args(args)).stdout,
    )
    .into_owned()
}

/// The names of every domain on [`URI`], running or not.
pub fn domain_names() -> Vec<String> {
    virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A running domain, destroyed and undefined (with its disks removed) when dropped.
pub struct Domain {
    name: String,
    /// The daemon the domain runs on.
    uri: String,
    /// Where that daemon keeps its domains' QEMU pid files.
    run_dir: PathBuf,
    /// Holds the disk images; removed on drop, after the domain.
    dir: tempfile::TempDir,
    /// Target (`vda`) and image path of each disk, in the order given.
    disks: Vec<(String, PathBuf)>,
    /// The QEMU process, read once the domain started, so that it can be checked after drop.
    pid: u32,
}

impl Domain {
    /// Defines and starts a domain named `PREFIX-PID-N` with one qcow2 virtio disk per
    /// `(target, size)` (`("vda", "64M")`: size in `qemu-img` syntax). KVM when `/dev/kvm`
    /// exists, and plain emulation (TCG) when it does not or the KVM domain fails to start.
    pub fn start(name_prefix: &str, disks: &[(&str, &str)]) -> Domain {
        Self::start_on(URI, Path::new(SYSTEM_QEMU_RUN_DIR), name_prefix, disks)
    }

    /// [`Domain::start`] on the daemon at `uri`, which keeps its QEMU pid files in `run_dir`.
    pub fn start_on(
        uri: &str,
        run_dir: &Path,
        name_prefix: &str,
        disks: &[(&str, &str)],
    ) -> Domain {
        let name = format!(
            "{name_prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .unwrap();
        // QEMU runs as libvirt-qemu (Debian's default); libvirt chowns the images themselves
        // (dynamic_ownership) but not their directory, which must let that user through.
        make_traversable(dir.path());
        let disks: Vec<(String, PathBuf)> = disks
            .iter()
            .map(|(target, size)| {
                let path = dir.path().join(format!("{target}.qcow2"));
                make_qcow2(&path, size, &[]);
                ((*target).to_owned(), path)
            })
            .collect();
        let mut domain = Domain {
            name,
            uri: uri.to_owned(),
            run_dir: run_dir.to_owned(),
            dir,
            disks,
            pid: 0,
        };
        let kvm = Path::new("/dev/kvm").exists();
        let started = if kvm {
            domain.define_and_start("kvm").or_else(|e| {
                domain.undefine();
                domain
                    .define_and_start("qemu")
                    .map_err(|f| format!("{e}\n{f}"))
            })
        } else {
            domain.define_and_start("qemu")
        };
        if let Err(e) = started {
            panic!("domain {} does not start: {e}", domain.name);
        }
        domain.pid = domain
            .qemu_pid()
            .unwrap_or_else(|| panic!("domain {} runs but has no QEMU pid", domain.name));
        domain
    }

    /// `count` domains of [`Domain::start`]`(name_prefix, disks)`, and the glob (`PREFIX-PID-*`)
    /// that selects them and no other test process's.
    pub fn start_many(
        name_prefix: &str,
        count: usize,
        disks: &[(&str, &str)],
    ) -> (Vec<Domain>, String) {
        let vms: Vec<Domain> = (0..count)
            .map(|_| Domain::start(name_prefix, disks))
            .collect();
        let glob = format!("{name_prefix}-{}-*", std::process::id());
        (vms, glob)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URI of the daemon the domain runs on.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `virsh` with `args` on the domain's daemon; panics when it fails.
    pub fn virsh(&self, args: &[&str]) -> String {
        virsh_on(&self.uri, args)
    }

    /// `virsh` with `args` on the domain's daemon; its stdout, or an error with its output.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        try_virsh_on(&self.uri, args)
    }

    /// The image of disk `target`.
    pub fn disk(&self, target: &str) -> &Path {
        self.disks
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| panic!("domain {} has no disk {target}", self.name))
    }

    /// The directory holding the disk images.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the `qemu-io` `command` (such as `write -P 0xab 0 1M`) through disk `target`'s guest
    /// device, as a guest write would: dirty bitmaps and backup jobs see it. Then flushes the
    /// device, so that the image file shows the write (QEMU keeps qcow2 metadata in memory until
    /// a flush). Panics when the monitor replies anything (an HMP error still exits 0; qemu-io's
    /// own output goes to the domain's log).
    pub fn guest_write(&self, target: &str, command: &str) {
        self.monitor_qemu_io(target, command);
        self.monitor_qemu_io(target, "flush");
    }

    /// Runs one `qemu-io` command through disk `target`'s guest device (see [`Domain::guest_write`]).
    fn monitor_qemu_io(&self, target: &str, command: &str) {
        assert!(
            !command.contains('"'),
            "a qemu-io command in HMP cannot hold a double quote: {command}"
        );
        let index = self
            .disks
            .iter()
            .position(|(t, _)| t == target)
            .unwrap_or_else(|| panic!("domain {} has no disk {target}", self.name));
        // libvirt names the device of the n-th virtio disk virtio-disk<n> (by its target letter).
        let alias = format!("virtio-disk{}", virtio_index(&self.disks[index].0));
        let hmp = format!("qemu-io -d /machine/peripheral/{alias}/virtio-backend \"{command}\"");
        let reply = self.virsh(&["qemu-monitor-command", &self.name, "--hmp", &hmp]);
        assert!(
            reply.trim().is_empty(),
            "{hmp} on domain {} failed: {reply}",
            self.name
        );
    }

    /// Adds a qcow2 virtio disk `target` of `size` to the running domain and to its definition
    /// (`virsh attach-disk --persistent`).
    pub fn attach_disk(&mut self, target: &str, size: &str) {
        let path = self.dir.path().join(format!("{target}.qcow2"));
        make_qcow2(&path, size, &[]);
        let source = path.to_str().unwrap().to_owned();
        self.virsh(&[
            "attach-disk",
            &self.name,
            &source,
            target,
            "--driver",
            "qemu",
            "--subdriver",
            "qcow2",
            "--targetbus",
            "virtio",
            "--persistent",
        ]);
        self.disks.push((target.to_owned(), path));
    }

    /// Stops the domain at once (`virsh destroy`: QEMU gets SIGTERM, as at a host shutdown).
    pub fn destroy(&self) {
        self.virsh(&["destroy", &self.name]);
    }

    /// Starts the (shut-off) domain again.
    pub fn start_again(&mut self) {
        self.virsh(&["start", &self.name]);
        self.pid = self
            .qemu_pid()
            .unwrap_or_else(|| panic!("domain {} runs but has no QEMU pid", self.name));
    }

    /// The names of the domain's checkpoints, sorted.
    pub fn checkpoints(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// Whether a backup job runs on the domain (`virsh backup-dumpxml` answers).
    pub fn has_backup_job(&self) -> bool {
        self.try_virsh(&["backup-dumpxml", &self.name]).is_ok()
    }

    /// A raw copy of disk `target` as it is now (`qemu-img convert -U`: QEMU holds the image's
    /// lock; guest writes through [`Domain::guest_write`] are flushed, so the file is complete).
    pub fn copy_disk(&self, target: &str, to: &Path) {
        crate::qemu::run_command(
            Command::new("qemu-img")
                .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
                .arg(self.disk(target))
                .arg(to),
        );
    }

    /// The pid of the domain's QEMU process, from libvirt's pid file (none once it stopped).
    pub fn qemu_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.run_dir.join(format!("{}.pid", self.name)))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The pid QEMU had when the domain started: still known after drop, for leftover checks.
    pub fn started_pid(&self) -> u32 {
        self.pid
    }

    fn define_and_start(&self, kind: &str) -> Result<(), String> {
        let xml = self.dir.path().join(format!("domain-{kind}.xml"));
        std::fs::write(&xml, self.xml(kind)).unwrap();
        let xml = xml.to_str().unwrap();
        self.try_virsh(&["define", xml])?;
        self.try_virsh(&["start", &self.name]).map(drop)
    }

    fn xml(&self, kind: &str) -> String {
        let disks: String = self
            .disks
            .iter()
            .map(|(target, path)| {
                format!(
                    "    <disk type='file' device='disk'>\n      \
                     <driver name='qemu' type='qcow2'/>\n      \
                     <source file='{}'/>\n      \
                     <target dev='{target}' bus='virtio'/>\n    </disk>\n",
                    path.display()
                )
            })
            .collect();
        // No <cpu>: host-model and host-passthrough abort QEMU here ("failed to set MSR").
        // ACPI: without it the PCI bus takes no hot-plugged disks (attach_disk).
        format!(
            "<domain type='{kind}'>\n  <name>{name}</name>\n  \
             <memory unit='MiB'>{MEMORY_MIB}</memory>\n  <vcpu>1</vcpu>\n  \
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  \
             <features><acpi/></features>\n  \
             <on_crash>destroy</on_crash>\n  <devices>\n{disks}    \
             <memballoon model='none'/>\n  </devices>\n</domain>\n",
            name = self.name
        )
    }

    /// Kills the domain's QEMU when its daemon cannot (a test failed while its private daemon
    /// was stopped): only the process started for this domain, recognised by its command line.
    fn kill_qemu(&self) {
        let ours = std::fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|cmdline| {
            let needle = format!("guest={},", self.name);
            cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        });
        if ours && crate::qemu::live(self.pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
    }

    fn undefine(&self) {
        // Checkpoints a test created would make a plain undefine fail.
        let _ = self
            .try_virsh(&["undefine", &self.name, "--checkpoints-metadata"])
            .or_else(|_| self.try_virsh(&["undefine", &self.name]));
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if self.try_virsh(&["destroy", &self.name]).is_err() {
            self.kill_qemu();
        }
        self.undefine();
        // QEMU's log of the domain is kept when the test failed, for the post-mortem.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{}.log", self.name));
        }
        // The TempDir removes the images next.
    }
}

/// Runs `virsh` with `args`; its stdout, or an error naming the command with its output.
pub fn try_virsh(args: &[&str]) -> Result<String, String> {
    try_virsh_on(URI, args)
}

/// Runs `virsh -c URI` with `args`; its stdout, or an error naming the command with its output.
pub fn try_virsh_on(uri: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("virsh is required for these tests: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {} ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The index libvirt puts in a virtio disk's alias: `vda` is 0, `vdb` 1, `vdaa` 26.
fn virtio_index(target: &str) -> u32 {
    target
        .strip_prefix("vd")
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase()))
        .unwrap_or_else(|| panic!("{target} is not a virtio disk target"))
        .bytes()
        .fold(0, |n, b| n * 26 + u32::from(b - b'a') + 1)
        - 1
}

/// Lets QEMU (user `libvirt-qemu`) through `dir`: mode 0755. libvirt chowns the images it is
/// given, not the directories above them.
pub fn make_traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[cfg(test)]
mod tests {
    use super::virtio_index;

    #[test]
    fn virtio_aliases_follow_the_target_letters() {
        assert_eq!(virtio_index("vda"), 0);
        assert_eq!(virtio_index("vdb"), 1);
        assert_eq!(virtio_index("vdz"), 25);
        assert_eq!(virtio_index("vdaa"), 26);
    }
}
