//! Real S3-compatible object stores for the tests, started by the test process and stopped by
//! pid: [`Garage`] (the store the tests and benchmarks run against: one node on loopback, or a
//! three-node cluster in network namespaces for the fault tests) and [`S3sFs`] (a second,
//! independent implementation, for compatibility). Each hands out buckets as [`S3`] values: the
//! endpoint, region, credentials and bucket a client needs, and the environment variables that
//! pass them to a `Command`.
//!
//! ```text
//! let s3 = Garage::shared().bucket("round-trip");          // a bucket of this test's own
//! s3.apply(&mut Command::new(backflow))                    // AWS_ENDPOINT_URL, AWS_REGION, ...
//!     .args(["init", "--repo", &s3.url("repo")]);          // s3://round-trip-PID-N/repo
//! let mut cluster = Garage::cluster3();                    // fault tests: stop(i), start(i),
//! cluster.stop(1);                                         // pause(i), stop_all(), start_all()
//! ```
//!
//! # Where the servers come from
//! Neither is a Debian package: `scripts/setup.sh` installs both with `cargo install` into
//! [`TOOLS_DIR`] (`$BACKFLOW_TOOLS`, default `/opt/backflow-tools`) once per machine and reuses
//! them after. Garage takes about 26 minutes to build on a loaded machine, so setup starts the
//! builds in the background (`TOOLS_DIR/build/NAME.{pid,log,status}`) and returns; [`tool`]
//! waits for a build still running (saying so once on stderr) and fails with the end of its log
//! when it failed. A test that needs a store fails, never skips, when the store is missing.
//!
//! # Cleaning up even when the test process dies
//! Statics are never dropped, and a shared server lives in one ([`Garage::shared`]). So every
//! server comes with a reaper: a shell that holds the read end of a pipe whose write end only
//! this process holds (Rust opens pipes close-on-exec), and on end-of-file kills the server's
//! processes (by the pids in their pid files), removes its network namespaces and deletes its
//! directory. End-of-file comes when the owner is dropped, or when this process exits, however it
//! exits. The reaper runs in a process group of its own, so that Ctrl-C on `cargo test` does not
//! kill it before it has cleaned up.
//!
//! # s3s-fs and restic
//! s3s-fs 0.14.1 takes an empty `delimiter=` query parameter (which minio-go, restic's client,
//! sends on every recursive listing) as a delimiter, where S3 takes it as none: such a listing of
//! `data/` returns one bogus common prefix and no keys, so `restic check` reports every pack
//! missing. Clients that omit the parameter for a flat listing are not affected.

mod garage;
mod netns;

pub use garage::Garage;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` installs the servers (`bin/`) and keeps the state of their builds
/// (`build/`), unless `$BACKFLOW_TOOLS` says otherwise.
pub const TOOLS_DIR: &str = "/opt/backflow-tools";

/// How long a test waits for a background build of a server before giving up: a fresh
/// machine's Garage build takes about 26 minutes while the workspace builds beside it.
const BUILD_WAIT: Duration = Duration::from_secs(60 * 60);

/// How often a waiting test looks at a background build.
const BUILD_POLL: Duration = Duration::from_secs(1);

/// How many lines of a failed build's log a panic shows.
const LOG_TAIL_LINES: usize = 30;

/// How long a server may take to answer after it was started: a node starts in well under a
/// second; a loaded CI machine gets plenty of slack.
const READY_WAIT: Duration = Duration::from_secs(60);

/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(20);

/// The region s3s-fs is addressed with (it accepts any in the signature).
const S3S_FS_REGION: &str = "us-east-1";

/// Makes bucket and namespace names unique within one test process (the pid makes them unique
/// across processes).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A bucket on a running store, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3 {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl S3 {
    /// The standard AWS variables that point a client at this bucket's store (path-style
    /// addressing is the client's choice). `AWS_DEFAULT_REGION` is there too, for clients that
    /// read only that one (restic 0.14); `AWS_ALLOW_HTTP=true` when the endpoint is not on
    /// loopback (the cluster's nodes), since the endpoint is plain HTTP.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_DEFAULT_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ];
        if !self.is_loopback() {
            vars.push(("AWS_ALLOW_HTTP", "true".to_owned()));
        }
        vars
    }

    /// Sets [`S3::env`] on `command`.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.envs(self.env())
    }

    /// The repository location `s3://BUCKET/PREFIX` (`s3://BUCKET` for an empty prefix).
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    /// restic's name for a repository under `prefix` in this bucket (`-r`).
    pub fn restic_repo(&self, prefix: &str) -> String {
        format!(
            "s3:{}/{}/{}",
            self.endpoint,
            self.bucket,
            prefix.trim_matches('/')
        )
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("endpoint {} is not http://IP:PORT: {e}", self.endpoint))
    }

    fn is_loopback(&self) -> bool {
        self.addr().ip().is_loopback()
    }
}

