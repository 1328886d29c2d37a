//! The bootable test guest: a small disk made from Debian's packages on this machine (no OS
//! download) that boots under libvirt, prints [`BOOT_LINE`] on its serial console and then
//! answers commands there. Instant recovery, verify-boot and their benchmark run it.
//!
//! The disk ([`GuestDisk`]) has an MBR with syslinux's boot code, a FAT boot partition holding
//! syslinux, Debian's kernel (unpacked by `scripts/setup.sh` into [`KERNEL_DIR`]) and an
//! initramfs made here (busybox-static, the few kernel modules the guest needs in the order
//! `modules.dep` gives, and `guest/init.sh` as `/init`), and an ext4 data partition labelled
//! [`DATA_LABEL`] holding known files. No loop device or mount is needed: `mkfs.fat --offset`,
//! `syslinux --offset` (mtools), `mcopy -i IMAGE@@OFFSET` and `mkfs.ext4 -E offset= -d` write
//! straight into the image file. A disk can also be made not to boot ([`Boot`]), for
//! verify-boot's failure case.
//!
//! [`domain_xml`] writes the libvirt domain for such a disk (also for disks given by others, such
//! as the qcow2 overlays of an instant recovery); [`Guest`] defines and starts one and cleans up
//! after it; [`Console`] waits for the boot line and runs the channel's commands over the serial
//! console's unix socket. See docs/test-guest.md for the channel's protocol.
//!
//! KVM or not ([`Accel::detect`]): on hosts whose KVM is `kvm_pvm` (a paravirtual KVM that runs
//! only guest kernels built for it), Debian's kernel cannot run under KVM: syslinux stops with a
//! KVM emulation failure and the kernel, booted directly, hangs after "Probing EDD". The guest
//! then runs under TCG, which boots it in 12-50 s on two shared cores (most of it decompressing
//! the xz-compressed kernel).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::libvirt::{make_traversable, try_virsh};

/// The line the guest prints on its serial console once it booted and mounted its data
/// partition: the sign of life verify-boot waits for.
pub const BOOT_LINE: &str = "BACKFLOW-BOOT-OK";

/// The prefix of the line the guest prints when a step of its boot fails (a module does not
/// load, the data partition is missing or does not mount), followed by what failed.
pub const BOOT_FAIL: &str = "BACKFLOW-BOOT-FAIL";

/// The label of the ext4 data partition: the guest finds it by label, whatever the disk's name.
pub const DATA_LABEL: &str = "bfdata";

/// The file every data partition holds (at its root), with [`KNOWN_CONTENT`].
pub const KNOWN_FILE: &str = "known.txt";

/// The content of [`KNOWN_FILE`].
pub const KNOWN_CONTENT: &[u8] = b"backflow test guest: known file\n";

/// Where `scripts/setup.sh` unpacks Debian's kernel: `vmlinuz`, `version` and `modules`
/// (`/lib/modules/VERSION`). `BACKFLOW_TOOLS` moves it, as it does for setup.sh.
pub const KERNEL_DIR: &str = "/opt/backflow-tools/kernel/current";

/// The kernel modules the guest loads, by name; their dependencies come from `modules.dep`.
/// virtio_pci and virtio_blk for the disk, ext4 for the data partition, crc32c for ext4's
/// metadata checksums (the kernel asks for it by algorithm name, which modules.dep cannot show),
/// button and evdev for the ACPI power button (`virsh shutdown`), which busybox's acpid reads.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
];

/// What busybox's acpid runs when the ACPI power button is pressed (`virsh shutdown`): the
/// event's name as a path under its configuration directory.
const POWER_BUTTON_ACTION: &str = "etc/acpi/PWRF/00000080";

/// The power button's action: the same clean poweroff as the channel's `poweroff` command.
const POWER_BUTTON_SCRIPT: &str = "#!/bin/sh\nsync\numount /data\npoweroff -f\n";

/// syslinux's MBR boot code (the first 440 bytes of sector 0).
const MBR_CODE: &str = "/usr/lib/syslinux/mbr/mbr.bin";

/// Sectors of 512 bytes, as the partition table counts.
const SECTOR: u64 = 512;

/// Where the boot partition starts (1 MiB, as partitioning tools align) and its size: room for
/// the kernel (~8 MiB) and the uncompressed initramfs (~5 MiB).
const BOOT_START: u64 = 1 << 20;
const BOOT_SIZE: u64 = 32 << 20;

/// The smallest data partition: ext4 with a journal needs a few MiB.
const MIN_DATA_SIZE: u64 = 8 << 20;

/// The smallest disk [`GuestDisk::build`] makes.
pub const MIN_DISK_SIZE: u64 = BOOT_START + BOOT_SIZE + MIN_DATA_SIZE;

/// Memory of a guest domain: the kernel and its initramfs, with room to spare.
pub const MEMORY_MIB: u32 = 256;

/// The kernel's command line: console on the first serial port; `quiet` keeps kernel messages
/// off the channel (the guest also lowers the console log level once it booted).
const KERNEL_CMDLINE: &str = "console=ttyS0,115200 quiet";

