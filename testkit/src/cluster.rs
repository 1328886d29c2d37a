//! The cluster lab of issue 14 for tests: three KVM hosts on this one machine, made and removed by
//! `scripts/cluster.sh` (docs/cluster-lab.md describes the lab; this module drives it).
//!
//! ```text
//! let lab = Lab::start();                                  // or Lab::up(dir)
//! lab.apply(&mut Command::new(backflow))                   // the AWS variables of its Garage
//!     .args(["job", "run"]).arg(lab.job_file());
//! lab.write_in_vm(&lab.vms()[0].name, 1 << 20, 65536, 0xab);  // a guest write, bitmaps see it
//! lab.cut_network("h2");                                   // h2's cable pulled
//! lab.stop_host("h3");                                     // h3's libvirtd and sshd stopped
//! lab.migrate(&lab.vms()[1].name, "h2");                   // live, h1 to h2
//! lab.pids_on("h1", "backflow worker");                    // the workers running on h1
//! let out = lab.run_on("h1", "virsh -c qemu:///system list --name");  // as h1 sees it
//! ```
//!
//! # What a host is
//! A host is a network namespace `bf-LAB-hN` at `SUBNET.1N` on a bridge (in a namespace of its
//! own, `bf-LAB-hub`), with a mount and a UTS namespace of its own (persistent: bind mounts of
//! `DIR/ns/hN.mnt` and `.uts`) in which libvirt's directories are private directories under
//! `DIR/hosts/hN` and the host name is `hN`. Its virtlogd, libvirtd and sshd run in those three
//! namespaces, and so does everything [`Lab::run_on`] runs: a command there talks to that host's
//! libvirtd at `qemu:///system`, as a command run over ssh on a real host would. The controller
//! (the test process) stays in the root namespace and reaches hosts through their addresses only:
//! libvirt at [`Host::uri`], ssh at [`Host::address`], Garage at `SUBNET.20`.
//!
//! # Ids and clean-up
//! Every lab has an id ([`Lab::id`]: the pid and a counter, so that labs of concurrent test
//! processes and threads never meet) that names its namespaces, its interface in the root
//! namespace (`bf-LAB-up`) and its VMs (`bf-LAB-vm1..4`). Dropping a lab runs `cluster.sh down`,
//! which stops everything the lab started by pid, removes its namespaces, links, mounts and
//! directory; a reaper (see [`crate::s3`]) runs it too when the test process dies without
//! dropping the lab. [`Footprint`] lists what a lab made, to check that nothing of it is left.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::qemu::run_command;
use crate::s3::Reaper;

/// Makes lab ids unique within one test process (the pid makes them unique across processes).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The bucket and prefix of the lab's repository (as `scripts/cluster.sh` makes them).
const REPOSITORY: &str = "s3://backflow/lab";

/// How long a command over ssh waits for the TCP connection: a host whose network is cut must
/// fail a check in seconds, not after the kernel's two minutes.
const SSH_CONNECT_TIMEOUT_SECS: u32 = 5;

/// How many lines of each log a failed test shows.
const LOG_LINES: usize = 15;

/// One host of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `h1`, `h2`, `h3`: its name in the cluster file, and its host name (`hostname`).
    pub name: String,
    /// Where the controller and the other hosts reach it (ssh on port 22, NBD).
    pub address: Ipv4Addr,
    /// Its network namespace (`ip netns`).
    pub netns: String,
    /// Its libvirt as the controller reaches it:
    /// `qemu+ssh://root@ADDRESS/system?keyfile=KEY&no_verify=1&no_tty=1`.
    pub uri: String,
}

/// One VM of the lab, as `up` made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// `bf-LAB-vmN`.
    pub name: String,
    /// The host it was defined and started on (it may have moved since: [`Lab::vm_host`]).
    pub host: String,
    /// Its one disk (`vda`, qcow2, 64 MiB), in `DIR/shared`, which every host sees.
    pub disk: PathBuf,
}

impl Vm {
    /// The bytes `up` wrote on VM number `n` (1-based): `(offset, length, byte)`; zeros
    /// elsewhere. Distinct per VM, so that no chunk of one VM deduplicates against another's.
    pub fn known_data(n: u8) -> [(u64, u64, u8); 3] {
        [
            (0, 1 << 20, n << 4 | 1),
            (8 << 20, 256 << 10, n << 4 | 2),
            (40 << 20, 2 << 20, n << 4 | 3),
        ]
    }
}

