//! The worker access: ssh as a child process, with the host's user, port, key and known-hosts
//! file, never asking anyone anything (`BatchMode`), and every run bounded in time.
//!
//! Host keys: a host seen for the first time is accepted and remembered
//! (`StrictHostKeyChecking=accept-new`) in the cluster's known-hosts file; a host whose key
//! changed is refused. That is what an operator who set up the hosts expects of a tool that logs
//! in on its own, unattended: no prompt to hang on, no silent acceptance of a changed key.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::HostError;
use crate::file::Host;

/// ssh's exit status when ssh itself failed (connect, host key, authentication), rather than the
/// remote command.
pub const SSH_FAILED: i32 = 255;

/// ssh's keepalive, seconds between probes and probes unanswered before it gives up.
pub const ALIVE_INTERVAL: u32 = 5;
pub const ALIVE_COUNT: u32 = 3;

/// What a shell answers for a command it cannot find.
const COMMAND_NOT_FOUND: i32 = 127;

/// Time a step gets past its own deadline (ssh's `ConnectTimeout`, the TCP probe of a libvirt
/// URI) before it is given up on: its own message, which says which step failed (refused, no
/// route, the handshake), is better than "did not answer".
pub const KILL_GRACE: Duration = Duration::from_secs(1);

impl Host {
    /// `user@address`, with the port when it is not 22: how messages name the ssh target.
    pub fn ssh_target(&self) -> String {
        let port = if self.ssh.port == crate::file::DEFAULT_SSH_PORT {
            String::new()
        } else {
            format!(" port {}", self.ssh.port)
        };
        format!("{}@{}{port}", self.ssh.user, self.address)
    }