/// How long a channel command may take by default (a `fill` of a few hundred MiB under TCG
/// takes longer: see [`Console::run_with_timeout`]).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes guest names unique within one test process (the pid makes them unique across).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The format of an image file as libvirt and qemu-img name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name libvirt's `<driver type=...>` and `qemu-img -f` use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Whether a disk boots, and how it fails when it must not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Boots and prints [`BOOT_LINE`].
    Boots,
    /// Sector 0 is all zeros (no boot code, no partition table, no signature): SeaBIOS prints
    /// "Boot failed: not a bootable disk" and "No bootable device." on the serial console, and
    /// stays there (no retry: QEMU's boot retry timeout is -1 unless the domain sets one).
    ZeroedBootSector,
    /// Boot code and syslinux are in place, but the boot partition holds no kernel: syslinux
    /// prints "Loading vmlinuz failed: No such file or directory" and waits at its `boot:`
    /// prompt.
    NoKernel,
}

/// What the console shows when a [`Boot::ZeroedBootSector`] disk fails to boot.
pub const NO_BOOTABLE_DEVICE: &str = "No bootable device";

/// What the console shows when a [`Boot::NoKernel`] disk fails to boot.
pub const NO_KERNEL: &str = "Loading vmlinuz failed";

/// The recipe of a test guest's disk: size, format, the files of its data partition, whether it
/// boots. [`GuestDisk::build`] makes it.
#[derive(Clone, Debug)]
pub struct GuestDisk {
    size: u64,
    format: ImageFormat,
    boot: Boot,
    /// Path (relative to the data partition's root) and content, besides [`KNOWN_FILE`].
    files: Vec<(String, Vec<u8>)>,
}

/// Where [`GuestDisk::build`] put the partitions of a disk, in bytes from the disk's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskLayout {
    pub path: PathBuf,
    pub format: ImageFormat,
    /// The virtual size of the disk.
    pub size: u64,
    /// Offset and length of partition 1 (FAT, syslinux, kernel, initramfs).
    pub boot_partition: (u64, u64),
    /// Offset and length of partition 2 (ext4 labelled [`DATA_LABEL`], mounted at `/data`).
    pub data_partition: (u64, u64),
}

impl GuestDisk {
    /// A bootable raw disk of `size` bytes (at least [`MIN_DISK_SIZE`]; partitions end on whole
    /// MiB) holding [`KNOWN_FILE`].
    pub fn new(size: u64) -> GuestDisk {
        GuestDisk {
            size,
            format: ImageFormat::Raw,
            boot: Boot::Boots,
            files: Vec::new(),
        }
    }

    /// Makes the image in `format` (a qcow2 image holds only what was written).
    pub fn format(mut self, format: ImageFormat) -> GuestDisk {
        self.format = format;
        self
    }

    /// Whether and how the disk boots.
    pub fn boot(mut self, boot: Boot) -> GuestDisk {
        self.boot = boot;
        self
    }

    /// Adds a file to the data partition: `path` relative to its root (directories are made),
    /// owned by root, mode 0644.
    pub fn file(mut self, path: &str, content: impl Into<Vec<u8>>) -> GuestDisk {
        self.files.push((path.to_owned(), content.into()));
        self
    }

