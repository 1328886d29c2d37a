//! Makes the bootable test guest of `backflow_testkit::guest` for a shell script (the instant
//! recovery benchmark, `benches/e2e-instant.sh`), so that scripts boot the same guest as the tests:
//!
//! ```text
//! backflow-test-guest disk SIZE OUT [--data FILE]...   a bootable disk (qcow2 if OUT ends in
//!                                                      .qcow2, raw otherwise) of SIZE bytes
//!                                                      (suffix K, M, G); each FILE is copied
//!                                                      into the data partition under its name
//! backflow-test-guest xml NAME DISK CONSOLE_DIR        the domain XML (stdout) booting DISK as
//!                                                      vda, its console in CONSOLE_DIR
//!                                                      (console.sock, console.log; made, 0755)
//! backflow-test-guest boot-line                        prints the line a booted guest prints
//! ```
//!
//! Errors go to stderr with exit status 1 (2 for bad usage).

use std::path::{Path, PathBuf};

use backflow_testkit::guest::{
    Accel, BOOT_LINE, ConsolePaths, DiskSource, DomainSpec, GuestDisk, ImageFormat, MEMORY_MIB,
    domain_xml,
};

const USAGE: &str = "usage: backflow-test-guest disk SIZE OUT [--data FILE]... | \
                     xml NAME DISK CONSOLE_DIR | boot-line";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("disk") if args.len() >= 3 => disk(&args[1], Path::new(&args[2]), &args[3..]),
        Some("xml") if args.len() == 4 => xml(&args[1], Path::new(&args[2]), Path::new(&args[3])),
        Some("boot-line") if args.len() == 1 => {
            println!("{BOOT_LINE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("backflow-test-guest: {e}");
        std::process::exit(1);
    }
}

fn format_of(path: &Path) -> ImageFormat {
    if path.extension().is_some_and(|e| e == "qcow2") {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}

/// A size in bytes with an optional binary suffix (K, M, G).
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("size {text:?}: expected a number of bytes with K, M or G"))
}

fn disk(size: &str, out: &Path, rest: &[String]) -> Result<(), String> {
    let mut recipe = GuestDisk::new(parse_size(size)?).format(format_of(out));
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let file = match (flag.as_str(), rest.next()) {
            ("--data", Some(file)) => PathBuf::from(file),
            _ => return Err(format!("{flag:?}: expected --data FILE\n{USAGE}")),
        };
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("--data {}: expected a file name", file.display()))?
            .to_owned();
        let content =
            std::fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        recipe = recipe.file(&name, content);
    }
    let layout = recipe.build(out)?;
    println!(
        "{}: {} bytes, boot partition at {}, data partition at {} ({} bytes)",
        layout.path.display(),
        layout.size,
        layout.boot_partition.0,
        layout.data_partition.0,
        layout.data_partition.1
    );
    Ok(())
}

fn xml(name: &str, disk: &Path, console_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let disk = std::path::absolute(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    std::fs::create_dir_all(console_dir)
        .and_then(|()| {
            std::fs::set_permissions(console_dir, std::fs::Permissions::from_mode(0o755))
        })
        .map_err(|e| format!("making {}: {e}", console_dir.display()))?;
    let console_dir = std::fs::canonicalize(console_dir)
        .map_err(|e| format!("{}: {e}", console_dir.display()))?;
    let (accel, why) = Accel::detect();
    eprintln!("backflow-test-guest: {accel:?} ({why})");
    let spec = DomainSpec {
        name: name.to_owned(),
        accel,
        memory_mib: MEMORY_MIB,
        disks: vec![(
            "vda".to_owned(),
            DiskSource::File {
                format: format_of(&disk),
                path: disk,
            },
        )],
        console: ConsolePaths::in_dir(&console_dir),
    };
    print!("{}", domain_xml(&spec));
    Ok(())
}