/// A running lab; removed (`cluster.sh down`) when dropped.
pub struct Lab {
    dir: PathBuf,
    id: String,
    subnet: [u8; 3],
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    env: Vec<(String, String)>,
    down: bool,
    /// Declared last: runs `down` if this process dies before the lab is dropped.
    _reaper: Reaper,
}

impl Lab {
    /// A lab in `/tmp/bf-lab-ID` (see [`Lab::up`]).
    pub fn start() -> Lab {
        let id = next_id();
        Lab::up_as(
            &std::env::temp_dir().join(format!("bf-lab-{id}")),
            &id,
            None,
        )
    }

    /// Makes a lab in `dir` (new, or an empty directory; QEMU's user must be able to walk into
    /// it, as under /tmp), running the hosts' workers as this workspace's
    /// `target/release/backflow`. Waits for a background build of Garage (see [`crate::s3`]).
    /// Panics with the script's output when `up` fails, after removing what it made.
    pub fn up(dir: &Path) -> Lab {
        Lab::up_as(dir, &next_id(), None)
    }

    /// [`Lab::up`] with `backflow` as the binary the cluster file names for the hosts.
    pub fn up_with_backflow(dir: &Path, backflow: &Path) -> Lab {
        Lab::up_as(dir, &next_id(), Some(backflow))
    }

    fn up_as(dir: &Path, id: &str, backflow: Option<&Path>) -> Lab {
        let garage = crate::s3::tool("garage");
        // Only ever the lab this call made: `up` refuses a directory in use, which may be
        // another lab's.
        let reaper = Reaper::spawn(
            "grep -qx \"LAB=$3\" \"$2/lab\" 2>/dev/null && bash \"$1\" down \"$2\"",
            &[script().as_os_str(), dir.as_os_str(), id.as_ref()],
        );
        let mut command = Command::new("bash");
        command
            .arg(script())
            .arg("up")
            .arg(dir)
            .env("LAB", id)
            .env("GARAGE", &garage);
        if let Some(backflow) = backflow {
            command.env("BACKFLOW", backflow);
        }
        let out = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash: {e}"));
        if !out.status.success() {
            let logs = log_tails(dir);
            let ours = std::fs::read_to_string(dir.join("lab"))
                .is_ok_and(|l| l.lines().any(|l| l == format!("LAB={id}")));
            let down = ours.then(|| {
                Command::new("bash")
                    .arg(script())
                    .arg("down")
                    .arg(dir)
                    .output()
                    .map(|o| o.status)
            });
            panic!(
                "cluster.sh up {} failed ({}):\n{}{}\n{logs}\ndown afterwards: {down:?}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        let dir = dir.canonicalize().unwrap();
        let state = read_state(&dir.join("lab"));
        let value = |key: &str| {
            state
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{}/lab has no {key}", dir.display()))
        };
        let subnet = parse_subnet(&value("SUBNET"));
        let id = value("LAB");
        let key = dir.join("ssh/id_ed25519");
        let hosts = (1..=3u8)
            .map(|n| {
                let address = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 10 + n);
                Host {
                    name: format!("h{n}"),
                    address,
                    netns: format!("bf-{id}-h{n}"),
                    uri: format!(
                        "qemu+ssh://root@{address}/system?keyfile={}&no_verify=1&no_tty=1",
                        key.display()
                    ),
                }
            })
            .collect();
        let vms = std::fs::read_to_string(dir.join("vms"))
            .unwrap()
            .lines()
            .map(|line| {
                let mut fields = line.splitn(3, ' ');
                let mut field = || fields.next().expect("vms: NAME HOST DISK").to_owned();
                Vm {
                    name: field(),
                    host: field(),
                    disk: PathBuf::from(field()),
                }
            })
            .collect();
        let env = read_state(&dir.join("env"));
        Lab {
            dir,
            id,
            subnet,
            hosts,
            vms,
            env,
            down: false,
            _reaper: reaper,
        }
    }

    /// The lab's id (`LAB` in every name it made).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lab's directory (docs/cluster-lab.md describes its layout).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The three hosts, `h1` to `h3`.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("lab {} has no host {name}", self.id))
    }

