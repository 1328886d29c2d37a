//! `backflow demo`: the whole cycle on a real running libvirt VM, with no configuration.
//!
//! A generated OS-like image becomes the qcow2 disk of a throwaway domain `backflow-demo` (no OS:
//! SeaBIOS idles, which is all a backup needs) on `qemu:///system`. It is backed up twice with
//! `specs/backup-vm.yaml` (a libvirt pull-mode backup job; the second run reads only what the
//! checkpoint of the first recorded), with 5% of the disk written through the guest's disk device
//! (QEMU's monitor) in between. Both restore points are restored as raw images and compared with
//! copies of the disk taken at each backup, and the second is restored as a new running domain
//! `backflow-demo-restored` with `specs/restore-vm.yaml`. Both domains are destroyed and undefined
//! at the end, whether the demo succeeded or not.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use backflow_pipeline::{RunReport, spec};
use backflow_repository::Repository;
use backflow_stages::Stages;

use crate::{BACKUP_VM_SPEC, RESTORE_SPEC, RESTORE_VM_SPEC, run_pipeline};

/// The libvirt connection of the demo: the system QEMU driver, where QEMU runs as libvirt-qemu.
const URI: &str = "qemu:///system";
/// The throwaway domain that is backed up.
const DOMAIN: &str = "backflow-demo";
/// The domain the second restore point is restored as.
const RESTORED: &str = "backflow-demo-restored";
/// Memory of the demo domain: enough for SeaBIOS.
const MEMORY_MIB: u32 = 64;
/// The guest writes between the backups: about this many, scattered, 5% of the disk in all.
const WRITES: u64 = 50;
const MIB: f64 = 1024.0 * 1024.0;