/// A bucket name of at most 63 characters, unique in this machine's tests: `NAME-PID-N`, with
/// `name` lower-cased and reduced to what S3 allows.
pub fn unique_bucket_name(name: &str) -> String {
    let clean: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let suffix = format!(
        "-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let keep = 63 - suffix.len();
    let head = clean.trim_matches('-');
    let head = if head.is_empty() { "bucket" } else { head };
    format!("{}{suffix}", &head[..head.len().min(keep)])
}

/// The directory `scripts/setup.sh` installs the servers into.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("BACKFLOW_TOOLS").map_or_else(|| PathBuf::from(TOOLS_DIR), PathBuf::from)
}

/// The installed binary `name` (`garage`, `s3s-fs`) under [`tools_dir`]: waits while
/// `scripts/setup.sh`'s background build of it runs; panics with the end of the build's log
/// when the build failed or stopped, and with what to run when there is neither a binary nor a
/// build.
pub fn tool(name: &str) -> PathBuf {
    tool_in(&tools_dir(), name, &mut |line| eprintln!("{line}"))
}

/// [`tool`] with the tools' directory given (`DIR/bin/NAME`, `DIR/build/NAME.{pid,log,status}`)
/// and where to say that it waits (`say`, once, before the first wait).
pub fn tool_in(dir: &Path, name: &str, say: &mut dyn FnMut(&str)) -> PathBuf {
    let bin = dir.join("bin").join(name);
    let build = dir.join("build");
    let log = build.join(format!("{name}.log"));
    let status_file = build.join(format!("{name}.status"));
    let pid_file = build.join(format!("{name}.pid"));
    let started = Instant::now();
    let mut announced = false;
    loop {
        let status = std::fs::read_to_string(&status_file).ok();
        let pid = std::fs::read_to_string(&pid_file).ok();
        let running = status.is_none() && pid.as_deref().is_some_and(process_alive);
        if !running {
            if let Some(code) = status.as_deref().map(str::trim).filter(|s| *s != "0") {
                panic!(
                    "the build of {name} failed (exit status {code}); the end of {}:\n{}",
                    log.display(),
                    tail(&log)
                );
            }
            if status.is_none() && pid.is_some() && !bin.is_file() {
                panic!(
                    "the build of {name} stopped without finishing (no {}); the end of {}:\n{}",
                    status_file.display(),
                    log.display(),
                    tail(&log)
                );
            }
            if bin.is_file() {
                if announced {
                    say(&format!(
                        "{name} is built, after {:?} of waiting",
                        started.elapsed()
                    ));
                }
                return bin;
            }
            panic!(
                "{} is missing: these tests need a real {name}; run `bash scripts/setup.sh` \
                 (it builds it into {} in the background; the tests wait for that build)",
                bin.display(),
                dir.display()
            );
        }
        if !announced {
            say(&format!(
                "waiting for the background build of {name} (log: {}), up to {BUILD_WAIT:?}",
                log.display()
            ));
            announced = true;
        }
        assert!(
            started.elapsed() < BUILD_WAIT,
            "the build of {name} still runs after {BUILD_WAIT:?}; the end of {}:\n{}",
            log.display(),
            tail(&log)
        );
        std::thread::sleep(BUILD_POLL);
    }
}

