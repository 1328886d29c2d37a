//! Shared fixtures: images made with qemu-img/qemu-io and a qemu-nbd started and stopped by pid.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use backflow_nbd::Extent;
use std::process::Command;

/// Runs a QEMU tool and panics with its output when it is missing or fails: these tests must not skip.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is required for these tests (apt-get install qemu-utils): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `qemu-nbd` (read-only unless started with [`QemuNbd::start_writable`]) on a private unix socket (or a
/// loopback port), killed by pid on drop or [`QemuNbd::stop`].
pub struct QemuNbd {
    pub socket: PathBuf,
    pub port: u16,
    pid: String,
    stopped: bool,
}

impl QemuNbd {
    /// Exports `image` read-only on `dir/nbd.sock` as the default export "" (or `-x name`), with extra
    /// arguments such as `-B b0`.
    pub fn start(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--read-only"];
        args.extend_from_slice(extra);
        Self::start_with(dir, image, format, &args)
    }

    /// Exports `image` writable on `dir/nbd.sock`.
    pub fn start_writable(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> Self {
        Self::start_with(dir, image, format, extra)
    }

    fn start_with(dir: &Path, image: &Path, format: &str, args: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let listen = ["--socket", socket.to_str().unwrap()];
        let pid = Self::spawn(dir, image, format, &listen, args);
        QemuNbd {
            socket,
            port: 0,
            pid,
            stopped: false,
        }
    }

    /// The server's pid, for signals (`kill -STOP` to make it silent).
    pub fn pid(&self) -> &str {
        &self.pid
    }

    /// Terminates the server (SIGTERM: qemu-nbd flushes and closes the image) and waits until it has
    /// exited, so the image can be opened by another program.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = Command::new("kill").arg(&self.pid).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if !process_alive(&self.pid) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
        panic!("qemu-nbd {} did not exit within 10 s of SIGTERM", self.pid);
    }

    /// Exports `image` on 127.0.0.1 at a port the kernel just handed out (a small race with other
    /// processes binding ports, acceptable on a test machine).
    pub fn start_tcp(dir: &Path, image: &Path, format: &str) -> Self {
        Self::start_tcp_with(dir, image, format, &["--read-only"])
    }

    /// [`QemuNbd::start_tcp`] with other arguments (`--read-only` is not implied), such as TLS
    /// credentials (`--object tls-creds-x509,... --tls-creds ID`).
    pub fn start_tcp_with(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_arg = port.to_string();
        let listen = ["--bind", "127.0.0.1", "--port", &port_arg];
        let pid = Self::spawn(dir, image, format, &listen, extra);
        QemuNbd {
            socket: PathBuf::new(),
            port,
            pid,
            stopped: false,
        }
    }

    fn spawn(dir: &Path, image: &Path, format: &str, listen: &[&str], extra: &[&str]) -> String {
        let pid_file = dir.join("qemu-nbd.pid");
        let mut args = vec![
            "--persistent",
            "--fork",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "-f",
            format,
        ];
        args.extend_from_slice(listen);
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        run("qemu-nbd", &args);
        std::fs::read_to_string(&pid_file)
            .expect("qemu-nbd --fork wrote no pid file")
            .trim()
            .to_string()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new("kill").arg(&self.pid).status();
        }
    }
}

/// Whether `pid` still runs: gone, or a zombie that nobody reaps (PID 1 here does not), counts as exited.
pub fn process_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
}

/// `nbdinfo --json` of the default export on a unix socket, under timeout(1).
pub fn nbdinfo_json(socket: &Path) -> String {
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = Command::new("timeout")
        .args(["60", "nbdinfo", "--json", &uri])
        .output()
        .expect("timeout (coreutils) runs nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo --json {uri} failed (apt-get install libnbd-bin): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("nbdinfo prints UTF-8")
}

/// The value of `"key": true|false` in nbdinfo's JSON (a flat scan: the keys used are unique).
pub fn json_bool(json: &str, key: &str) -> bool {
    let quoted = format!("\"{key}\"");
    let at = json
        .find(&quoted)
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = json[at + quoted.len()..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .expect("a colon after the key")
        .trim_start();
    if rest.starts_with("true") {
        true
    } else if rest.starts_with("false") {
        false
    } else {
        panic!("{key} is not a boolean in {json}")
    }
}

// The qcow2 fixture shared by the qemu-nbd and nbdinfo tests.

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;
/// Larger than QEMU's 32 MiB maximum block size, so whole-image reads are split.
pub const IMAGE_SIZE: u64 = 40 * MIB;

/// (offset, length, pattern byte) written before the bitmap exists.
pub const BEFORE_BITMAP: &[(u64, u64, u8)] = &[(MIB, 64 * KIB, 0xab), (33 * MIB, 128 * KIB, 0xcd)];
/// Written after `b0` was added: a 4 KiB write inside one 64 KiB granule, and an 8 KiB one across two.
pub const AFTER_BITMAP: &[(u64, u64, u8)] = &[
    (4 * MIB, 4 * KIB, 0x11),
    (5 * MIB + 60 * KIB, 8 * KIB, 0x22),
];

pub fn write(image: &str, (offset, len, pattern): (u64, u64, u8)) {
    let cmd = format!("write -P {pattern:#x} {offset} {len}");
    run("qemu-io", &["-f", "qcow2", "-c", &cmd, image]);
}

/// A qcow2 image with the writes above and an enabled bitmap `b0` added between them, exported by qemu-nbd
/// with `extra` arguments (such as `-x NAME`).
pub fn qcow2_fixture(dir: &Path, extra: &[&str]) -> QemuNbd {
    let image = qcow2_image(dir);
    let mut args = vec!["-B", "b0"];
    args.extend_from_slice(extra);
    QemuNbd::start(dir, &image, "qcow2", &args)
}

/// The image of [`qcow2_fixture`], not exported: `dir/disk.qcow2`.
pub fn qcow2_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    let img = image.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img, &IMAGE_SIZE.to_string()],
    );
    BEFORE_BITMAP.iter().for_each(|&w| write(img, w));
    run("qemu-img", &["bitmap", "--add", "--enable", img, "b0"]);
    AFTER_BITMAP.iter().for_each(|&w| write(img, w));
    image
}

/// Ranges sorted and merged where they touch or overlap.
pub fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (from, to) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= from => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

/// Merged ranges of the extents whose flags satisfy `pred`.
pub fn ranges_with(extents: &[Extent], pred: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    merged(
        extents
            .iter()
            .filter(|e| pred(e.flags))
            .map(|e| (e.offset, e.offset + e.len))
            .collect(),
    )
}

/// Asserts that `extents` cover `[offset, offset + len)` exactly once, in order.
pub fn assert_exact_cover(extents: &[Extent], offset: u64, len: u64) {
    let mut pos = offset;
    for e in extents {
        assert_eq!(e.offset, pos, "extents {extents:?} leave a gap or overlap");
        assert!(e.len > 0);
        pos += e.len;
    }
    assert_eq!(
        pos,
        offset + len,
        "extents {extents:?} do not end at the range end"
    );
}