pub fn run(dir: &Path, size: u64) -> Result<()> {
    if size < 16 << 20 {
        bail!("--size must be at least 16M");
    }
    let size = size.next_multiple_of(64 << 10);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    // QEMU runs as libvirt-qemu: it must get through every directory down to the images.
    make_traversable(&dir)?;
    check_traversable(&dir)?;
    check_libvirt()?;

    let raw = dir.join("disk.img");
    let image = dir.join("disk.qcow2");
    let repo = dir.join("repo");
    let copies = [
        dir.join("disk-at-backup-1.raw"),
        dir.join("disk-at-backup-2.raw"),
    ];
    let restored_vm_dir = dir.join("restored-vm");

    // A previous demo's domains (their disks are in this directory) go; any other domain of
    // these names is the user's, and stops the demo before anything is touched.
    for name in [RESTORED, DOMAIN] {
        remove_previous_demo_domain(name, &dir)?;
    }
    for old in [&repo, &restored_vm_dir] {
        if old.exists() {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("removing the old {}", old.display()))?;
        }
    }
    remove_old_restores(&dir)?;
    let mut summary = Vec::new();

    step(&format!(
        "generating a {} MiB disk image {}",
        size >> 20,
        image.display()
    ));
    let stats = backflow_fixtures::generate_image(&raw, size, 1)
        .with_context(|| format!("generating {}", raw.display()))?;
    let mix: Vec<String> = backflow_fixtures::Category::ALL
        .iter()
        .map(|c| {
            format!(
                "{} {:.0}%",
                c.name(),
                100.0 * stats.bytes(*c) as f64 / stats.size as f64
            )
        })
        .collect();
    println!("{} files; {}", stats.files, mix.join(", "));
    tool(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&image),
        "qemu-img (package qemu-utils)",
    )?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    println!(
        "converted to qcow2: {} ({:.1} MiB on disk)",
        image.display(),
        allocated(&image) as f64 / MIB
    );
    Repository::init(&repo, backflow_repository::DEFAULT_CHUNK_SIZE)?;

    // From here on, the domains this demo defines are destroyed and undefined however it ends.
    let mut domains = Domains(Vec::new());
    step(&format!("starting the throwaway VM {DOMAIN} on {URI}"));
    domains.0.push(DOMAIN.to_owned());
    let kind = define_and_start(&dir, &image)?;
    println!(
        "{DOMAIN} runs ({kind}, {MEMORY_MIB} MiB, no OS, no network): its disk vda is {}",
        image.display()
    );

    step("backup 1 (full) with specs/backup-vm.yaml");
    println!(
        "freeze=off: this VM has no guest agent. A VM with one (qemu-guest-agent) gets its \
         filesystems frozen while the backup job starts (freeze=auto, the spec's default)."
    );
    let started = Instant::now();
    let first = backup(&repo)?;
    summary.push(stage_line("backup 1 (full)", &first, size));
    let first_id = first
        .snapshot
        .clone()
        .context("backup 1 committed no snapshot")?;
    // No guest write since the backup job began, so the file is the disk as backed up.
    copy_disk(&image, &copies[0])?;
    println!(
        "snapshot {first_id} in {:.1} s; a copy of the disk as it was: {}",
        started.elapsed().as_secs_f64(),
        copies[0].display()
    );

    step("changing 5% of the disk through the guest's disk device (QEMU monitor)");
    let writes = guest_writes(size);
    let started = Instant::now();
    for (i, (offset, len)) in writes.iter().enumerate() {
        let pattern = 0x40 + (i % 0x80);
        monitor_qemu_io(&format!("write -P {pattern:#04x} {offset} {len}"))?;
    }
    monitor_qemu_io("flush")?;
    let changed: u64 = writes.iter().map(|(_, len)| len).sum();
    println!(
        "{} writes of {} KiB at scattered offsets, {} MiB changed ({:.1}% of the disk) in {:.1} s",
        writes.len(),
        writes[0].1 >> 10,
        changed >> 20,
        100.0 * changed as f64 / size as f64,
        started.elapsed().as_secs_f64()
    );

    step("backup 2 (incremental: what the checkpoint of backup 1 recorded)");
    let second = backup(&repo)?;
    summary.push(stage_line("backup 2 (incremental)", &second, size));
    let second_id = second
        .snapshot
        .clone()
        .context("backup 2 committed no snapshot")?;
    copy_disk(&image, &copies[1])?;
    println!(
        "snapshot {second_id}: read {:.1} MiB of the {} MiB disk ({:.1}%): the {} MiB the guest \
         wrote, in whole {} KiB chunks",
        second.source_bytes_read as f64 / MIB,
        size >> 20,
        100.0 * second.source_bytes_read as f64 / size as f64,
        changed >> 20,
        backflow_repository::DEFAULT_CHUNK_SIZE >> 10
    );

    for (id, copy) in [(&first_id, &copies[0]), (&second_id, &copies[1])] {
        step(&format!("restoring snapshot {id} as a raw image"));
        let out = dir.join(format!("restored-{id}.img"));
        let started = Instant::now();
        restore(&repo, id, &out)?;
        let seconds = started.elapsed().as_secs_f64();
        compare("raw", &out, copy)?;
        summary.push(format!(
            "restore {id}: {} MiB in {seconds:.1} s, identical to the disk at its backup",
            size >> 20
        ));
    }

    step(&format!(
        "restoring snapshot {second_id} as a new VM {RESTORED} (specs/restore-vm.yaml)"
    ));
    std::fs::create_dir(&restored_vm_dir)
        .with_context(|| format!("creating {}", restored_vm_dir.display()))?;
    make_traversable(&restored_vm_dir)?;
    domains.0.push(RESTORED.to_owned());
    let started = Instant::now();
    restore_vm(&repo, &second_id, &restored_vm_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    let state = virsh(&["domstate", RESTORED])?;
    let state = state.trim();
    println!("virsh domstate {RESTORED}: {state}");
    if state != "running" {
        bail!("the restored domain {RESTORED} is {state}, not running");
    }
    let restored_disk = restored_vm_dir.join("vda.qcow2");
    compare("qcow2", &restored_disk, &copies[1])?;
    summary.push(format!(
        "restore {second_id} as VM {RESTORED}: defined, started and running in {seconds:.1} s"
    ));

    step("verifying every chunk of the repository");
    let repository = Repository::open(&repo)?;
    let report = repository.verify(true)?;
    print!("{}", crate::verify_text(&report, repository.location()));
    if !report.is_ok() {
        bail!("verify found damage");
    }

    step("removing the demo's VMs");
    drop(domains);
    println!("{RESTORED} and {DOMAIN} destroyed and undefined (with their checkpoints)");

    step("summary");
    for line in &summary {
        println!("{line}");
    }
    println!(
        "\ndemo done: a running VM backed up twice through libvirt (full, then incremental from \
         its checkpoint), both restore points restored byte-identical, the second also as a VM \
         that ran; files are in {}",
        dir.display()
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn stage_line(what: &str, report: &RunReport, size: u64) -> String {
    format!(
        "{what}: read {:.1} MiB of {} MiB ({:.1}%), wrote {:.1} MiB to the repository, {:.1} s",
        report.source_bytes_read as f64 / MIB,
        size >> 20,
        100.0 * report.source_bytes_read as f64 / size as f64,
        report.repo_bytes_written as f64 / MIB,
        report.wall_seconds
    )
}

/// The domains the demo defined: destroyed and undefined (checkpoints too) when dropped, so that
/// a failed demo leaves none behind.
struct Domains(Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for name in self.0.iter().rev() {
            remove_domain(name);
        }
    }
}

/// Destroys and undefines domain `name`, ignoring failures (it may not run, or not exist).
fn remove_domain(name: &str) {
    let _ = virsh(&["destroy", name]);
    if virsh(&["undefine", name, "--checkpoints-metadata"]).is_err() {
        let _ = virsh(&["undefine", name]);
    }
}

/// Removes domain `name` when a previous demo in `dir` left it (every disk of it is in `dir`);
/// fails, touching nothing, when a domain of that name is something else.
fn remove_previous_demo_domain(name: &str, dir: &Path) -> Result<()> {
    if virsh(&["dominfo", name]).is_err() {
        return Ok(());
    }
    let list = virsh(&["domblklist", name])?;
    let sources: Vec<&str> = list
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let ours = !sources.is_empty() && sources.iter().all(|s| Path::new(s).starts_with(dir));
    if !ours {
        bail!(
            "a domain named {name} exists on {URI} and was not made by a demo in {}; remove it \
             with `virsh -c {URI} destroy {name}; virsh -c {URI} undefine --checkpoints-metadata \
             {name}` if it is not needed, or use another --dir if it is a demo's",
            dir.display()
        );
    }
    println!(
        "removing {name}, left by a previous demo in {}",
        dir.display()
    );
    remove_domain(name);
    if virsh(&["dominfo", name]).is_ok() {
        bail!("could not remove the previous demo's domain {name}");
    }
    Ok(())
}

fn remove_old_restores(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("restored-") && name.ends_with(".img") {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the old {}", path.display()))?;
        }
    }
    Ok(())
}