/// Whether the process whose pid `pid` holds (a pid file's text) exists and is not a zombie.
fn process_alive(pid: &str) -> bool {
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, for failure messages.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A shell that runs a clean-up script when its stdin reaches end-of-file: when dropped, or when
/// this process exits (see the module docs).
pub(crate) struct Reaper {
    child: Child,
}

impl Reaper {
    /// Starts `sh -c 'cat >/dev/null; SCRIPT' sh ARGS...`.
    pub(crate) fn spawn<S: AsRef<OsStr>>(script: &str, args: &[S]) -> Reaper {
        use std::os::unix::process::CommandExt;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("cat >/dev/null\n{script}"))
            .arg("sh")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sh for cleaning up: {e}"));
        Reaper { child }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET of `path` at `addr`: the status code and body, or `None` when nothing
/// answers (yet).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Random bytes as lower-case hex, for keys and secrets.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls `ready` until it holds; panics with `what` and `log` after [`READY_WAIT`], or at once
/// when `exited` says the server is gone.
pub(crate) fn wait_until(
    what: &str,
    mut ready: impl FnMut() -> bool,
    mut exited: impl FnMut() -> Option<String>,
    log: &Path,
) {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if ready() {
            return;
        }
        if let Some(status) = exited() {
            panic!(
                "{what}: the server exited ({status}); the end of {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after {READY_WAIT:?}; the end of {}:\n{}",
            log.display(),
            tail(log)
        );
        std::thread::sleep(READY_POLL);
    }
}

/// s3s-fs (the `s3s` project's file-system store) on loopback, for running the same client
/// against a second S3 implementation. Buckets are directories under its root. Stopped by pid
/// when dropped, its files removed.
pub struct S3sFs {
    child: Child,
    root: PathBuf,
    port: u16,
    access_key: String,
    secret_key: String,
    _reaper: Reaper,
}

impl S3sFs {
    /// Starts a server on a free loopback port and waits until it accepts connections.
    pub fn start() -> S3sFs {
        let bin = tool("s3s-fs");
        let root = tempfile::Builder::new()
            .prefix("bf-s3s-fs-")
            .tempdir()
            .unwrap()
            .keep();
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        let reaper = Reaper::spawn(
            "[ -f \"$1/pid\" ] && kill -KILL \"$(cat \"$1/pid\")\"\nrm -rf \"$1\"",
            &[&root],
        );
        let access_key = format!("BF{}", random_hex(9).to_uppercase());
        let secret_key = random_hex(20);
        let log = root.join("log");
        for _attempt in 0..PORT_ATTEMPTS {
            let port = crate::smtp::free_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(root.join("stderr")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            std::fs::write(root.join("pid"), child.id().to_string()).unwrap();
            let deadline = Instant::now() + READY_WAIT;
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return S3sFs {
                        child,
                        root,
                        port,
                        access_key,
                        secret_key,
                        _reaper: reaper,
                    };
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let stderr = std::fs::read_to_string(root.join("stderr")).unwrap_or_default();
                    assert!(
                        stderr.contains("in use"),
                        "s3s-fs exited ({status}) before listening:\n{stderr}"
                    );
                    break; // the port was taken in the meantime: another one
                }
                assert!(
                    Instant::now() < deadline,
                    "s3s-fs does not listen on 127.0.0.1:{port} after {READY_WAIT:?}"
                );
                std::thread::sleep(READY_POLL);
            }
        }
        panic!("s3s-fs found no free port in {PORT_ATTEMPTS} attempts");
    }

    /// A new empty bucket named after `name` (see [`unique_bucket_name`]).
    pub fn bucket(&self, name: &str) -> S3 {
        let bucket = unique_bucket_name(name);
        std::fs::create_dir(self.root.join("data").join(&bucket)).unwrap();
        S3 {
            endpoint: format!("http://127.0.0.1:{}", self.port),
            region: S3S_FS_REGION.to_owned(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            bucket,
        }
    }

    /// Where the objects of `bucket` lie, as files named by their keys.
    pub fn bucket_dir(&self, s3: &S3) -> PathBuf {
        self.root.join("data").join(&s3.bucket)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.root.join("pid"));
        // The reaper then removes the directory.
    }
}

/// How many times a server on loopback is started on another free port when the one it was
/// given was taken between choosing it and binding it.
const PORT_ATTEMPTS: usize = 5;
