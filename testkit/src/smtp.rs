//! A real SMTP server on loopback for the tests: aiosmtpd (`python3-aiosmtpd`), driven by
//! `testkit/smtp_server.py`, which writes every accepted message to a directory as JSON. Tests
//! that use it fail, never skip, when aiosmtpd is missing.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the interpreter with aiosmtpd is looked for: `$BACKFLOW_PYTHON`, then `python3` on the
/// PATH, then Debian's own `/usr/bin/python3` (which `python3-aiosmtpd` installs into, and which a
/// pyenv or venv `python3` on the PATH hides).
fn python() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("BACKFLOW_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push("python3".into());
    candidates.push("/usr/bin/python3".into());
    for candidate in &candidates {
        let ok = Command::new(candidate)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return candidate.clone();
        }
    }
    panic!(
        "no python3 with aiosmtpd (tried {candidates:?}): these tests need a real SMTP server; \
         install Debian's python3-aiosmtpd (`apt-get install python3-aiosmtpd`, or run \
         scripts/setup.sh) or set BACKFLOW_PYTHON to an interpreter that has it"
    );
}

/// A port nothing listens on (right now): bound, read, released.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().unwrap().port()
}

#[derive(Default)]
pub struct Options<'a> {
    /// (cert, key) PEM files: offer STARTTLS and require it.
    pub starttls: Option<(&'a Path, &'a Path)>,
    /// (cert, key) PEM files: TLS from the first byte.
    pub smtps: Option<(&'a Path, &'a Path)>,
    /// "user:password": require AUTH.
    pub auth: Option<&'a str>,
}

/// The running server; killed (by its pid, through `Child`) when dropped.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl SmtpServer {
    pub fn start(options: Options<'_>) -> SmtpServer {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        std::fs::create_dir(&mail).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("smtp_server.py");
        let port = free_port();
        let mut command = Command::new(&python);
        command.arg(&script).arg(port.to_string()).arg(&mail);
        if let Some((cert, key)) = options.starttls {
            command.arg("--starttls").arg(cert).arg(key);
        }
        if let Some((cert, key)) = options.smtps {
            command.arg("--smtps").arg(cert).arg(key);
        }
        if let Some(auth) = options.auth {
            command.arg("--auth").arg(auth);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} {}: {e}",
                    python.display(),
                    script.display()
                )
            });
        let mut server = SmtpServer { child, port, dir };
        server.wait_until_listening();
        server
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("the SMTP server exited ({status}) before listening:\n{stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "the SMTP server does not listen on 127.0.0.1:{} after 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every message accepted so far, in order of arrival.
    pub fn messages(&self) -> Vec<Value> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("mail"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }

    /// A scratch directory that lives as long as the server.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
