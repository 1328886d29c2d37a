//! Shared fixtures: images made with qemu-img/qemu-io and a qemu-nbd started and stopped by pid.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
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

/// A read-only `qemu-nbd` on a private unix socket (or a loopback port), killed by pid on drop.
pub struct QemuNbd {
    pub socket: PathBuf,
    pub port: u16,
    pid: String,
}

impl QemuNbd {
    /// Exports `image` on `dir/nbd.sock` as the default export "" (or `-x name`), with extra arguments such
    /// as `-B b0`.
    pub fn start(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let listen = ["--socket", socket.to_str().unwrap()];
        let pid = Self::spawn(dir, image, format, &listen, extra);
        QemuNbd {
            socket,
            port: 0,
            pid,
        }
    }

    /// Exports `image` on 127.0.0.1 at a port the kernel just handed out (a small race with other
    /// processes binding ports, acceptable on a test machine).
    pub fn start_tcp(dir: &Path, image: &Path, format: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_arg = port.to_string();
        let listen = ["--bind", "127.0.0.1", "--port", &port_arg];
        let pid = Self::spawn(dir, image, format, &listen, &[]);
        QemuNbd {
            socket: PathBuf::new(),
            port,
            pid,
        }
    }

    fn spawn(dir: &Path, image: &Path, format: &str, listen: &[&str], extra: &[&str]) -> String {
        let pid_file = dir.join("qemu-nbd.pid");
        let mut args = vec![
            "--read-only",
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
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}
