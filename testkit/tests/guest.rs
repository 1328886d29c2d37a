//! The bootable test guest under the machine's libvirtd (`qemu:///system`): it boots and prints
//! its line, keeps what it wrote across a poweroff, reads its disk as the host does, and a disk
//! made not to boot shows why on its console. Boot times are printed (informational: no timed
//! asserts).

use std::path::Path;
use std::time::Duration;

use backflow_testkit::guest::{
    BOOT_LINE, Boot, DiskLayout, Guest, GuestDisk, ImageFormat, KNOWN_CONTENT, KNOWN_FILE,
    NO_BOOTABLE_DEVICE, NO_KERNEL,
};
use backflow_testkit::libvirt::{domain_names, make_traversable};
use backflow_testkit::qemu::run_tool;

/// Generous for TCG on two shared cores (a boot takes seconds).
const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// How long a disk that must not boot is watched for the boot line.
const NO_BOOT_WATCH: Duration = Duration::from_secs(30);

const DISK_SIZE: u64 = 64 << 20;

fn image_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bf-guest-test-")
        .tempdir()
        .unwrap();
    make_traversable(dir.path());
    dir
}

/// The SHA-256 (hex) of `len` bytes at `offset` of the raw image `path`, read on the host.
fn host_sha256(path: &Path, offset: u64, len: u64) -> String {
    let bytes = std::fs::read(path).unwrap();
    let range = &bytes[offset as usize..(offset + len) as usize];
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), range).unwrap();
    String::from_utf8(run_tool("sha256sum", &[tmp.path().to_str().unwrap()]))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn boot(layout: &DiskLayout) -> Guest {
    let guest = Guest::start(layout).unwrap();
    let took = guest.wait_booted(BOOT_DEADLINE).unwrap();
    eprintln!(
        "boot time of {} ({:?}, {} MiB {:?} disk): {took:?}",
        guest.name(),
        guest.accel(),
        layout.size >> 20,
        layout.format
    );
    guest
}

#[test]
fn the_guest_boots_prints_its_line_and_answers() {
    let dir = image_dir();
    let layout = GuestDisk::new(DISK_SIZE)
        .file("dir/nested.bin", vec![7u8; 3000])
        .build(&dir.path().join("disk.img"))
        .unwrap();
    let mut guest = boot(&layout);
    assert!(guest.console().output().contains(BOOT_LINE));
    let console = guest.console();
    assert_eq!(console.run(&["ping"]).unwrap().text(), "pong");
    assert_eq!(console.read_file(KNOWN_FILE), KNOWN_CONTENT);
    assert_eq!(console.read_file("dir/nested.bin"), vec![7u8; 3000]);
    // A failing command is a status, not a broken channel.
    let missing = console.run(&["read", "no-such-file"]).unwrap();
    assert_ne!(missing.status, 0);
    let sh = console.sh("echo out; echo err >&2; exit 3").unwrap();
    assert_eq!((sh.status, sh.text()), (3, "out\nerr".to_owned()));
    let unknown = console.run(&["frobnicate"]).unwrap();
    assert_ne!(unknown.status, 0);
    assert!(unknown.text().contains("unknown command"), "{unknown:?}");
    // A fill's checksum is the host's for the same bytes.
    let filled = console.fill("filled.bin", 2, 0xab, Duration::from_secs(120));
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), vec![0xabu8; 2 << 20]).unwrap();
    let expected =
        String::from_utf8(run_tool("sha256sum", &[tmp.path().to_str().unwrap()])).unwrap();
    assert_eq!(filled, expected.split_whitespace().next().unwrap());
    assert_eq!(console.sha256("filled.bin"), filled);
    let random = console.write_random("random.bin", 1, Duration::from_secs(120));
    assert_eq!(console.sha256("random.bin"), random);
    assert_ne!(random, filled);
}