    /// Makes the disk at `path` (replaced if it exists). Errors name the step and the tool's
    /// output: a missing tool or kernel (run `scripts/setup.sh`), a size below the minimum.
    pub fn build(&self, path: &Path) -> Result<DiskLayout, String> {
        if self.size < MIN_DISK_SIZE {
            return Err(format!(
                "a test guest's disk needs at least {MIN_DISK_SIZE} bytes ({} MiB), not {}",
                MIN_DISK_SIZE >> 20,
                self.size
            ));
        }
        let work = tempfile::Builder::new()
            .prefix("bf-guest-disk-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let raw = match self.format {
            ImageFormat::Raw => path.to_owned(),
            ImageFormat::Qcow2 => work.path().join("disk.raw"),
        };
        let data_start = BOOT_START + BOOT_SIZE;
        // Whole MiB, so that the partition ends where a partitioning tool would end it.
        let data_len = (self.size - data_start) & !((1 << 20) - 1);
        let _ = std::fs::remove_file(&raw);
        let file = std::fs::File::create(&raw)
            .and_then(|f| f.set_len(self.size).map(|()| f))
            .map_err(|e| format!("creating {}: {e}", raw.display()))?;
        drop(file);

        let raw_s = raw
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", raw.display()))?;
        // Partition 1: FAT with syslinux, the kernel and the initramfs.
        run(Command::new("mkfs.fat")
            .args(["-F", "16", "-n", "BFBOOT"])
            .arg(format!("--offset={}", BOOT_START / SECTOR))
            .arg("-h")
            .arg((BOOT_START / SECTOR).to_string())
            .arg(raw_s)
            .arg((BOOT_SIZE / 1024).to_string()))?;
        run(Command::new("syslinux")
            .arg("--install")
            .arg(format!("--offset={BOOT_START}"))
            .arg(raw_s))?;
        let kernel = kernel_dir();
        let initrd = work.path().join("initrd.img");
        std::fs::write(&initrd, initramfs(&kernel)?)
            .map_err(|e| format!("writing {}: {e}", initrd.display()))?;
        // No SERIAL directive: SeaBIOS's serial console (`<bios useserial='yes'/>`) copies
        // syslinux's screen to the serial line already; with both, each message shows twice,
        // interleaved character by character.
        let config = work.path().join("syslinux.cfg");
        std::fs::write(
            &config,
            format!(
                "DEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n  \
                 KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {KERNEL_CMDLINE}\n"
            ),
        )
        .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let mut mcopy = Command::new("mcopy");
        mcopy.arg("-i").arg(format!("{raw_s}@@{BOOT_START}"));
        if self.boot != Boot::NoKernel {
            mcopy.arg(kernel.join("vmlinuz"));
        }
        run(mcopy.arg(&initrd).arg(&config).arg("::"))?;

        // Partition 2: ext4 with the data files.
        let data = work.path().join("data");
        let mut files = vec![(KNOWN_FILE.to_owned(), KNOWN_CONTENT.to_vec())];
        files.extend(self.files.iter().cloned());
        for (name, content) in &files {
            let relative = Path::new(name);
            if relative.is_absolute()
                || relative
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!(
                    "data file {name}: expected a relative path without `..`"
                ));
            }
            let target = data.join(relative);
            std::fs::create_dir_all(target.parent().unwrap())
                .and_then(|()| std::fs::write(&target, content))
                .map_err(|e| format!("writing {}: {e}", target.display()))?;
        }
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", DATA_LABEL])
            .arg("-E")
            .arg(format!("offset={data_start}"))
            .arg("-d")
            .arg(&data)
            .arg(raw_s)
            .arg(format!("{}k", data_len / 1024)))?;

        // Sector 0 last: the MBR with the two partitions.
        let mut mbr = vec![0u8; SECTOR as usize];
        if self.boot != Boot::ZeroedBootSector {
            let code = std::fs::read(MBR_CODE).map_err(|e| {
                format!("reading {MBR_CODE} (syslinux-common; run scripts/setup.sh): {e}")
            })?;
            if code.len() < 440 {
                return Err(format!(
                    "{MBR_CODE}: expected at least 440 bytes of boot code"
                ));
            }
            mbr[..440].copy_from_slice(&code[..440]);
            mbr[440..444].copy_from_slice(&0x4246_4c57u32.to_le_bytes());
            // FAT16 with LBA addressing, bootable; then Linux.
            partition_entry(&mut mbr[446..462], true, 0x0e, BOOT_START, BOOT_SIZE);
            partition_entry(&mut mbr[462..478], false, 0x83, data_start, data_len);
            mbr[510] = 0x55;
            mbr[511] = 0xaa;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .map_err(|e| format!("opening {}: {e}", raw.display()))?;
        std::os::unix::fs::FileExt::write_all_at(&file, &mbr, 0)
            .map_err(|e| format!("writing the MBR of {}: {e}", raw.display()))?;
        drop(file);

        if self.format == ImageFormat::Qcow2 {
            let _ = std::fs::remove_file(path);
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(path))?;
        }
        Ok(DiskLayout {
            path: path.to_owned(),
            format: self.format,
            size: self.size,
            boot_partition: (BOOT_START, BOOT_SIZE),
            data_partition: (data_start, data_len),
        })
    }
}

/// Writes one 16-byte MBR partition entry: LBA start and length; the CHS fields say "beyond
/// CHS" (as for any partition past 8 GiB), so that loaders use the LBA fields.
fn partition_entry(entry: &mut [u8], bootable: bool, kind: u8, start: u64, len: u64) {
    entry[0] = if bootable { 0x80 } else { 0 };
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = kind;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&((start / SECTOR) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&((len / SECTOR) as u32).to_le_bytes());
}

/// The directory of the guest kernel ([`KERNEL_DIR`], under `BACKFLOW_TOOLS` when set).
pub fn kernel_dir() -> PathBuf {
    match std::env::var_os("BACKFLOW_TOOLS") {
        Some(tools) => Path::new(&tools).join("kernel/current"),
        None => PathBuf::from(KERNEL_DIR),
    }
}

/// The guest's initramfs: an uncompressed cpio archive (newc) holding busybox, the modules in
/// load order (`/lib/modules/order` lists them), and `/init`.
pub fn initramfs(kernel: &Path) -> Result<Vec<u8>, String> {
    let version = std::fs::read_to_string(kernel.join("version"))
        .map_err(|e| {
            format!(
                "reading {}/version (the guest kernel: run scripts/setup.sh): {e}",
                kernel.display()
            )
        })?
        .trim()
        .to_owned();
    let modules_dir = kernel.join("modules");
    let modules = module_load_order(&modules_dir, MODULES)?;
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("reading /bin/busybox (busybox-static): {e}"))?;
    let init = include_str!("guest/init.sh")
        .replace("@BOOT_LINE@", BOOT_LINE)
        .replace("@DATA_LABEL@", DATA_LABEL);
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "data",
        "tmp",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before init runs.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init.as_bytes());
    for dir in ["etc", "etc/acpi", "etc/acpi/PWRF"] {
        cpio.dir(dir);
    }
    cpio.file(POWER_BUTTON_ACTION, 0o755, POWER_BUTTON_SCRIPT.as_bytes());
    let mut order = String::new();
    for module in &modules {
        let name = module_file_name(module);
        let bytes = read_module(&modules_dir.join(module))?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("lib/modules/order", 0o644, order.as_bytes());
    cpio.file("etc/kernel-version", 0o644, version.as_bytes());
    Ok(cpio.finish())
}