    /// An ssh command to this host that runs `remote` (each word quoted for the remote shell),
    /// with the host's settings; connecting and the protocol handshake give up after
    /// `connect_timeout`. Standard input is left to the caller (a worker takes its task on it).
    pub fn ssh_command(&self, connect_timeout: Duration, remote: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        let secs = connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
        cmd.args(["-o", "BatchMode=yes"])
            .args(["-o", &format!("ConnectTimeout={secs}")])
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            // A host that stops answering (network cut, host down) ends the connection after
            // ALIVE_INTERVAL x ALIVE_COUNT seconds: a worker's VM is then retried elsewhere.
            .args(["-o", &format!("ServerAliveInterval={ALIVE_INTERVAL}")])
            .args(["-o", &format!("ServerAliveCountMax={ALIVE_COUNT}")]);
        if let Some(known) = &self.ssh.known_hosts {
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", known.display()));
        }
        if let Some(key) = &self.ssh.key {
            // Only this key: an agent's or ~/.ssh's keys would make a success here that a
            // machine without them does not repeat.
            cmd.arg("-i").arg(key).args(["-o", "IdentitiesOnly=yes"]);
        }
        cmd.args(["-T", "-p", &self.ssh.port.to_string(), "-l", &self.ssh.user])
            .arg(self.address.to_string())
            .arg("--")
            .arg(
                remote
                    .iter()
                    .map(|w| shell_quote(w))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        cmd
    }

    /// Runs `BACKFLOW --version` on the host over ssh and returns the version it prints
    /// (`0.1.0` of `backflow 0.1.0`), all within `timeout` (plus [`KILL_GRACE`]).
    pub fn remote_version(&self, timeout: Duration) -> Result<String, HostError> {
        if let Some(key) = &self.ssh.key
            && !key.exists()
        {
            return Err(HostError::MissingFile {
                what: "the ssh key",
                path: key.clone(),
            });
        }
        let command = format!("{} --version", self.backflow);
        let cmd = self.ssh_command(timeout, &[&self.backflow, "--version"]);
        let out = run_bounded(cmd, timeout + KILL_GRACE).map_err(|e| match e {
            BoundedError::Spawn(e) => HostError::SshMissing(e),
            BoundedError::TimedOut(after) => HostError::TimedOut {
                what: format!("ssh {}", self.ssh_target()),
                after,
            },
        })?;
        let stderr = last_line(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(SSH_FAILED) => {
                return Err(HostError::Ssh {
                    target: self.ssh_target(),
                    message: stderr,
                });
            }
            Some(COMMAND_NOT_FOUND) => {
                return Err(HostError::Backflow {
                    command,
                    problem: format!("was not found ({stderr})"),
                });
            }
            _ => {
                return Err(HostError::Backflow {
                    command,
                    problem: format!("failed ({}): {stderr}", out.status),
                });
            }
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let first = stdout.lines().next().unwrap_or("").trim();
        match first.strip_prefix("backflow ") {
            Some(version) if !version.trim().is_empty() => Ok(version.trim().to_owned()),
            _ => Err(HostError::Backflow {
                command,
                problem: format!("answered `{first}`, not `backflow VERSION`"),
            }),
        }
    }
}

/// `word` as one word for a POSIX shell: as it is when it holds nothing the shell treats
/// specially, else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.,:=+@%".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The last non-empty line of a child's stderr: ssh's reason, without its warnings before it.
fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_owned()
}

/// A child's exit status and what it printed.
pub struct Bounded {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why [`run_bounded`] has no output.
pub enum BoundedError {
    /// The program could not be started.
    Spawn(std::io::Error),
    /// It ran past the deadline and was killed (and waited for).
    TimedOut(Duration),
}

/// Runs `cmd` with no standard input, collecting its output, for at most `limit`: past it, the
/// child is killed and waited for (never left behind).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Bounded, BoundedError> {
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BoundedError::Spawn)?;
    // Both pipes are read to their end on threads of their own (a full stderr pipe would stall
    // a child that fills it); their end is the child's end as far as this wait is concerned.
    let (done_tx, done_rx) = mpsc::channel();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|pipe| {
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = done.send(());
            bytes
        })
    })
    .collect();
    drop(done_tx);
    let deadline = std::time::Instant::now() + limit;
    let mut timed_out = false;
    for _ in 0..readers.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            timed_out = true;
            break;
        }
    }
    if timed_out {
        // Our own child, by its handle. Its readers are not waited for: a process it started
        // (a ProxyCommand) may hold the pipes open, and the output is not wanted any more.
        let _ = child.kill();
        let _ = child.wait();
        return Err(BoundedError::TimedOut(limit));
    }
    let status = child.wait().map_err(BoundedError::Spawn)?;
    let mut outputs = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = outputs.next().unwrap_or_default();
    let stderr = outputs.next().unwrap_or_default();
    Ok(Bounded {
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(yaml_host: &str) -> Host {
        crate::parse(&format!("name: c\nhosts:\n  - {yaml_host}\n"), "c.yaml")
            .unwrap()
            .hosts
            .remove(0)
    }

    #[test]
    fn the_ssh_command_carries_the_hosts_settings_and_quotes_the_remote_words() {
        let h = host(
            "{name: h1, address: 10.0.0.1, ssh: {user: backup, port: 2222, key: /k/id_ed25519}}",
        );
        let cmd = h.ssh_command(
            Duration::from_millis(2500),
            &["/opt/my tools/backflow", "worker"],
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "ssh");
        assert_eq!(
            args,
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=3",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=3",
                "-o",
                "UserKnownHostsFile=/k/known_hosts",
                "-i",
                "/k/id_ed25519",
                "-o",
                "IdentitiesOnly=yes",
                "-T",
                "-p",
                "2222",
                "-l",
                "backup",
                "10.0.0.1",
                "--",
                "'/opt/my tools/backflow' worker",
            ]
        );
        assert_eq!(h.ssh_target(), "backup@10.0.0.1 port 2222");
        // Without a key: ssh's own identities and known hosts.
        let h = host("{name: h1, address: kvm1}");
        let args: Vec<String> = h
            .ssh_command(Duration::from_secs(10), &["backflow", "--version"])
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !args
                .iter()
                .any(|a| a == "-i" || a.starts_with("UserKnownHostsFile"))
        );
        assert_eq!(args[args.len() - 1], "backflow --version");
        assert_eq!(h.ssh_target(), "root@kvm1");
    }

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        assert_eq!(shell_quote("/usr/bin/backflow"), "/usr/bin/backflow");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_missing_key_is_said_before_ssh_is_tried() {
        let h = host("{name: h1, address: 10.0.0.1, ssh: {key: /nonexistent/backflow-key}}");
        let e = h.remote_version(Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the ssh key /nonexistent/backflow-key does not exist"
        );
        assert!(!e.is_retryable());
    }
}