    /// The VMs: `bf-LAB-vm1` and `vm2` on h1, `vm3` on h2, `vm4` on h3, then those of
    /// [`Lab::add_vm`].
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> &Vm {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("lab {} has no VM {name}", self.id))
    }

    /// `DIR/cluster.yaml`: the lab's hosts, as the controller reaches them.
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    /// `DIR/job.yaml`: a job backing up every VM of the cluster into [`Lab::repository`].
    pub fn job_file(&self) -> PathBuf {
        self.dir.join("job.yaml")
    }

    /// The repository of the job (initialised by `up` when the backflow binary existed).
    pub fn repository(&self) -> &'static str {
        REPOSITORY
    }

    /// The AWS variables that reach the lab's Garage (`DIR/env`).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Sets [`Lab::env`] on `command`.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.envs(self.env.iter().map(|(k, v)| (k, v)))
    }

    /// The controller's ssh key (authorised on every host).
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.join("ssh/id_ed25519")
    }

    /// The client side's certificates for NBD with TLS, in the layout QEMU's tls-creds-x509
    /// and libnbd's `tls-certificates` want: `ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`. Host `h`'s server side is in `pki_dir()/h`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Where Garage listens (`SUBNET.20`).
    pub fn store_address(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 20)
    }

    /// The controller's address on the lab's network (the root namespace's side, `SUBNET.1`).
    pub fn controller_address(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The namespace of the bridge (`br0`), whose ports are named after what they join (`h1`,
    /// `h2`, `h3`, `s3`, and `up0` to the root namespace): where a capture sees traffic between
    /// hosts.
    pub fn hub_netns(&self) -> String {
        format!("bf-{}-hub", self.id)
    }

    /// Pulls host `host`'s cable: its side of the link loses carrier, so nothing reaches it or
    /// leaves it, while its processes, sockets and routes stay (connections hang, as with a real
    /// cut, rather than being refused).
    pub fn cut_network(&self, host: &str) {
        self.script(&["cut", host]);
    }

    /// Plugs host `host`'s cable in again.
    pub fn restore_network(&self, host: &str) {
        self.script(&["restore", host]);
    }

    /// Stops host `host`'s libvirtd and sshd (SIGTERM, waits until they exited): its libvirt
    /// and new ssh connections are refused; its VMs keep running, and so do ssh sessions already
    /// open.
    pub fn stop_host(&self, host: &str) {
        self.script(&["stop-host", host]);
    }

    /// Starts host `host`'s libvirtd and sshd again and waits until both answer; libvirtd finds
    /// the VMs that kept running.
    pub fn start_host(&self, host: &str) {
        self.script(&["start-host", host]);
    }

    /// A command that runs `program` on host `host`, as the host sees it: in its network, mount
    /// and UTS namespaces (for servers a test starts there and stops itself).
    pub fn command_on(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let host = self.host(host);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", host.netns))
            .arg(format!(
                "--mount={}",
                self.dir.join(format!("ns/{}.mnt", host.name)).display()
            ))
            .arg(format!(
                "--uts={}",
                self.dir.join(format!("ns/{}.uts", host.name)).display()
            ))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs the shell command `cmd` on host `host` (see [`Lab::command_on`]); its output,
    /// whatever its exit status.
    pub fn run_on(&self, host: &str, cmd: &str) -> Output {
        self.command_on(host, "sh")
            .args(["-c", cmd])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter: {e}"))
    }

    /// `virsh` with `args` on host `host`'s libvirtd, run on the host; its stdout. Panics
    /// with its output when it fails.
    pub fn virsh(&self, host: &str, args: &[&str]) -> String {
        let out = run_command(
            self.command_on(host, "virsh")
                .args(["-q", "-c", "qemu:///system"])
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that runs `cmd` on host `host` over ssh from the root namespace, as the
    /// controller starts workers (the lab's key; host keys checked against `DIR/ssh/known_hosts`;
    /// no password prompts; a connection attempt gives up after a few seconds).
    pub fn ssh_command(&self, host: &str, cmd: &str) -> Command {
        let host = self.host(host);
        let mut command = Command::new("ssh");
        command
            .arg("-i")
            .arg(self.ssh_key())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("ssh/known_hosts").display()
            ))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_SECS}"))
            .arg(format!("root@{}", host.address))
            .arg(cmd);
        command
    }

    /// Host `host`'s temporary directory: the `TMPDIR` of its ssh sessions, where its workers make
    /// their job directories (hosts of a real cluster do not share `/tmp`).
    pub fn tmp_dir(&self, host: &str) -> PathBuf {
        self.dir
            .join("hosts")
            .join(&self.host(host).name)
            .join("tmp")
    }

    /// Runs [`Lab::ssh_command`]; its output, whatever its exit status.
    pub fn ssh(&self, host: &str, cmd: &str) -> Output {
        self.ssh_command(host, cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ssh: {e}"))
    }

    /// The host where VM `vm` runs now (it may have migrated), if it runs anywhere.
    pub fn vm_host(&self, vm: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| {
            self.run_on(
                &h.name,
                &format!("virsh -q -c qemu:///system domstate {vm} 2>/dev/null"),
            )
            .stdout
            .starts_with(b"running")
        })
    }

    /// Writes `len` bytes of `pattern` at `offset` of VM `vm`'s disk through its virtio device,
    /// on whichever host it runs, as its guest would: dirty bitmaps and running backup jobs
    /// see it.
    pub fn write_in_vm(&self, vm: &str, offset: u64, len: u64, pattern: u8) {
        let host = self
            .vm_host(vm)
            .unwrap_or_else(|| panic!("VM {vm} runs on no host of lab {}", self.id));
        let hmp = format!(
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \
             \"write -P {pattern:#04x} {offset} {len}\""
        );
        // HMP errors come back as the reply with exit status 0; qemu-io's own output goes to
        // the domain's log.
        let reply = self.virsh(&host.name, &["qemu-monitor-command", vm, "--hmp", &hmp]);
        assert!(
            reply.trim().is_empty(),
            "{hmp} on VM {vm} (host {}) failed: {reply}",
            host.name
        );
    }

    /// Defines and starts one more VM on host `host` (`cluster.sh add-vm`), named
    /// `bf-LAB-vmN` after the next number, with a disk in `DIR/shared`: a new empty qcow2 image of
    /// `source` bytes (qemu-img's syntax: `64M`, `1G`), or a qcow2 copy of the image at path
    /// `source` (raw or qcow2: data written beforehand, such as a benchmark's).
    pub fn add_vm(&mut self, host: &str, source: &str) -> Vm {
        let out = run_command(
            Command::new("bash")
                .arg(script())
                .arg("add-vm")
                .arg(&self.dir)
                .args([host, source]),
        );
        let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let vm = Vm {
            disk: self.dir.join(format!("shared/{name}.qcow2")),
            name,
            host: host.to_owned(),
        };
        self.vms.push(vm.clone());
        vm
    }

    /// Live-migrates VM `vm` from the host where it runs to `to` (`cluster.sh migrate`: through
    /// both hosts' URIs, from the controller's side; the definition moves with it; its disk
    /// stays where it is, on the storage every host sees).
    pub fn migrate(&self, vm: &str, to: &str) {
        self.script(&["migrate", vm, to]);
    }

    /// Whether a backup job runs on VM `vm` (on whichever host it runs): `virsh
    /// backup-dumpxml` answers only while one does.
    pub fn has_backup_job(&self, vm: &str) -> bool {
        let host = self
            .vm_host(vm)
            .unwrap_or_else(|| panic!("VM {vm} runs on no host of lab {}", self.id));
        self.command_on(&host.name, "virsh")
            .args(["-q", "-c", "qemu:///system", "backup-dumpxml", vm])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run nsenter: {e}"))
            .success()
    }

    /// The processes running on host `host` (in its network namespace) whose command line
    /// contains `pattern` (`"backflow worker"`, `"qemu-nbd"`), to kill one or to check that
    /// none is left.
    pub fn pids_on(&self, host: &str, pattern: &str) -> Vec<u32> {
        let netns = Path::new("/run/netns").join(&self.host(host).netns);
        let inode = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(&netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display())),
        );
        let wanted = format!("net:[{inode}]");
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == wanted)
                    && crate::qemu::live(pid)
                    && cmdline(pid).contains(pattern)
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// What the lab made, to check after [`Lab::down`] that none of it is left.
    pub fn footprint(&self) -> Footprint {
        let mut pids = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("pids"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for host in &self.hosts {
            let run = self.dir.join(format!("hosts/{}/run/qemu", host.name));
            files.extend(
                std::fs::read_dir(run)
                    .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "pid")),
            );
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                pids.push(pid);
            }
        }
        let mut netns: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        netns.push(format!("bf-{}-s3", self.id));
        netns.push(self.hub_netns());
        let mount_namespaces = self
            .hosts
            .iter()
            .map(|h| {
                let file = self.dir.join(format!("ns/{}.mnt", h.name));
                let inode = std::os::unix::fs::MetadataExt::ino(
                    &std::fs::metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
                );
                format!("mnt:[{inode}]")
            })
            .collect();
        Footprint {
            dir: self.dir.clone(),
            pids,
            netns,
            interface: format!("bf-{}-up", self.id),
            mount_namespaces,
            vm_names: self.vms.iter().map(|v| v.name.clone()).collect(),
        }
    }

    /// Removes the lab (`cluster.sh down`); panics when that fails.
    pub fn down(mut self) {
        self.down = true;
        self.script(&["down"]);
    }

    /// Runs `cluster.sh COMMAND DIR [ARGS...]`; panics with its output when it fails.
    fn script(&self, args: &[&str]) {
        run_command(
            Command::new("bash")
                .arg(script())
                .arg(args[0])
                .arg(&self.dir)
                .args(&args[1..]),
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "lab {} in {}:\n{}",
                self.id,
                self.dir.display(),
                log_tails(&self.dir)
            );
            let _ = Command::new("bash")
                .arg(script())
                .arg("down")
                .arg(&self.dir)
                .status();
        } else {
            self.script(&["down"]);
        }
    }
}