/// The modules of `wanted` (by name) and everything they depend on, as paths relative to the
/// modules directory, each after its dependencies: the order `insmod` needs. From
/// `modules.dep`; a module built into the kernel (`modules.builtin`) needs no loading.
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<String>, String> {
    let dep_path = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_path).map_err(|e| {
        format!(
            "reading {} (the guest kernel's modules: run scripts/setup.sh): {e}",
            dep_path.display()
        )
    })?;
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_name: HashMap<String, String> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let Some((module, rest)) = line.split_once(':') else {
            return Err(format!(
                "{} line {}: expected `MODULE: DEPENDENCIES`, got {line:?}",
                dep_path.display(),
                n + 1
            ));
        };
        by_name.insert(module_name(module), module.to_owned());
        deps.insert(
            module.to_owned(),
            rest.split_whitespace().map(str::to_owned).collect(),
        );
    }
    let builtin: Vec<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut order = Vec::new();
    for name in wanted {
        let key = name.replace('-', "_");
        match by_name.get(&key) {
            Some(module) => visit(module, &deps, &mut order, &mut Vec::new())?,
            None if builtin.contains(&key) => {}
            None => {
                return Err(format!(
                    "{}: no module {name} (neither a module nor built in)",
                    dep_path.display()
                ));
            }
        }
    }
    Ok(order)
}

/// Depth-first: `module`'s dependencies, then `module`. `path` holds the modules being visited,
/// to name a cycle instead of recursing forever.
fn visit(
    module: &str,
    deps: &HashMap<String, Vec<String>>,
    order: &mut Vec<String>,
    path: &mut Vec<String>,
) -> Result<(), String> {
    if order.iter().any(|m| m == module) {
        return Ok(());
    }
    if path.iter().any(|m| m == module) {
        return Err(format!(
            "modules.dep: dependency cycle {} -> {module}",
            path.join(" -> ")
        ));
    }
    path.push(module.to_owned());
    for dep in deps.get(module).into_iter().flatten() {
        visit(dep, deps, order, path)?;
    }
    path.pop();
    order.push(module.to_owned());
    Ok(())
}

/// `kernel/fs/ext4/ext4.ko.xz` -> `ext4`; dashes as underscores, as the kernel names modules.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The file name a module gets in the initramfs: always uncompressed (`NAME.ko`).
fn module_file_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    format!("{}.ko", file.split(".ko").next().unwrap_or(file))
}

/// A module's bytes, decompressed when the kernel package ships it compressed (`.ko.xz`,
/// `.ko.zst`, `.ko.gz`), since busybox's insmod may not read those.
fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return std::fs::read(path).map_err(|e| format!("reading {name}: {e}"));
    } else if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return Err(format!(
            "{name}: expected a module file ending in .ko, .ko.xz, .ko.zst or .ko.gz"
        ));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("{tool} (to decompress {name}): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -dc {name} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// A cpio archive in the "newc" format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, 0, &[]);
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | mode, 0, data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, (major << 8) | minor, &[]);
    }

    /// One header, the name and the data, each padded to 4 bytes. `rdev` packs major and
    /// minor as `(major << 8) | minor`.
    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.inode += 1;
        let name_len = path.len() + 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name_len as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.out
    }
}

