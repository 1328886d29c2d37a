//! The daemon's console under test (console_api, console_browser): a daemon started once its
//! console listens and stopped when the test ends, a job run by hand, a tokens file, data no
//! compressor shrinks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::{backflow, sigterm, spawn_logged, wait_exit, wait_for_line};

/// A running `backflow daemon` and its console's URL. Dropped without [`ConsoleDaemon::stop`]
/// (a failed test), it gets SIGTERM, then a kill after a minute.
pub struct ConsoleDaemon {
    child: Child,
    pub url: String,
    _lines: Receiver<String>,
}

impl ConsoleDaemon {
    /// `backflow --log info daemon --jobs JOBS ARGS...` (`--http 127.0.0.1:0` unless ARGS say
    /// where), prefixed by `wrap` (`ip netns exec NS`) and with `env`, once its console listens.
    pub fn start(
        wrap: &[&str],
        jobs: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> ConsoleDaemon {
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(backflow().get_program());
                c.env_remove("RUST_LOG");
                c
            }
            None => backflow(),
        };
        cmd.args(["--log", "info", "daemon", "--jobs"])
            .arg(jobs)
            .args(args);
        if !args.contains(&"--http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, lines) = spawn_logged(cmd, "daemon");
        let line = wait_for_line(&lines, "Console listening.", Duration::from_secs(60));
        let url = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("url="))
            .unwrap_or_else(|| panic!("no url= in {line:?}"))
            .trim_matches('"')
            .to_owned();
        ConsoleDaemon {
            child,
            url,
            _lines: lines,
        }
    }

    /// The console's address of `path`.
    pub fn page(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// SIGTERM; it must exit 0 within a minute.
    pub fn stop(mut self) {
        sigterm(&self.child);
        assert_eq!(
            wait_exit(&mut self.child, Duration::from_secs(60)).code(),
            Some(0)
        );
    }
}

impl Drop for ConsoleDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            sigterm(&self.child);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `backflow job run --quiet FILE`, which must succeed.
pub fn run_job(file: &Path) {
    let out = backflow()
        .args(["job", "run", "--quiet"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A tokens file in `dir` naming each `(name, role)` with a secret file of its own; returns the
/// file and the secrets, in order.
pub fn write_tokens(dir: &Path, tokens: &[(&str, &str)]) -> (PathBuf, Vec<String>) {
    let mut yaml = String::from("tokens:\n");
    let mut secrets = Vec::new();
    for (name, role) in tokens {
        let secret = format!("{name}-{}", "0123456789abcdef".repeat(3));
        std::fs::write(dir.join(format!("{name}.secret")), format!("{secret}\n")).unwrap();
        yaml.push_str(&format!(
            "  - {{name: {name}, role: {role}, file: {name}.secret}}\n"
        ));
        secrets.push(secret);
    }
    let file = dir.join("tokens.yaml");
    std::fs::write(&file, yaml).unwrap();
    (file, secrets)
}

/// `len` bytes (a multiple of 1 MiB) of data no compressor can shrink (BLAKE3's output
/// stream), in `path`.
pub fn incompressible(path: &Path, len: u64) {
    let mut reader = blake3::Hasher::new().update(b"console").finalize_xof();
    let mut file = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..len / buf.len() as u64 {
        reader.fill(&mut buf);
        std::io::Write::write_all(&mut file, &buf).unwrap();
    }
}