/// What a lab made ([`Lab::footprint`]).
#[derive(Clone, Debug)]
pub struct Footprint {
    pub dir: PathBuf,
    /// The daemons' and the VMs' QEMU processes.
    pub pids: Vec<u32>,
    pub netns: Vec<String>,
    /// The root namespace's side of the lab's network.
    pub interface: String,
    /// The hosts' mount namespaces, as `/proc/PID/ns/mnt` links name them (`mnt:[N]`).
    pub mount_namespaces: Vec<String>,
    pub vm_names: Vec<String>,
}

impl Footprint {
    /// What of it is still there, one line each: live processes (with their command lines),
    /// network namespaces, the interface, processes in the hosts' mount namespaces, mounts under
    /// the directory, the directory. A pid or a namespace's number that the kernel gave to
    /// something else since counts only when that holds the lab's directory or names its VMs.
    pub fn remaining(&self) -> Vec<String> {
        let mut left = Vec::new();
        let dir = self.dir.to_string_lossy().into_owned();
        let vm_prefix = self
            .vm_names
            .first()
            .and_then(|n| n.rsplit_once('-'))
            .map(|(prefix, _)| format!("{prefix}-"))
            .unwrap_or_else(|| dir.clone());
        for &pid in &self.pids {
            let line = cmdline(pid);
            if crate::qemu::live(pid) && (line.contains(&dir) || line.contains(&vm_prefix)) {
                left.push(format!("process {pid}: {line}"));
            }
        }
        let netns = String::from_utf8_lossy(
            &run_command(Command::new("ip").args(["netns", "list"])).stdout,
        )
        .into_owned();
        for ns in &self.netns {
            if netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns))
            {
                left.push(format!("network namespace {ns}"));
            }
        }
        if Command::new("ip")
            .args(["link", "show", &self.interface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            left.push(format!("interface {}", self.interface));
        }
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(link) = std::fs::read_link(entry.path().join("ns/mnt")) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            if self.mount_namespaces.contains(&link)
                && std::fs::read_to_string(entry.path().join("mountinfo"))
                    .is_ok_and(|m| m.contains(&dir))
            {
                left.push(format!("process {pid} in {link}: {}", cmdline(pid)));
            }
        }
        let prefix = format!("{}/", self.dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for line in mounts.lines() {
            if let Some(target) = line.split(' ').nth(4)
                && (target.starts_with(&prefix) || target == self.dir.to_string_lossy())
            {
                left.push(format!("mount {target}"));
            }
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }
}