/// Runs a tool of the disk recipe; an error names the command line and holds its output.
fn run(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| {
        format!(
            "{} (run scripts/setup.sh to install it): {e}",
            command.get_program().to_string_lossy()
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How the guest's CPU runs: libvirt's domain type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// `<domain type='kvm'>`.
    Kvm,
    /// `<domain type='qemu'>`: QEMU's own emulation (TCG), slower but runs any kernel.
    Tcg,
}

impl Accel {
    /// KVM when the host's KVM can run Debian's kernel, else TCG, with the reason. The
    /// environment variable `BACKFLOW_GUEST_ACCEL` (`kvm` or `tcg`) overrides the choice.
    /// TCG when `/dev/kvm` is missing or the host's KVM is `kvm_pvm` (see the module docs).
    pub fn detect() -> (Accel, &'static str) {
        match std::env::var("BACKFLOW_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "BACKFLOW_GUEST_ACCEL=kvm"),
            Ok("tcg") => return (Accel::Tcg, "BACKFLOW_GUEST_ACCEL=tcg"),
            _ => {}
        }
        if !Path::new("/dev/kvm").exists() {
            (Accel::Tcg, "no /dev/kvm")
        } else if Path::new("/sys/module/kvm_pvm").exists() {
            (
                Accel::Tcg,
                "the host's KVM is kvm_pvm, which runs no stock kernel",
            )
        } else {
            (Accel::Kvm, "/dev/kvm")
        }
    }

    /// The `type` of libvirt's `<domain>`.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// Where a guest disk's bytes come from, as libvirt's `<disk>` element says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// An image file (a qcow2 overlay's backing chain is read from its header).
    File { path: PathBuf, format: ImageFormat },
    /// An NBD export on a unix socket (raw), read-only when `read_only`.
    NbdUnix {
        socket: PathBuf,
        export: String,
        read_only: bool,
    },
}

/// The serial console of a guest domain: a unix socket QEMU listens on (the channel) and a log
/// file that receives everything the console prints from the start, whoever is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsolePaths {
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl ConsolePaths {
    /// `console.sock` and `console.log` in `dir` (which QEMU, user libvirt-qemu, must be able to
    /// enter: libvirt makes the socket itself, virtlogd writes the log as root).
    pub fn in_dir(dir: &Path) -> ConsolePaths {
        ConsolePaths {
            socket: dir.join("console.sock"),
            log: dir.join("console.log"),
        }
    }
}

/// Everything [`domain_xml`] needs for a guest domain.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u32,
    /// Target (`vda`, `vdb`, ...: virtio) and source of each disk, the first one booted.
    pub disks: Vec<(String, DiskSource)>,
    pub console: ConsolePaths,
}

/// The libvirt domain XML of a test guest: `spec`'s disks on virtio, its serial console on a
/// unix socket with a log, SeaBIOS also on the serial console (`<bios useserial='yes'/>`, so
/// that a boot failure shows there), no NIC, no graphics, no `<cpu>` element (host-model and
/// host-passthrough abort QEMU on these machines), ACPI on (the guest powers off through it).
pub fn domain_xml(spec: &DomainSpec) -> String {
    let mut disks = String::new();
    for (target, source) in &spec.disks {
        match source {
            DiskSource::File { path, format } => {
                let _ = write!(
                    disks,
                    "    <disk type='file' device='disk'>\n      \
                     <driver name='qemu' type='{}'/>\n      \
                     <source file='{}'/>\n      \
                     <target dev='{target}' bus='virtio'/>\n    </disk>\n",
                    format.name(),
                    xml_escape(&path.to_string_lossy())
                );
            }
            DiskSource::NbdUnix {
                socket,
                export,
                read_only,
            } => {
                let _ = write!(
                    disks,
                    "    <disk type='network' device='disk'>\n      \
                     <driver name='qemu' type='raw'/>\n      \
                     <source protocol='nbd' name='{}'>\n        \
                     <host transport='unix' socket='{}'/>\n      </source>\n      \
                     <target dev='{target}' bus='virtio'/>\n{}    </disk>\n",
                    xml_escape(export),
                    xml_escape(&socket.to_string_lossy()),
                    if *read_only {
                        "      <readonly/>\n"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    format!(
        "<domain type='{kind}'>\n  <name>{name}</name>\n  \
         <memory unit='MiB'>{memory}</memory>\n  <vcpu>1</vcpu>\n  \
         <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <boot dev='hd'/>\n    \
         <bios useserial='yes'/>\n  </os>\n  \
         <features><acpi/></features>\n  \
         <on_poweroff>destroy</on_poweroff>\n  <on_crash>destroy</on_crash>\n  \
         <devices>\n{disks}    \
         <serial type='unix'>\n      <source mode='bind' path='{socket}'/>\n      \
         <log file='{log}' append='on'/>\n      <target port='0'/>\n    </serial>\n    \
         <memballoon model='none'/>\n  </devices>\n</domain>\n",
        kind = spec.accel.domain_type(),
        name = xml_escape(&spec.name),
        memory = spec.memory_mib,
        socket = xml_escape(&spec.console.socket.to_string_lossy()),
        log = xml_escape(&spec.console.log.to_string_lossy()),
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The answer to one channel command: the guest's exit status and what the command printed
/// (for `read` and `sh` already decoded from base64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: i32,
    pub output: Vec<u8>,
}

impl Reply {
    /// The output as text, without the trailing newline.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).trim_end().to_owned()
    }
}

/// A guest's serial console: its log (everything printed since the domain started) and the
/// command channel over its unix socket. Independent of who defined the domain, so that a test
/// can talk to a domain that instant recovery or verify-boot defined with [`domain_xml`].
pub struct Console {
    paths: ConsolePaths,
    /// Where the current boot starts in the log (the log is appended to across starts).
    log_start: u64,
    stream: Option<UnixStream>,
    /// Bytes read from the socket and not consumed by a reply yet.
    pending: Vec<u8>,
    next_id: u32,
}

impl Console {
    /// The console at `paths`, watching the log from its beginning: make it before or after
    /// the domain's first start. Before a later start, call [`Console::new_boot`].
    pub fn new(paths: ConsolePaths) -> Console {
        Console {
            paths,
            log_start: 0,
            stream: None,
            pending: Vec::new(),
            next_id: 1,
        }
    }

    pub fn paths(&self) -> &ConsolePaths {
        &self.paths
    }

    /// Forgets the connection and starts watching the log from its current end: call before
    /// the domain starts again (QEMU's new socket needs a new connection).
    pub fn new_boot(&mut self) {
        self.log_start = std::fs::metadata(&self.paths.log).map_or(0, |m| m.len());
        self.stream = None;
        self.pending.clear();
    }

    /// What the console printed since this boot started, as text: lossy UTF-8 without
    /// terminal escape sequences and carriage returns. SeaBIOS's serial console moves the cursor
    /// with escape sequences, even in the middle of a word ("Lo\e[06;02H\e[06;03Hading").
    pub fn output(&self) -> String {
        plain_text(&self.raw_output())
    }

    /// The bytes the console printed since this boot started, as they are.
    pub fn raw_output(&self) -> Vec<u8> {
        let mut bytes = std::fs::read(&self.paths.log).unwrap_or_default();
        let start = (self.log_start as usize).min(bytes.len());
        bytes.drain(..start);
        bytes
    }

    /// Waits until the console printed a line holding `needle` during this boot; the time it
    /// waited. The error holds the console's output.
    pub fn wait_for(&self, needle: &str, deadline: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let output = self.output();
            if output.contains(needle) {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= deadline {
                return Err(format!(
                    "the console did not print {needle:?} within {deadline:?}; it printed:\n\
                     {output}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for [`BOOT_LINE`]; fails early when the guest printed [`BOOT_FAIL`] instead.
    pub fn wait_booted(&self, deadline: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let output = self.output();
            if output.contains(BOOT_LINE) {
                return Ok(started.elapsed());
            }
            if output.contains(BOOT_FAIL) || started.elapsed() >= deadline {
                return Err(format!(
                    "the guest did not print {BOOT_LINE} within {deadline:?}; its console \
                     printed:\n{output}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one channel command (`args` joined by spaces: no argument may hold whitespace) with
    /// [`COMMAND_TIMEOUT`]. `Err` when the channel fails or times out; a failing command is an
    /// `Ok` with its non-zero status.
    pub fn run(&mut self, args: &[&str]) -> Result<Reply, String> {
        self.run_with_timeout(args, COMMAND_TIMEOUT)
    }

    /// [`Console::run`] with a timeout of its own.
    pub fn run_with_timeout(&mut self, args: &[&str], timeout: Duration) -> Result<Reply, String> {
        if let Some(bad) = args
            .iter()
            .find(|a| a.is_empty() || a.contains(char::is_whitespace))
        {
            return Err(format!(
                "channel argument {bad:?}: expected a non-empty word without whitespace"
            ));
        }
        let id = format!("c{}", self.next_id);
        self.next_id += 1;
        let line = format!("{id} {}\n", args.join(" "));
        self.connect()?;
        let stream = self.stream.as_mut().unwrap();
        stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("writing to {}: {e}", self.paths.socket.display()))?;
        let begin = format!("BF-BEGIN {id}\n");
        let end = format!("BF-END {id} ");
        let started = Instant::now();
        let mut buf = [0u8; 65536];
        loop {
            if let Some(reply) = self.take_reply(&begin, &end)? {
                if (reply.status == 0 && args[0] == "read") || args[0] == "sh" {
                    let output = base64_decode(&reply.output)
                        .map_err(|e| format!("reply to {}: {e}", args.join(" ")))?;
                    return Ok(Reply { output, ..reply });
                }
                return Ok(reply);
            }
            if started.elapsed() >= timeout {
                return Err(format!(
                    "no reply to `{}` within {timeout:?}; the console printed:\n{}",
                    line.trim_end(),
                    plain_text(&self.pending)
                ));
            }
            let stream = self.stream.as_mut().unwrap();
            match stream.read(&mut buf) {
                Ok(0) => {
                    return Err(format!(
                        "the console socket {} closed (the domain stopped?) while waiting for \
                         `{}`; the console printed:\n{}",
                        self.paths.socket.display(),
                        line.trim_end(),
                        plain_text(&self.pending)
                    ));
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    return Err(format!("reading {}: {e}", self.paths.socket.display()));
                }
            }
        }
    }

    /// A complete reply framed by `begin` and `end` in the pending bytes, consumed with
    /// everything before it.
    fn take_reply(&mut self, begin: &str, end: &str) -> Result<Option<Reply>, String> {
        let Some(b) = find(&self.pending, begin.as_bytes()) else {
            return Ok(None);
        };
        let body = b + begin.len();
        let Some(e) = find(&self.pending[body..], end.as_bytes()).map(|e| body + e) else {
            return Ok(None);
        };
        let Some(eol) = self.pending[e..].iter().position(|&c| c == b'\n') else {
            return Ok(None);
        };
        let status_text = String::from_utf8_lossy(&self.pending[e + end.len()..e + eol])
            .trim()
            .to_owned();
        let status = status_text
            .parse()
            .map_err(|_| format!("channel reply: expected an exit status, got {status_text:?}"))?;
        let output: Vec<u8> = self.pending[body..e]
            .iter()
            .copied()
            .filter(|&c| c != b'\r')
            .collect();
        self.pending.drain(..e + eol + 1);
        Ok(Some(Reply { status, output }))
    }

    fn connect(&mut self) -> Result<(), String> {
        if self.stream.is_none() {
            let stream = UnixStream::connect(&self.paths.socket)
                .map_err(|e| format!("connecting to {}: {e}", self.paths.socket.display()))?;
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| format!("{}: {e}", self.paths.socket.display()))?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// Runs a command that must succeed; panics with its output otherwise.
    fn must(&mut self, args: &[&str], timeout: Duration) -> Reply {
        let reply = self
            .run_with_timeout(args, timeout)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            reply.status,
            0,
            "guest command `{}` failed ({}): {}",
            args.join(" "),
            reply.status,
            String::from_utf8_lossy(&reply.output)
        );
        reply
    }

    /// The content of `path` in the guest (relative paths are in the data partition).
    pub fn read_file(&mut self, path: &str) -> Vec<u8> {
        self.must(&["read", path], COMMAND_TIMEOUT).output
    }

    /// Writes `content` to `path` in the guest and syncs. The content travels base64-encoded
    /// through a 115200-baud serial line read byte by byte: keep it to a few KiB ([`fill`] and
    /// [`write_random`] make large files).
    ///
    /// [`fill`]: Console::fill
    /// [`write_random`]: Console::write_random
    pub fn write_file(&mut self, path: &str, content: &[u8]) {
        let encoded = base64_encode(content);
        let mut args = vec!["write", path];
        if !encoded.is_empty() {
            args.push(&encoded);
        }
        self.must(&args, COMMAND_TIMEOUT);
    }

    /// Writes `mib` MiB of `byte` to `path` in the guest and syncs; the file's SHA-256 (hex).
    pub fn fill(&mut self, path: &str, mib: u64, byte: u8, timeout: Duration) -> String {
        self.must(
            &["fill", path, &mib.to_string(), &byte.to_string()],
            timeout,
        )
        .text()
    }

    /// Writes `mib` MiB from the guest's `/dev/urandom` to `path` and syncs; the file's
    /// SHA-256 (hex).
    pub fn write_random(&mut self, path: &str, mib: u64, timeout: Duration) -> String {
        self.must(&["random", path, &mib.to_string()], timeout)
            .text()
    }

    /// The SHA-256 (hex) of `path` in the guest.
    pub fn sha256(&mut self, path: &str) -> String {
        self.must(&["sha256", path], COMMAND_TIMEOUT).text()
    }

    /// The SHA-256 (hex) of `len` bytes at `offset` of the guest's disk as the guest reads it
    /// (after a sync, with the page cache dropped).
    pub fn disk_sha256(&mut self, offset: u64, len: u64) -> String {
        self.must(
            &["disk-sha256", &offset.to_string(), &len.to_string()],
            COMMAND_TIMEOUT,
        )
        .text()
    }

    /// Runs `script` with the guest's busybox sh in the data partition; its status and its
    /// stdout and stderr together.
    pub fn sh(&mut self, script: &str) -> Result<Reply, String> {
        self.run(&["sh", &base64_encode(script.as_bytes())])
    }

    /// Asks the guest to sync, unmount its data partition and power off. Returns once the
    /// guest acknowledged; the domain stops shortly after.
    pub fn poweroff(&mut self) -> Result<(), String> {
        let reply = self.run(&["poweroff"])?;
        self.stream = None;
        if reply.status == 0 {
            Ok(())
        } else {
            Err(format!("poweroff: status {}", reply.status))
        }
    }
}

/// `bytes` as text (lossy UTF-8) without carriage returns and terminal escape sequences: CSI
/// sequences (`ESC [` parameters, a final byte from `@` to `~`) and two-byte ones (`ESC c`).
pub fn plain_text(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0x1b if bytes.get(i + 1) == Some(&b'[') => {
                i += 2;
                while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                    i += 1;
                }
                i += 1;
            }
            0x1b => i += 2,
            b'\r' => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, on one line (what busybox's `base64 -d` reads).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64 as busybox's `base64` prints it (lines of 76 characters); whitespace is
/// skipped.
pub fn base64_decode(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' | b' ' => continue,
            _ => return Err(format!("expected base64, found byte {c:#04x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// A test guest running as a libvirt domain on `qemu:///system` that this value defined: it is
/// destroyed and undefined when dropped (its image is the caller's). Its console files live in a
/// temporary directory of its own.
pub struct Guest {
    name: String,
    accel: Accel,
    /// Holds the console's socket and log, and the domain XML.
    dir: tempfile::TempDir,
    console: Console,
    /// When the domain was last started, for the boot time.
    started: Instant,
}

impl Guest {
    /// Defines and starts a domain named `bf-guest-PID-N` booting `layout`'s disk as `vda`, on
    /// the accelerator [`Accel::detect`] picks. Does not wait for the boot: see
    /// [`Guest::wait_booted`]. QEMU runs as libvirt-qemu: the image's directory must let it
    /// through ([`make_traversable`]); libvirt chowns the image itself while the domain runs.
    pub fn start(layout: &DiskLayout) -> Result<Guest, String> {
        Self::start_disks(vec![(
            "vda".to_owned(),
            DiskSource::File {
                path: layout.path.clone(),
                format: layout.format,
            },
        )])
    }

    /// [`Guest::start`] with disks of any source (the first boots).
    pub fn start_disks(disks: Vec<(String, DiskSource)>) -> Result<Guest, String> {
        let name = format!(
            "bf-guest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        make_traversable(dir.path());
        let (accel, _) = Accel::detect();
        let spec = DomainSpec {
            name: name.clone(),
            accel,
            memory_mib: MEMORY_MIB,
            disks,
            console: ConsolePaths::in_dir(dir.path()),
        };
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, domain_xml(&spec))
            .map_err(|e| format!("writing {}: {e}", xml_path.display()))?;
        try_virsh(&["define", xml_path.to_str().unwrap()])?;
        let mut guest = Guest {
            name,
            accel,
            console: Console::new(spec.console.clone()),
            dir,
            started: Instant::now(),
        };
        guest.start_again()?;
        Ok(guest)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The directory holding the console's socket and log and the domain XML.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// Waits for [`BOOT_LINE`]; the time from the domain's start to the line. The error holds
    /// the console's output and the domain's state. Gives up early when the domain stops running
    /// (a KVM emulation failure pauses it, a crash stops it) or the guest printed [`BOOT_FAIL`].
    pub fn wait_booted(&self, deadline: Duration) -> Result<Duration, String> {
        loop {
            let left = deadline.saturating_sub(self.started.elapsed());
            let result = self.console.wait_booted(left.min(Duration::from_secs(1)));
            let state = self.state();
            match result {
                Ok(_) => return Ok(self.started.elapsed()),
                Err(e) if left.is_zero() || e.contains(BOOT_FAIL) => {}
                Err(_) if !state.starts_with("running") => {}
                Err(_) => continue,
            }
            return Err(format!(
                "domain {} ({:?}, state {state}) did not print {BOOT_LINE} in the {:?} since it \
                 started; its console printed:\n{}",
                self.name,
                self.accel,
                self.started.elapsed(),
                self.console.output()
            ));
        }
    }

    /// `virsh domstate --reason`, such as `running (booted)` or `shut off (destroyed)`.
    pub fn state(&self) -> String {
        try_virsh(&["domstate", &self.name, "--reason"])
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| e)
    }

    /// Whether the domain runs (or is paused): QEMU is up.
    pub fn is_active(&self) -> bool {
        try_virsh(&["domid", &self.name]).is_ok_and(|id| id.trim() != "-")
    }

    /// Powers the guest off through the channel (it syncs and unmounts first) and waits up to
    /// `deadline` for the domain to stop.
    pub fn poweroff(&mut self, deadline: Duration) -> Result<(), String> {
        self.console.poweroff()?;
        self.wait_stopped(deadline, "the guest acknowledged poweroff")
    }

    /// `virsh shutdown` (the ACPI power button: the guest syncs, unmounts and powers off) and
    /// waits up to `deadline` for the domain to stop.
    pub fn shutdown(&mut self, deadline: Duration) -> Result<(), String> {
        try_virsh(&["shutdown", &self.name])?;
        self.console.stream = None;
        self.wait_stopped(deadline, "virsh shutdown")
    }

    fn wait_stopped(&self, deadline: Duration, what: &str) -> Result<(), String> {
        let started = Instant::now();
        while self.is_active() {
            if started.elapsed() >= deadline {
                return Err(format!(
                    "domain {} still runs {deadline:?} after {what} (state {}); its console \
                     printed:\n{}",
                    self.name,
                    self.state(),
                    self.console.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the domain at once (`virsh destroy`), if it runs.
    pub fn destroy(&self) {
        if self.is_active() {
            let _ = try_virsh(&["destroy", &self.name]);
        }
    }

    /// Starts the (shut-off) domain again; the console watches the new boot.
    pub fn start_again(&mut self) -> Result<(), String> {
        self.console.new_boot();
        self.started = Instant::now();
        try_virsh(&["start", &self.name]).map(drop)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.destroy();
        // A guest that was backed up has checkpoints, which a plain undefine refuses.
        let _ = try_virsh(&["undefine", &self.name, "--checkpoints-metadata"])
            .or_else(|_| try_virsh(&["undefine", &self.name]));
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{}.log", self.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..40 {
            let encoded = base64_encode(&data[..len]);
            assert_eq!(encoded.len() % 4, 0);
            assert_eq!(base64_decode(encoded.as_bytes()).unwrap(), &data[..len]);
        }
        assert_eq!(base64_encode(b"hello\n"), "aGVsbG8K");
        assert_eq!(base64_decode(b"aGVs\nbG8K\n").unwrap(), b"hello\n".to_vec());
        assert!(base64_decode(b"a*").is_err());
    }

    #[test]
    fn console_text_has_no_escape_sequences() {
        assert_eq!(
            plain_text(b"\x1bc\x1b[?7l\x1b[2JLo\x1b[06;02H\x1b[06;03Hading\r\nok"),
            "Loading\nok"
        );
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko\n\
             kernel/lib/crc16.ko:\nkernel/fs/jbd2/jbd2.ko: kernel/lib/crc16.ko\n\
             kernel/drivers/block/virtio_blk.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["ext4", "virtio", "virtio_blk"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/lib/crc16.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko.xz",
                "kernel/drivers/block/virtio_blk.ko"
            ]
        );
        assert_eq!(module_file_name("kernel/fs/ext4/ext4.ko.xz"), "ext4.ko");
        let missing = module_load_order(dir.path(), &["xfs"]).unwrap_err();
        assert!(missing.contains("no module xfs"), "{missing}");
        std::fs::write(dir.path().join("modules.dep"), "garbage\n").unwrap();
        let bad = module_load_order(dir.path(), &["ext4"]).unwrap_err();
        assert!(bad.contains("line 1"), "{bad}");
    }

    #[test]
    fn domain_xml_names_the_disks_and_the_console() {
        let xml = domain_xml(&DomainSpec {
            name: "g<1>".into(),
            accel: Accel::Tcg,
            memory_mib: 128,
            disks: vec![
                (
                    "vda".into(),
                    DiskSource::File {
                        path: "/tmp/a.qcow2".into(),
                        format: ImageFormat::Qcow2,
                    },
                ),
                (
                    "vdb".into(),
                    DiskSource::NbdUnix {
                        socket: "/run/x.sock".into(),
                        export: "vdb".into(),
                        read_only: true,
                    },
                ),
            ],
            console: ConsolePaths::in_dir(Path::new("/tmp/c")),
        });
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(xml.contains("<name>g&lt;1&gt;</name>"), "{xml}");
        assert!(
            xml.contains("type='qcow2'/>\n      <source file='/tmp/a.qcow2'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<host transport='unix' socket='/run/x.sock'/>"),
            "{xml}"
        );
        assert!(xml.contains("<readonly/>"), "{xml}");
        assert!(
            xml.contains("<source mode='bind' path='/tmp/c/console.sock'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<log file='/tmp/c/console.log' append='on'/>"),
            "{xml}"
        );
        assert!(!xml.contains("<cpu"), "{xml}");
    }
}