/// Defines and starts the demo domain on `image`: KVM when /dev/kvm exists and the domain starts
/// with it, plain emulation (TCG) otherwise. Returns the domain type.
fn define_and_start(dir: &Path, image: &Path) -> Result<&'static str> {
    let kinds: &[&'static str] = if Path::new("/dev/kvm").exists() {
        &["kvm", "qemu"]
    } else {
        &["qemu"]
    };
    let mut errors = Vec::new();
    for kind in kinds {
        let xml_path = dir.join(format!("{DOMAIN}-{kind}.xml"));
        std::fs::write(&xml_path, domain_xml(kind, image))
            .with_context(|| format!("writing {}", xml_path.display()))?;
        let xml = xml_path.display().to_string();
        match virsh(&["define", &xml]).and_then(|_| virsh(&["start", DOMAIN])) {
            Ok(_) => return Ok(kind),
            Err(e) => {
                errors.push(format!("{e:#}"));
                remove_domain(DOMAIN);
            }
        }
    }
    bail!("the demo domain does not start:\n{}", errors.join("\n"))
}

/// The demo domain: no OS, no NIC, no graphics; one qcow2 virtio disk.
fn domain_xml(kind: &str, image: &Path) -> String {
    // No <cpu>: host-model and host-passthrough abort QEMU on some hosts ("failed to set MSR").
    format!(
        "<domain type='{kind}'>\n  <name>{DOMAIN}</name>\n  \
         <memory unit='MiB'>{MEMORY_MIB}</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  \
         <features><acpi/></features>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n    \
         <disk type='file' device='disk'>\n      \
         <driver name='qemu' type='qcow2'/>\n      \
         <source file='{}'/>\n      \
         <target dev='vda' bus='virtio'/>\n    </disk>\n    \
         <memballoon model='none'/>\n  </devices>\n</domain>\n",
        xml_escape(&image.display().to_string())
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// About 5% of a disk of `size` bytes as about [`WRITES`] writes `(offset, length)`, 64 KiB
/// aligned, one at a pseudo-random place in each of as many equal slices of the disk (so none
/// overlap).
fn guest_writes(size: u64) -> Vec<(u64, u64)> {
    const ALIGN: u64 = 64 << 10;
    let target = size / 20;
    let len = (target / WRITES / ALIGN * ALIGN).max(ALIGN);
    let count = target.div_ceil(len);
    let slice = size / count / ALIGN * ALIGN;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            // xorshift64: the same offsets on every run.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let room = (slice - len) / ALIGN + 1;
            (i * slice + state % room * ALIGN, len)
        })
        .collect()
}

