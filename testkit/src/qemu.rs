//! Driving QEMU's tools from tests, and checking the processes they leave behind.
//!
//! Tests that use these need `qemu-img`, `qemu-io` and `qemu-nbd` on the PATH and fail, never
//! skip, when one is missing: every helper that runs a tool panics naming it, with its output.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `command` and returns its output. Panics naming the program when it cannot be started
/// ("... is required for these tests") or exits unsuccessfully (with its stdout and stderr).
pub fn run_command(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for these tests: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `program` with `args` as [`run_command`] does; returns its stdout.
pub fn run_tool(program: &str, args: &[&str]) -> Vec<u8> {
    run_command(Command::new(program).args(args)).stdout
}

/// Runs the `qemu-io` `commands` (such as `write -P 0xab 1M 256k`) on the qcow2 `image`, in one
/// process.
pub fn qemu_io(image: &Path, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "qcow2"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    run_command(command.arg(image));
}

/// Creates a qcow2 `image` of `size` (in `qemu-img` syntax, such as `64M`), then applies the
/// `qemu-io` `writes` to it (none: an image with nothing allocated).
pub fn make_qcow2(image: &Path, size: &str, writes: &[&str]) {
    run_command(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image)
            .arg(size),
    );
    if !writes.is_empty() {
        qemu_io(image, writes);
    }
}

/// Converts the raw image `raw` into the qcow2 image `image` (`qemu-img convert`).
pub fn raw_to_qcow2(raw: &Path, image: &Path) {
    run_command(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(image),
    );
}

/// `qemu-img compare` of `a` (in format `a_format`) with `b`: `Ok` when the guest sees the same
/// bytes in both (an unallocated range equals one of zeros), else qemu-img's verdict, its stdout
/// and stderr. Panics when qemu-img cannot be started.
pub fn compare_images(a: &Path, a_format: &str, b: &Path, b_format: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", a_format, "-F", b_format])
        .arg(a)
        .arg(b)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for these tests: {e}"));
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "qemu-img compare {} {} ({}): {}{}",
        a.display(),
        b.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Asserts that [`compare_images`] finds `a` and `b` identical.
pub fn assert_images_equal(a: &Path, a_format: &str, b: &Path, b_format: &str) {
    if let Err(verdict) = compare_images(a, a_format, b, b_format) {
        panic!("{verdict}");
    }
}

/// `qemu-img info --output=json` of `image`. It takes the image's lock, so it also fails while
/// another process (a `qemu-nbd` left running) holds the image open for writing.
pub fn image_info(image: &Path) -> serde_json::Value {
    let out = run_command(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(image),
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

/// The persistent dirty bitmaps of the qcow2 `image` as `qemu-img info` lists them (name, flags,
/// granularity). Read with `-U`, so that it works while a server still holds the image, as after
/// a killed backup.
pub fn bitmaps(image: &Path) -> Vec<serde_json::Value> {
    let out = run_command(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(image),
    );
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON");
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Whether `pid` exists and runs: a zombie (state Z, which nothing reaps when PID 1 does not
/// reap orphans, as in some containers) or a dead process (X) counts as gone.
pub fn live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Makes this process a child subreaper: an orphan anywhere below it (a daemonised grandchild
/// whose parent exited) becomes its child instead of PID 1's, so that a process a child let go of
/// without reaping shows up as a zombie of this process ([`zombies_of`]), as it would stay for
/// good under an init that never reaps (some containers' PID 1, or a daemon running as PID 1).
/// For the whole process: a test binary that calls it must keep its tests from spawning anything
/// concurrently with its checks.
pub fn adopt_orphans() {
    let me = rustix::process::Pid::from_raw(std::process::id() as i32);
    rustix::process::set_child_subreaper(me).expect("prctl(PR_SET_CHILD_SUBREAPER)");
}

/// The zombies (exited, not yet reaped) whose parent is `parent`, as `PID (COMMAND)`: children
/// it failed to wait for, or orphans it adopted (as PID 1 of a container, or as a subreaper) and
/// did not reap.
pub fn zombies_of(parent: u32) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid: u32 = fields.next()?.parse().ok()?;
            (state == "Z" && ppid == parent).then(|| format!("{head})"))
        })
        .collect()
}

/// The children of `parent` (live or not), by pid.
pub fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Live processes whose command line contains `path` (an image, or a directory holding the files
/// they use), each with its raw command line.
fn naming(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let needle = path.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            cmdline
                .windows(needle.len())
                .any(|w| w == needle)
                .then_some((pid, cmdline))
        })
        .filter(|(pid, _)| live(*pid))
        .collect()
}

/// Pids of the live processes, of any program, whose command line names `path`.
pub fn processes_naming(path: &Path) -> Vec<u32> {
    naming(path).into_iter().map(|(pid, _)| pid).collect()
}

/// Pids of the live `qemu-nbd` processes whose command line names `path`: the servers a stage
/// started, and not the `qemu-img` it may run on the same image.
pub fn qemu_nbd_naming(path: &Path) -> Vec<u32> {
    naming(path)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.starts_with(b"qemu-nbd"))
        .map(|(pid, _)| pid)
        .collect()
}

/// Asserts that no process (a `qemu-nbd` left running, or anything else) still names `path`;
/// the message lists their command lines.
pub fn assert_no_process_naming(path: &Path) {
    let left: Vec<String> = naming(path)
        .into_iter()
        .map(|(pid, cmdline)| {
            let cmdline: Vec<u8> = cmdline
                .into_iter()
                .map(|b| if b == 0 { b' ' } else { b })
                .collect();
            format!("{pid}: {}", String::from_utf8_lossy(&cmdline).trim_end())
        })
        .collect();
    assert!(
        left.is_empty(),
        "still running on {}: {left:?}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks the tests lean on can fail: a differing image, a process still running.
    #[test]
    fn the_checks_see_a_difference_and_a_running_process() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        make_qcow2(&a, "1M", &[]);
        make_qcow2(&b, "1M", &["write -P 0xab 64k 4k"]);
        assert_images_equal(&a, "qcow2", &a, "qcow2");
        let verdict = compare_images(&a, "qcow2", &b, "qcow2").unwrap_err();
        assert!(verdict.contains("qemu-img compare"), "{verdict}");
        assert_eq!(image_info(&b)["virtual-size"], 1 << 20);
        assert_eq!(bitmaps(&b), Vec::<serde_json::Value>::new());

        let marker = dir.path().join("marker");
        std::fs::write(&marker, b"").unwrap();
        let mut holder = Command::new("tail").arg("-f").arg(&marker).spawn().unwrap();
        let pid = holder.id();
        assert!(live(pid));
        // Until the child has exec'd, its command line is still this test's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while processes_naming(dir.path()).is_empty() {
            assert!(std::time::Instant::now() < deadline, "tail never ran");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(processes_naming(dir.path()), vec![pid]);
        assert_eq!(qemu_nbd_naming(dir.path()), Vec::<u32>::new());
        let caught = std::panic::catch_unwind(|| assert_no_process_naming(dir.path()));
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(caught.is_err(), "a running process went unnoticed");
        assert!(!live(pid));
        assert_no_process_naming(dir.path());
    }

    #[test]
    #[should_panic(expected = "qemu-img")]
    fn a_failing_tool_panics_naming_it() {
        run_tool("qemu-img", &["info", "/nonexistent/image.qcow2"]);
    }
}