/// On the benchmark's disk: 2 GiB, qcow2.
#[test]
fn a_written_file_survives_a_poweroff_and_a_new_boot() {
    let dir = image_dir();
    let started = std::time::Instant::now();
    let layout = GuestDisk::new(2 << 30)
        .format(ImageFormat::Qcow2)
        .build(&dir.path().join("disk.qcow2"))
        .unwrap();
    eprintln!(
        "2 GiB qcow2 guest disk made in {:?} ({} bytes on the host)",
        started.elapsed(),
        std::fs::metadata(&layout.path).unwrap().len()
    );
    let info = backflow_testkit::qemu::image_info(&layout.path);
    assert_eq!(info["virtual-size"], 2u64 << 30);
    let mut guest = boot(&layout);
    let content: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    guest.console().write_file("written.bin", &content);
    guest.console().write_file("empty", b"");
    guest.poweroff(Duration::from_secs(60)).unwrap();
    assert!(guest.state().starts_with("shut off"), "{}", guest.state());
    guest.start_again().unwrap();
    let took = guest.wait_booted(BOOT_DEADLINE).unwrap();
    eprintln!("second boot of {}: {took:?}", guest.name());
    assert_eq!(guest.console().read_file("written.bin"), content);
    assert_eq!(guest.console().read_file("empty"), b"");
    assert_eq!(guest.console().read_file(KNOWN_FILE), KNOWN_CONTENT);
}

#[test]
fn the_guest_reads_its_disk_as_the_host_does() {
    let dir = image_dir();
    let path = dir.path().join("disk.img");
    let layout = GuestDisk::new(DISK_SIZE).build(&path).unwrap();
    let mut guest = boot(&layout);
    // Sector 0 (the MBR), a range across the boot partition's start, the data partition's
    // superblock area: the guest's reads give the host's bytes.
    let (data_start, _) = layout.data_partition;
    let ranges = [
        (0, 512),
        (layout.boot_partition.0 - 4096, 1 << 20),
        (data_start, 64 << 10),
    ];
    let console = guest.console();
    let guest_sums: Vec<String> = ranges
        .iter()
        .map(|&(offset, len)| console.disk_sha256(offset, len))
        .collect();
    // The ACPI power button powers it off too (then the image is complete on the host).
    guest.shutdown(Duration::from_secs(60)).unwrap();
    assert!(guest.state().starts_with("shut off"), "{}", guest.state());
    for (&(offset, len), guest_sum) in ranges.iter().zip(&guest_sums) {
        assert_eq!(
            *guest_sum,
            host_sha256(&path, offset, len),
            "bytes {offset}+{len}"
        );
    }
}

#[test]
fn a_disk_with_a_zeroed_boot_sector_does_not_boot() {
    let dir = image_dir();
    let layout = GuestDisk::new(DISK_SIZE)
        .boot(Boot::ZeroedBootSector)
        .build(&dir.path().join("disk.img"))
        .unwrap();
    let image = std::fs::read(&layout.path).unwrap();
    assert!(image[..512].iter().all(|&b| b == 0));
    let mut guest = Guest::start(&layout).unwrap();
    let err = guest.wait_booted(NO_BOOT_WATCH).unwrap_err();
    assert!(err.contains(NO_BOOTABLE_DEVICE), "{err}");
    let output = guest.console().output();
    assert!(output.contains(NO_BOOTABLE_DEVICE), "{output}");
    eprintln!("console of the disk with a zeroed boot sector:\n{output}");
}

#[test]
fn a_disk_without_a_kernel_does_not_boot() {
    let dir = image_dir();
    let layout = GuestDisk::new(DISK_SIZE)
        .boot(Boot::NoKernel)
        .build(&dir.path().join("disk.img"))
        .unwrap();
    let mut guest = Guest::start(&layout).unwrap();
    guest.console().wait_for(NO_KERNEL, NO_BOOT_WATCH).unwrap();
    let output = guest.console().output();
    assert!(!output.contains(BOOT_LINE), "{output}");
    eprintln!("console of the disk without a kernel:\n{output}");
}

#[test]
fn a_disk_below_the_minimum_size_is_refused_with_the_minimum() {
    let dir = image_dir();
    let err = GuestDisk::new(16 << 20)
        .build(&dir.path().join("disk.img"))
        .unwrap_err();
    assert!(err.contains("at least"), "{err}");
    let err = GuestDisk::new(DISK_SIZE)
        .file("../escape", b"x".to_vec())
        .build(&dir.path().join("disk.img"))
        .unwrap_err();
    assert!(err.contains("../escape"), "{err}");
}

#[test]
fn dropped_guests_leave_no_domain() {
    let dir = image_dir();
    let layout = GuestDisk::new(DISK_SIZE)
        .build(&dir.path().join("disk.img"))
        .unwrap();
    let guest = Guest::start(&layout).unwrap();
    let name = guest.name().to_owned();
    assert!(domain_names().contains(&name));
    drop(guest);
    assert!(!domain_names().contains(&name));
}