/// Runs one `qemu-io` command through the demo domain's disk device, as a guest write would
/// (dirty bitmaps and backup jobs see it). HMP replies nothing on success and an error text
/// (with exit status 0) on failure.
fn monitor_qemu_io(command: &str) -> Result<()> {
    let hmp = format!("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"{command}\"");
    let reply = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", &hmp])?;
    if !reply.trim().is_empty() {
        bail!("{hmp} on {DOMAIN} failed: {}", reply.trim());
    }
    Ok(())
}

/// Runs `virsh -c qemu:///system ARGS`; its stdout, or an error with its output.
fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .context("running virsh (package libvirt-clients; scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "virsh {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check_libvirt() -> Result<()> {
    virsh(&["uri"]).with_context(|| {
        format!(
            "no libvirtd answers at {URI}: the demo runs a VM there (run it through \
             `bash scripts/demo.sh`, or start one with `bash scripts/libvirtd.sh start`)"
        )
    })?;
    Ok(())
}

fn tool(command: &mut Command, what: &str) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A raw copy of the running domain's disk as the file holds it now (`-U`: QEMU holds the
/// image's lock; guest writes were flushed, so the file is complete).
fn copy_disk(image: &Path, to: &Path) -> Result<()> {
    tool(
        Command::new("qemu-img")
            .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(to),
        "qemu-img (package qemu-utils)",
    )
}

/// Compares image `a` (of `format`) with the raw image `b`, contents only.
fn compare(format: &str, a: &Path, b: &Path) -> Result<()> {
    tool(
        Command::new("qemu-img")
            .args(["compare", "-U", "-q", "-f", format, "-F", "raw"])
            .arg(a)
            .arg(b),
        "qemu-img compare",
    )
    .with_context(|| format!("{} and {} differ", a.display(), b.display()))?;
    println!(
        "qemu-img compare {} {}: identical",
        a.display(),
        b.display()
    );
    Ok(())
}

/// Bytes allocated to a file (it may be sparse).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn make_traversable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} traversable", dir.display()))
}

/// Fails when a directory above `dir` keeps other users (QEMU's libvirt-qemu) out.
fn check_traversable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)
            .with_context(|| format!("reading {}", ancestor.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            bail!(
                "{} is not traversable by other users (mode {:o}): QEMU runs as libvirt-qemu and \
                 could not reach the VM's disk; choose a --dir under /tmp or /var/lib, or \
                 `chmod o+x {}`",
                ancestor.display(),
                mode & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

fn backup(repo: &Path) -> Result<RunReport> {
    let vars = vec![
        ("domain".to_owned(), DOMAIN.to_owned()),
        ("repo".to_owned(), repo.display().to_string()),
        ("uri".to_owned(), URI.to_owned()),
        ("freeze".to_owned(), "off".to_owned()),
    ];
    let (name, text) = BACKUP_VM_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(crate::spec_errors)?;
    run_pipeline(&pipeline, None, crate::display::Output::Summary)
}

fn restore(repo: &Path, snapshot: &str, to: &Path) -> Result<()> {
    let vars = vec![
        ("repo".to_owned(), repo.display().to_string()),
        ("snapshot".to_owned(), snapshot.to_owned()),
        ("disk".to_owned(), String::new()),
        ("to".to_owned(), to.display().to_string()),
    ];
    let (name, text) = RESTORE_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(crate::spec_errors)?;
    run_pipeline(&pipeline, None, crate::display::Output::Summary)?;
    Ok(())
}

fn restore_vm(repo: &Path, snapshot: &str, to: &Path) -> Result<()> {
    let vars = vec![
        ("repo".to_owned(), repo.display().to_string()),
        ("snapshot".to_owned(), snapshot.to_owned()),
        ("to".to_owned(), to.display().to_string()),
        ("name".to_owned(), RESTORED.to_owned()),
        ("uri".to_owned(), URI.to_owned()),
        ("start".to_owned(), "true".to_owned()),
    ];
    let (name, text) = RESTORE_VM_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(crate::spec_errors)?;
    run_pipeline(&pipeline, None, crate::display::Output::Summary)?;
    Ok(())
}