/// `scripts/cluster.sh` of this workspace.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// A lab id: the pid and a counter in hex, joined by `x` (not a hex digit, so that two
/// processes' ids never coincide); at most 9 characters, as `cluster.sh` requires.
fn next_id() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:x}x{n:x}", std::process::id());
    assert!(
        id.len() <= 9,
        "lab id {id} is too long (a counter past 255?)"
    );
    id
}

/// `KEY=VALUE` lines (`DIR/lab`, `DIR/env`).
fn read_state(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn parse_subnet(text: &str) -> [u8; 3] {
    let octets: Vec<u8> = text.split('.').filter_map(|o| o.parse().ok()).collect();
    octets
        .try_into()
        .unwrap_or_else(|_| panic!("SUBNET={text} is not A.B.C"))
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// The ends of the lab's logs, for failure messages.
fn log_tails(dir: &Path) -> String {
    let mut logs = vec![dir.join("garage/log")];
    for host in ["h1", "h2", "h3"] {
        for log in [
            "libvirtd.stderr",
            "log/libvirtd.log",
            "sshd.stderr",
            "sshd.log",
        ] {
            logs.push(dir.join("hosts").join(host).join(log));
        }
    }
    let mut text = String::new();
    for log in logs {
        let Ok(content) = std::fs::read_to_string(&log) else {
            continue;
        };
        let lines: Vec<&str> = content.lines().collect();
        if lines.is_empty() {
            continue;
        }
        text.push_str(&format!("--- {}\n", log.display()));
        for line in &lines[lines.len().saturating_sub(LOG_LINES)..] {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}
